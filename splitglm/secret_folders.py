"""One folder of secrets per service, for docker-compose: each service mounts only its own.

``splitglm secrets --out DIR --per-service [--mount /secrets] [--chown]`` writes
the whole layout (``splitglm.credentials``) into ``DIR/secrets/`` (root only:
the CA key stays there) and then one folder per service, holding only the
files that service needs, at the same relative paths::

    DIR/mosquitto/          uid 1883   ca.crt, mosquitto/{server.*,mosquitto.conf,passwd,acl,clientids,
                                       dynamic-security.json}, health/ (its health check's login)
    DIR/cloud/              uid 10010  ca.crt, cloud/server.{crt,key}, cloud/health-client.{crt,key}
    DIR/edge-<e>/           uid 10021+ ca.crt, edge/{server,client}.{crt,key}, edges/<e>/, api-key
    DIR/device-<d>/         uid 10101+ ca.crt, devices/<d>/
    DIR/sensors-<d>/        uid 10201+ ca.crt, sensors/<d>/

(edges, devices and sensors numbered in the order given). A service that
mounts its folder at ``/secrets`` finds its files where it would in the whole
layout (``/secrets/edges/edge-1/password``). ``mount``: where Mosquitto sees
its folder, which ``mosquitto.conf`` names (default: the folder itself). With
``chown`` (as root) each folder and its files belong to the service's uid:
folders 0700, keys and passwords 0600, the rest 0644; ``DIR`` itself 0755.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from splitglm.credentials import write_secrets

FULL = "secrets"  # the whole layout, with the CA key: for the `secrets` service alone
MOSQUITTO_UID, CLOUD_UID = 1883, 10010  # 1883: the eclipse-mosquitto image's `mosquitto` user
EDGE_UIDS, DEVICE_UIDS, SENSORS_UIDS = 10020, 10100, 10200  # + the 1-based position in --edges / --devices
MOSQUITTO_FILES = ("ca.crt", "mosquitto/server.crt", "mosquitto/server.key", "mosquitto/mosquitto.conf",
                   "mosquitto/passwd", "mosquitto/acl", "mosquitto/clientids", "mosquitto/dynamic-security.json",
                   "health/username", "health/password")
CLOUD_FILES = ("ca.crt", "cloud/server.crt", "cloud/server.key", "cloud/health-client.crt", "cloud/health-client.key")
EDGE_FILES = ("ca.crt", "edge/server.crt", "edge/server.key", "edge/client.crt", "edge/client.key", "api-key")
LOGIN_FILES = ("username", "password")


@dataclass(frozen=True)
class Service:
    """A service's folder: its name, the uid it runs as, and the files of the whole layout it gets."""

    name: str
    uid: int
    files: tuple[str, ...]


def services(devices: list[str], edges: list[str]) -> list[Service]:
    """Every service of a deployment and what it may read."""
    found = [Service("mosquitto", MOSQUITTO_UID, MOSQUITTO_FILES), Service("cloud", CLOUD_UID, CLOUD_FILES)]
    found += [Service(f"edge-{e}", EDGE_UIDS + i, EDGE_FILES + tuple(f"edges/{e}/{f}" for f in LOGIN_FILES))
              for i, e in enumerate(edges, 1)]
    for kind, base in (("device", DEVICE_UIDS), ("sensors", SENSORS_UIDS)):
        folder = "devices" if kind == "device" else "sensors"
        found += [Service(f"{kind}-{d}", base + i, ("ca.crt", *(f"{folder}/{d}/{f}" for f in LOGIN_FILES)))
                  for i, d in enumerate(devices, 1)]
    return found


def _empty(folder: Path) -> None:
    """``folder`` exists and is empty (it may be a volume's mount point: emptied, not removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _own(path: Path, uid: int | None, mode: int) -> None:
    path.chmod(mode)
    if uid is not None:
        os.chown(path, uid, uid)


def copy_for(service: Service, full: Path, out: Path, chown: bool) -> list[Path]:
    """``out/<service>`` holding only ``service.files``, owned by its uid where ``chown``; the files written."""
    uid = service.uid if chown else None
    root = out / service.name
    _empty(root)
    _own(root, uid, 0o700)
    written = []
    for name in service.files:
        target = root / name
        for parent in reversed(target.relative_to(root).parents[:-1]):
            if not (root / parent).is_dir():
                (root / parent).mkdir()
                _own(root / parent, uid, 0o700)
        shutil.copyfile(full / name, target)
        _own(target, uid, (full / name).stat().st_mode & 0o777)  # 0600 secrets, 0644 the rest
        written.append(target)
    return written


def write_service_folders(out, devices: list[str], edges: list[str], mount: Path | None = None,
                          chown: bool = False, **options) -> list[Path]:
    """The whole layout in ``out/secrets`` and one folder per service (module docstring); every file written.

    ``options``: the rest of ``credentials.write_secrets``' arguments.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)  # each service reaches its own folder; the folders themselves are 0700
    full = out / FULL
    devices, edges = list(dict.fromkeys(devices)), list(dict.fromkeys(edges))
    written = write_secrets(full, devices, edges, conf_root=Path(mount or out / "mosquitto"),
                            mosquitto_user="mosquitto", **options)
    if chown:
        os.chown(full, 0, 0)
    for service in services(devices, edges):
        written += copy_for(service, full, out, chown)
    return written
