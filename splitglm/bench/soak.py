"""``splitglm bench soak``: many concurrent sessions, HTTP and MQTT mixed, on the secure topology, for minutes.

Real processes on loopback, every link encrypted and authenticated (``splitglm secrets`` made for the run):
the embedded broker over TLS with a login per device and the ACL, ``cloud_service`` behind mutual TLS,
``edge_node`` over HTTPS with API keys. Half the sessions are streamed chat completions (one API key
each); the others are devices simulated in this process, each with its own MQTT login (the broker's ACL
ties topics to logins), running the plan's device tier (one shared copy) over the device agent's link
(``splitglm.system.LocalDevice``). Each session runs requests back to back until the time is up; greedy
and seeded sampling alternate.

Reported: requests done and failed (with the first errors), tokens and tokens/s, the gaps between tokens
(p50/p99, after each request's first token), and each process's resident memory after warm-up (every
session has finished a request, or a fifth of the run has passed), once a minute, and at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..processes import rss_mib
from .options import add_command, add_model_plan, plan_of
from .speculative import prompts
from .stats import percentile

logger = logging.getLogger(__name__)
EDGE = "edge-demo"
STALLER = "soak-staller"  # the device login of the slow-consumer phase's stalled device
ABUSER = "soak-abuser"  # the device login of --abusers' abusive device
REQUEST_TIMEOUT_S = 600.0  # one request's longest wait, seconds


@dataclass
class Tally:
    """What every session did; shared between the session threads."""

    done: int = 0
    failed: int = 0
    tokens: int = 0
    gaps_ms: dict[str, list[float]] = field(default_factory=lambda: {"http": [], "mqtt": []})  # between
    # consecutive tokens of a request, by transport
    errors: list[str] = field(default_factory=list)  # the first few failures
    first_done: set[str] = field(default_factory=set)  # sessions that finished a request
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, session: str, tokens: int, stamps: list[float]) -> None:
        """A finished request: its token count and the times its tokens arrived."""
        with self.lock:
            self.done += 1
            self.tokens += tokens
            kind = "http" if session.startswith("http") else "mqtt"
            self.gaps_ms[kind] += [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
            self.first_done.add(session)

    def fail(self, session: str, error: BaseException) -> None:
        logger.warning("session %s: request failed: %r", session, error)
        with self.lock:
            self.failed += 1
            if len(self.errors) < 10:
                self.errors.append(f"{session}: {error!r}"[:300])


class HttpSession:
    """Streamed chat completions (HTTPS with an API key where given); ``run`` returns (tokens, chunk times)."""

    def __init__(self, url: str, key: str | None = None, ca_file: str | None = None):
        self.url, self.key = url, key
        self.context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    def run(self, prompt: str, max_tokens: int, sampling: dict) -> tuple[int, list[float]]:
        body = json.dumps({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                           "stream": True, **sampling}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", body, headers)
        stamps, last = [], b""
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S, context=self.context) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    stamps.append(time.perf_counter())
                    last = line
        info = json.loads(last[len(b"data: "):]) if last else {}
        if "splitglm" not in info:
            raise RuntimeError(f"the stream ended with {last[:300]!r}")
        return len(info["splitglm"]["tokens"]), stamps[1:-1]  # the content chunks (not the role chunk, not the last)


class DeviceSession:
    """A device simulated here (``splitglm.system.LocalDevice``): its own MQTT client and login, where given,
    on the shared device tier (``device_tier``); ``run`` returns (tokens, token times)."""

    def __init__(self, device_id: str, broker: str, tier: dict, auth=None):
        from ..system import LocalDevice

        self.tier, self.device_id = tier, device_id
        self.device = LocalDevice(None, broker, device_id, auth=auth, tier=tier["tier"])

    def run(self, prompt: str, max_tokens: int, sampling: dict) -> tuple[int, list[float]]:
        gen = self.device.generation(self.tier["prompt"](prompt), self.tier["params"](max_tokens, sampling),
                                     self.tier["tokenizer"])
        stamps = []
        for _ in gen:
            stamps.append(time.perf_counter())
        return len(gen.tokens), stamps

    def close(self) -> None:
        self.device.close()


def device_login(folder: Path, device_id: str):
    """A device's MQTT login from a ``splitglm secrets`` folder."""
    from protos.mqtt import MqttAuth
    from protos.topics import client_id

    return MqttAuth.from_files(device_id, folder / "devices" / device_id / "password", folder / "ca.crt",
                               client_id("device", device_id))  # bound to the login


def device_tier(plan: str) -> dict:
    """The plan's device tier (``DeviceTier``), shared by the simulated devices (one at a time through
    ``lock``), with the chat prompt and the generation parameters they send."""
    from device_agent.agent import DeviceTier
    from protos import splitglm_pb2 as pb

    tier = DeviceTier.load(plan)

    def prompt(text: str) -> list[int]:
        return list(tier.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                       add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def params(max_tokens: int, sampling: dict) -> pb.GenerationParams:
        return pb.GenerationParams(max_tokens=max_tokens, stop_token_ids=tier.stop_token_ids,
                                   temperature=sampling["temperature"], seed=sampling.get("seed", 0))

    return {"tier": tier, "segment": tier.segment, "tokenizer": tier.tokenizer, "prompt": prompt, "params": params,
            "codec": tier.codec, "lock": tier.lock}


def _loop(name: str, session, texts: list[str], max_tokens: int, until: float, tally: Tally) -> None:
    """Requests back to back until ``until``; greedy and seeded sampling alternate."""
    i = 0
    while time.monotonic() < until:
        text = texts[i % len(texts)]
        sampling = {"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": 1000 + i}
        try:
            tally.add(name, *session.run(text, max_tokens, sampling))
        except Exception as e:  # noqa: BLE001 -- every failure is counted and reported
            tally.fail(name, e)
            time.sleep(1.0)
        i += 1


def _slow_phase(system, runners: list, texts: list[str], tier: dict, folder: Path, key: str, ca: str) -> dict:
    from .slow import slow_consumers

    http = [s for _, s in runners if isinstance(s, HttpSession)][:2]
    devices = [s for _, s in runners if isinstance(s, DeviceSession)][:2]
    return slow_consumers([*http, *devices], texts, system.http, system.broker, tier, key=key, ca_file=ca,
                          staller_device=STALLER, staller_auth=device_login(folder, STALLER))


def _abusers(system, tier: dict, folder: Path, key: str, ca: str) -> dict:
    from protos.mqtt import MqttAuth
    from protos.topics import client_id

    from .abuse import AbusiveDevice, AbusiveKey, Impostor

    device_auth = device_login(folder, ABUSER)
    edge_auth = MqttAuth.from_files(EDGE, folder / "edges" / EDGE / "password", folder / "ca.crt",
                                    client_id("edge", EDGE))
    return {"device": AbusiveDevice(system.broker, ABUSER, tier, device_auth),
            "impostor": Impostor(system.broker, edge_auth, device_auth),
            "key": AbusiveKey(system.http, key, ca)}


def _memory(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: rss_mib(pid) for name, pid in pids.items()}


def bench_soak(plan: str, minutes: float = 10.0, sessions: int = 30, max_tokens: int = 32, threads: int = 1,
               secrets: str | None = None, progress: Callable[[float, Tally], None] | None = None,
               slow_consumers: bool = True, abusers: bool = False) -> dict:
    """Run ``sessions`` concurrent sessions (half HTTP, half MQTT) for ``minutes``; the report (a dict).

    With ``slow_consumers``, then (the soak's memory taken) ``splitglm.bench.slow`` on the same system:
    two HTTP and two MQTT sessions without and with a stalled HTTP client and a stalled device.

    With ``abusers`` (``splitglm.bench.abuse``), beside the honest sessions for the whole run: one device over
    its fair share (sessions held, a flood of first frames), one client reconnecting with the edge's client
    id (a wrong password; another login), and one API key over its limits (more requests at once, and faster,
    than its share); the report counts what each was refused, by kind."""
    import os

    from ..credentials import make_secrets
    from ..system import LocalSystem

    n_http = sessions // 2
    devices = [f"soak-dev-{i}" for i in range(sessions - n_http)]
    with tempfile.TemporaryDirectory(prefix="splitglm-soak-") as tmp:
        folder = Path(secrets or make_secrets(Path(tmp) / "secrets", devices=[*devices, STALLER, ABUSER],
                                              edges=[EDGE], api_keys=max(n_http, 1) + abusers))
        keys = (folder / "api-key").read_text().split()
        texts = [text for _, text in prompts(16)]
        tally = Tally()
        system = LocalSystem(plan, threads=threads, secrets=str(folder), edge_id=EDGE, device_agent=False,
                             edge_args=("--stream-send-timeout-s", "120"))  # (a staller stays for a whole round)
        with system:
            pids = {p.name: p.popen.pid for p in system.procs} | {"bench (devices)": os.getpid()}
            tier = device_tier(plan)
            ca = str(folder / "ca.crt")
            honest_keys = keys[:-1] if abusers and len(keys) > 1 else keys  # the last key is the abuser's
            runners = [(f"http-{i}", HttpSession(system.http, honest_keys[i % len(honest_keys)], ca))
                       for i in range(n_http)]
            runners += [(d, DeviceSession(d, system.broker, tier, device_login(folder, d))) for d in devices]
            abuse = _abusers(system, tier, folder, keys[-1], ca) if abusers else None
            started = time.monotonic()
            until = started + minutes * 60
            workers = [threading.Thread(target=_loop, args=(name, s, texts, max_tokens, until, tally), daemon=True,
                                        name=f"soak-{name}") for name, s in runners]
            for w in workers:
                w.start()
            warm, warm_at, warm_tokens = None, started, 0
            timeline, sampled = [], started  # every process's memory once a minute
            while any(w.is_alive() for w in workers):
                time.sleep(1.0)
                elapsed = time.monotonic() - started
                if time.monotonic() - sampled >= 60:
                    sampled = time.monotonic()
                    timeline.append({"t_s": round(elapsed), **_memory(pids)})
                if warm is None and (len(tally.first_done) == len(runners) or elapsed > minutes * 12):
                    warm, warm_at, warm_tokens = _memory(pids), time.monotonic(), tally.tokens
                if progress is not None:
                    progress(elapsed, tally)
            ended = time.monotonic()
            end = _memory(pids)
            refused = {name: abuser.close() for name, abuser in abuse.items()} if abuse else None
            warm = warm or end  # (a run too short to warm up)
            slow = None
            if slow_consumers:
                slow = _slow_phase(system, runners, texts, tier, folder, keys[0], ca)
            for _, s in runners:
                if isinstance(s, DeviceSession):
                    s.close()
            codes = system.stop()
    wall_s, steady_s = ended - started, max(ended - warm_at, 1e-6)
    all_gaps = [g for gaps in tally.gaps_ms.values() for g in gaps]

    def ms(gaps: list[float], q: float) -> float:
        return round(percentile(gaps, q), 2)

    return {
        "minutes": minutes, "sessions": sessions, "http_sessions": n_http, "mqtt_sessions": len(devices),
        "max_tokens": max_tokens, "secure": True,
        "requests_done": tally.done, "requests_failed": tally.failed, "errors": tally.errors,
        "tokens": tally.tokens, "tokens_per_s": round(tally.tokens / wall_s, 2),
        "tokens_per_s_after_warmup": round((tally.tokens - warm_tokens) / steady_s, 2),
        "p50_token_ms": ms(all_gaps, 0.5), "p99_token_ms": ms(all_gaps, 0.99),
        "token_ms_by_transport": {kind: {"p50": ms(g, 0.5), "p99": ms(g, 0.99), "gaps": len(g)}
                                  for kind, g in tally.gaps_ms.items()},
        "wall_s": round(wall_s, 1), "warmup_s": round(warm_at - started, 1),
        "rss_mib": {name: {"after_warmup": warm[name], "end": end[name],
                           "growth": None if warm[name] is None or end[name] is None
                           else round(end[name] - warm[name], 1)} for name in pids},
        "rss_mib_timeline": timeline,
        "exit_codes": codes, "slow_consumers": slow, "abusers": refused,
    }  # fmt: skip


def format_report(report: dict) -> str:
    lines = [
        f"{report['sessions']} sessions ({report['http_sessions']} HTTPS, {report['mqtt_sessions']} MQTT over TLS) "
        f"for {report['wall_s']:g} s",
        f"requests: {report['requests_done']} done, {report['requests_failed']} failed",
        f"tokens: {report['tokens']} ({report['tokens_per_s']} tokens/s; "
        f"{report['tokens_per_s_after_warmup']} after warm-up)",
        f"per token: p50 {report['p50_token_ms']} ms, p99 {report['p99_token_ms']} ms ("
        + ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in report["token_ms_by_transport"].items()) + ")",
        f"resident memory, MiB (after warm-up at {report['warmup_s']} s -> end):",
    ]
    for name, rss in report["rss_mib"].items():
        lines.append(f"  {name}: {rss['after_warmup']} -> {rss['end']} ({rss['growth']:+})"
                     if rss["growth"] is not None else f"  {name}: {rss}")
    lines += [f"  error: {e}" for e in report["errors"]]
    for name, counts in (report.get("abusers") or {}).items():
        lines.append(f"abusive {name}: " + ", ".join(f"{kind} {n}" for kind, n in counts.items()))
    if slow := report.get("slow_consumers"):
        lines.append(f"slow consumers: victims' per-token p99 {slow['stalled_p99_ms']} ms beside a stalled HTTP "
                     f"client and device, {slow['baseline_p99_ms']} ms beside reading ones: "
                     f"ratio of medians {slow['p99_ratio']}")
    return "\n".join(lines)


def summary_line(elapsed: float, tally: Tally) -> str:
    return f"  {elapsed:5.0f} s: {tally.done} done, {tally.failed} failed, {tally.tokens} tokens"



def add_parser(sub) -> None:
    p = add_command(sub, "soak", run, "concurrent HTTPS and MQTT-over-TLS sessions for minutes: failures, "
                    "tokens/s, per-token p50/p99, memory growth of each process")
    add_model_plan(p)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the sessions run, minutes (default 10)")
    p.add_argument("--sessions", type=int, default=30, help="concurrent sessions, half HTTP, half MQTT (default 30)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process (default 1)")
    p.add_argument("--secrets", help="`splitglm secrets` folder with logins soak-dev-0..., soak-staller and "
                   "soak-abuser (default: made anew)")
    p.add_argument("--no-slow-consumers", action="store_true", help="skip the phase with a stalled HTTP client and "
                   "a stalled device (their effect on other sessions' per-token p99)")
    p.add_argument("--abusers", action="store_true", help="beside the honest sessions: one device over its fair "
                   "share (sessions held, a flood of first frames), one client reconnecting with the edge's client id "
                   "(a wrong password, another login), one API key over its limits; their refusals counted by kind")
    p.add_argument("--json", action="store_true", help="print the JSON report")


def run(args: argparse.Namespace) -> int:
    def progress(elapsed, tally):
        if not args.json and int(elapsed) % 30 == 0:
            print(summary_line(elapsed, tally), file=sys.stderr, flush=True)

    report = bench_soak(plan_of(args), args.minutes, args.sessions, args.max_tokens, args.threads, args.secrets,
                        progress, not args.no_slow_consumers, args.abusers)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["requests_failed"] == 0 else 1
