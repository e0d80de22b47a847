"""Baselines on the same topology as a split: "why not just send the prompt to the cloud?"

Every system runs on the one live rig (``splitglm.system``, ``splitglm.live``): real processes on
loopback, each link a ``splitglm.linkproxy.DelayProxy`` of the topology's RTT and bandwidth, and each
tier's compute time-dilated to its ``speed_factor`` (``partitioner.plan.live.LiveRun.dilate``).

- ``cloud-only``: the prompt's UTF-8 text goes from the device over both links (a device_edge proxy,
  then an edge_cloud one: the edge relays) to one process holding the whole model, which streams the
  tokens back. That process is an ``edge_node`` serving its own HTTP session (``/v1/completions``,
  streamed, greedy) on a plan cut at L, L whose fast tail is the exact norm + head, asked for policy
  "fast": every step runs there (its ``cloud_service`` holds the head too, unused);
- ``edge-only``: the same server behind device_edge alone, at the edge's speed;
- ``device-only``: the whole model in this process (the owner's decode loop over the head, in-process),
  no link; ``fits`` says whether its fp32 weights fit the device's ``memory_mb`` (measured anyway);
- ``split-accurate``: the planned split on ``splitglm.live.system_rig`` (broker, cloud and edge
  processes; the device tier here over the device agent's MQTT link);
- ``split-fast``: the same processes with policy "fast": the edge's fast tail (the plan's default,
  ``FAST_COMPRESSION``) finishes each token instead of the cloud.

Times: TTFT from the device sending the request to the first token arriving there; per-token = the gap
between consecutive tokens' arrivals. Dilation: a split step carries each tier's compute
(``splitglm.live.step_record``); the whole-model server reports its time to the first token and its
mean time per token (the response's ``splitglm.timings_ms``), which stand for the compute of step 0 and
of each later step; device-only is all compute. The whole-model systems run PyTorch fp32 whatever the
tier's backend. The HTTP server stops at the model's end-of-text token and streams a token only once it
makes text (the other systems run all 1 + decode_steps steps): its tokens are compared as a prefix.
Bytes are what the device's link proxy carried, both ways: the HTTP request and its streamed answer for
the whole-model servers, MQTT packets (frames, answers, acknowledgements) for the split.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from partitioner.plan.fast_tail import DEFAULT_FAST_TAIL
from partitioner.plan.live import LiveRun
from partitioner.plan.topology import Topology, load_topology

from ..linkproxy import DelayProxy
from .stats import median, percentile

logger = logging.getLogger(__name__)

FAST_COMPRESSION = DEFAULT_FAST_TAIL  # split-fast's fast tail: the default an exported candidate gets
NO_SPECULATION = ("--speculate", "false", "--probe-interval-s", "0")  # the whole-model server: one token per step
REQUEST_TIMEOUT_S = 600.0


@dataclass
class Measured:
    """One request: its tokens and dilated step times (a ``LiveRun``), bytes on the device's link."""

    run: LiveRun
    up_bytes: int
    down_bytes: int


# ---- the whole model in one process ---------------------------------------------------------------


class DeviceModel:
    """The whole model in this process (the device's): text or ids in, greedy tokens and step times out."""

    def __init__(self, model: str):
        from runtime.checkpoint import load_spec, load_tokenizer
        from runtime.segment import Segment

        L = load_spec(model).num_layers
        self.owner = Segment.from_checkpoint(model, 0, L, embed=True)
        self.head = Segment.from_checkpoint(model, L, L, head=True)
        self.tokenizer = load_tokenizer(model)
        self.weight_bytes = sum(p.numel() * p.element_size() for s in (self.owner, self.head) for p in s.parameters())

    def run(self, decode_steps: int, text: str | None = None, ids: list[int] | None = None) -> LiveRun:
        """1 + decode_steps greedy tokens of ``text`` (tokenized here, as the HTTP server does) or ``ids``."""
        from protos import splitglm_pb2 as pb
        from runtime.local import LocalTail
        from runtime.owner import Generation

        t0 = time.perf_counter()
        ids = self.tokenizer.encode(text) if text is not None else ids
        tokenize_ms = (time.perf_counter() - t0) * 1e3
        generation = Generation(self.owner, LocalTail([self.head]), list(ids),
                                pb.GenerationParams(max_tokens=decode_steps + 1), "fp32", tokenizer=None)
        tokens = [event.token for event in generation]
        walls = [s["owner"] + s["downstream"] for s in generation.step_timings]
        walls[0] += tokenize_ms
        return LiveRun(tokens, [{"wall_ms": w, "compute_ms": {"device": w}} for w in walls])


def whole_model_plan(model: str, out: Path) -> Path:
    """A plan cut at L, L with the exact fast tail: an edge running policy "fast" computes every step alone."""
    from partitioner.plan.export import export_plan, fixed_plan
    from runtime.checkpoint import load_spec

    L = load_spec(model).num_layers
    export_plan(model, fixed_plan((L, L), ("fp32", "fp32"), fast_tail="none"), out)
    return out


def completion_request(address: str, text: str, decode_steps: int) -> urllib.request.Request:
    """The device's request to the whole-model server: the prompt's text, greedy, streamed, all on the server."""
    body = {"prompt": text, "max_tokens": decode_steps + 1, "temperature": 0, "stream": True, "policy": "fast",
            "speculate": False}
    return urllib.request.Request(f"http://{address}/v1/completions", json.dumps(body).encode(),
                                  {"Content-Type": "application/json"})


def http_run(address: str, text: str, decode_steps: int, tier: str) -> LiveRun:
    """One streamed completion: a step per text chunk's arrival; compute from the server's own timings."""
    stamps, info = [], None
    started = time.perf_counter()
    with urllib.request.urlopen(completion_request(address, text, decode_steps), timeout=REQUEST_TIMEOUT_S) as r:
        for line in r:
            if line.startswith(b"data: {"):
                now, chunk = time.perf_counter(), json.loads(line[len(b"data: "):])
                if "splitglm" in chunk:
                    info = chunk["splitglm"]
                else:
                    stamps.append(now)
    if info is None or not stamps:
        raise RuntimeError(f"the whole-model server's stream ended without tokens ({len(stamps)} chunks)")
    server = info["timings_ms"]
    compute = [server["ttft"]] + [server["per_token"]] * (len(stamps) - 1)
    times = [started, *stamps]
    walls = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    # chunks that arrive together have gaps shorter than the server's mean per token: a step's compute is
    # never more than its wall time (else dilating a fast tier would make the step negative)
    return LiveRun(list(info["tokens"]), [{"wall_ms": w, "compute_ms": {tier: min(c, w)}}
                                          for w, c in zip(walls, compute)])


def _proxies(stack: ExitStack, target: str, topo: Topology, links: tuple[str, ...]) -> DelayProxy:
    """``links`` of ``topo`` in a row in front of ``target`` (HOST:PORT); the first, the device's, returned."""
    for name in reversed(links):
        host, _, port = target.rpartition(":")
        link = topo.links[name]
        proxy = DelayProxy(host, int(port), link.rtt_ms, bandwidth_mbit_s=link.bandwidth_mbit_s).start()
        stack.callback(proxy.stop)
        target = proxy.address
    return proxy


# ---- measuring --------------------------------------------------------------------------------------


def _settled(proxy: DelayProxy, quiet_s: float = 0.05, limit_s: float = 2.0) -> dict[str, int]:
    """The proxy's byte counts once nothing has crossed it for ``quiet_s`` (a split generation's close frame
    leaves after its last token)."""
    seen, deadline = dict(proxy.carried), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = dict(proxy.carried)
        if now == seen:
            break
        seen = now
    return seen


def _measured(proxy: DelayProxy | None, topo: Topology, once) -> Measured:
    """``once()`` (a ``LiveRun``), dilated, with the bytes ``proxy`` (the device's link) carried meanwhile."""
    if proxy is None:
        return Measured(once().dilate(topo), 0, 0)
    before = dict(proxy.carried)
    run = once().dilate(topo)
    after = _settled(proxy)
    return Measured(run, after["up"] - before["up"], after["down"] - before["down"])


def _repeat(repeats: int, proxy: DelayProxy | None, topo: Topology, once) -> list[Measured]:
    """One warm-up run (first-call overheads), then ``repeats`` measured ones (``_measured``)."""
    once()
    return [_measured(proxy, topo, once) for _ in range(repeats)]


def _row(system: str, topo: Topology, runs: list[Measured], leaves: str, fits: bool, equal: bool) -> dict:
    decode = [s["measured_ms"] for r in runs for s in r.run.steps[1:]]
    ttfts = [r.run.ttft_ms for r in runs]
    return {
        "system": system,
        "topology": topo.name,
        "ttft_ms": round(median(ttfts), 3),
        "per_token_p50_ms": round(percentile(decode, 0.5), 3),
        "per_token_p99_ms": round(percentile(decode, 0.99), 3),
        "ttft_spread_ms": [round(min(ttfts), 3), round(max(ttfts), 3)],
        "uplink_bytes": int(median(r.up_bytes for r in runs)),
        "downlink_bytes": int(median(r.down_bytes for r in runs)),
        "leaves_device": leaves,
        "fits": fits,
        "repeats": len(runs),
        "tokens_equal_whole_model": equal,
        "tokens": list(runs[0].run.tokens),  # the first measured run's
    }


def _prefix_of(tokens: list[int], reference: list[int]) -> bool:
    return bool(tokens) and tokens == reference[: len(tokens)]


def whole_model_rows(model: str, topo: Topology, text: str, decode_steps: int, repeats: int, threads: int,
                     text_tokens: list[int]) -> list[dict]:
    """edge-only and cloud-only: the whole-model server behind the device's links to that tier."""
    from ..system import LocalSystem

    rows = []
    with tempfile.TemporaryDirectory(prefix="splitglm-baselines-") as folder, ExitStack() as stack:
        plan = str(whole_model_plan(model, Path(folder) / "plan"))
        system = stack.enter_context(LocalSystem(plan, mqtt=False, threads=threads, edge_args=NO_SPECULATION))
        server = system.http.split("://", 1)[-1]
        for tier, links in (("edge", ("device_edge",)), ("cloud", ("device_edge", "edge_cloud"))):
            proxy = _proxies(stack, server, topo, links)
            runs = _repeat(repeats, proxy, topo, partial(http_run, proxy.address, text, decode_steps, tier))
            equal = all(_prefix_of(r.run.tokens, text_tokens) for r in runs)
            rows.append(_row(f"{tier}-only", topo, runs, "raw text (TLS-encrypted in transit)", True, equal))
    return rows


def split_rows(model: str, topo: Topology, split: dict, ids: list[int], decode_steps: int, repeats: int,
               threads: int, reference: list[int]) -> list[dict]:
    """split-accurate and split-fast: the planned split on the system rig, the cloud's tail or the edge's."""
    from ..live import system_rig

    k1 = split["splits"][0]
    leaves = f"hidden states of layer {k1}, encoded with {split['codecs']['device_edge']} (TLS-encrypted)"
    rows = []
    with system_rig(model, topo, split, threads) as live:
        for system, policy in (("split-accurate", "accurate"), ("split-fast", "fast")):
            runs = _repeat(repeats, live.link, topo, partial(live.run, ids, decode_steps, policy))
            rows.append(_row(system, topo, runs, leaves, True, all(r.run.tokens == reference for r in runs)))
    return rows


def bench_baselines(model: str, topology_path: str, split: dict, prompt_tokens: int = 96, decode_steps: int = 16,
                    repeats: int = 3, threads: int = 1, seed: int = 0) -> list[dict]:
    """Rows for device-only, edge-only, cloud-only, split-accurate and split-fast on one topology.

    ``split``: {"splits": [k1, k2], "codecs": {link: codec}, "compression": {tier: name}} (a plan's
    chosen candidate). The prompt is ``prompt_tokens`` seeded random ids: as text (the tokenizer's
    decoding) for the whole-model systems, as the ids themselves for the split ones."""
    from runtime.checkpoint import load_spec

    model, topo = str(model), load_topology(topology_path)
    spec = load_spec(model)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # the device's whole model, in this process
    try:
        device = DeviceModel(model)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, min(spec.vocab_size, len(device.tokenizer)), (prompt_tokens,), generator=gen).tolist()
        text = device.tokenizer.decode(ids)
        reference = device.run(decode_steps, ids=ids).tokens  # the whole model on the same ids
        runs = _repeat(repeats, None, topo, partial(device.run, decode_steps, text=text))
        fits = device.weight_bytes <= topo.tiers["device"].memory_mb * 2**20
        del device
    finally:
        torch.set_num_threads(torch_threads)
    text_tokens = runs[0].run.tokens
    rows = [_row("device-only", topo, runs, "nothing", fits, True)]
    rows += whole_model_rows(model, topo, text, decode_steps, repeats, threads, text_tokens)
    rows += split_rows(model, topo, split, ids, decode_steps, repeats, threads, reference)
    for row in rows:
        row.update(prompt_tokens=prompt_tokens, decode_steps=decode_steps, prompt_text_bytes=len(text.encode("utf-8")))
    return rows
