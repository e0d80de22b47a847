#!/usr/bin/env bash
# Start dockerd if no daemon answers (a machine without systemd: a CI container, a dev box), and wait for it.
# Logs go to $DOCKERD_LOG (default /tmp/dockerd.log). Exits non-zero, saying why, when no daemon comes up.
set -euo pipefail
LOG=${DOCKERD_LOG:-/tmp/dockerd.log}

docker info >/dev/null 2>&1 && exit 0
command -v docker >/dev/null || { echo "no docker CLI: apt-get install docker.io (make docker)" >&2; exit 1; }
command -v dockerd >/dev/null || { echo "no dockerd: apt-get install docker.io (make docker)" >&2; exit 1; }
# In a session of its own, with no descriptor but stdin/out/err: a lock the caller holds (`flock ... make test`)
# must not stay held by the daemon after the caller ends.
pid=$(python3 -c 'import subprocess, sys
log = open(sys.argv[1], "ab")
print(subprocess.Popen(["dockerd"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                       start_new_session=True).pid)' "$LOG")
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && exit 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
done
echo "dockerd did not start; the end of $LOG:" >&2
tail -n 20 "$LOG" >&2
exit 1
