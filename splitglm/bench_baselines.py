"""Baselines on the same topology as a split: "why not just send the prompt to the cloud?"

Every system runs with the live rig's link shaping and time dilation
(``partitioner.plan.live``): a message's sender pays RTT/2 + bytes x 8 /
bandwidth, and each tier's compute is rescaled to its ``speed_factor``.

- ``cloud-only``: the prompt's UTF-8 text goes from the device over both links
  (the edge relays) to the whole model on the cloud tier, which drives its own
  decode loop and streams each token back; the stream is shaped by a sender
  thread (``StreamSender``), so the links delay delivery, not the next step.
- ``edge-only``: the same with the whole model on the edge, over device_edge.
- ``device-only``: the whole model on the device, no link; ``fits`` says
  whether its fp32 weights fit the device's ``memory_mb`` (measured anyway).
- ``split-accurate``: the planned split through ``LiveChain``.
- ``split-fast``: the edge finishing alone with an int8 copy of the cloud's
  layers (see ``fast_split_topology``).

Times: TTFT from the device sending the request to the first token arriving
there; per-token = the gap between consecutive tokens' arrivals (a streamed
token i arrives at wall time t_i; dilated, t_i + (1 / speed_factor - 1) x the
compute of steps 0..i). The whole-model baselines run PyTorch fp32 whatever
the tier's backend; the relay's forwarding is not dilated (it computes nothing).
Bytes are counted on the device's socket, length prefixes included.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from partitioner.plan.live import LiveChain, dilated_ms
from partitioner.plan.live_tiers import (
    TIER_NAMES,
    ShapedConn,
    _connect,
    _relay_main,
    _TierConfig,
    _whole_main,
    decode_token,
    encode_request,
)
from partitioner.plan.topology import Topology, load_topology

logger = logging.getLogger(__name__)

HUGE_BANDWIDTH_MBIT_S = 1e9  # a link whose serialisation time is nil
FAST_COMPRESSION = "int8"  # split-fast's copy of the cloud layers on the edge (the demo plan's fast-tail default)


@dataclass
class Measured:
    """One request: greedy tokens, dilated TTFT and decode-step times, bytes on the device's link."""

    tokens: list[int]
    ttft_ms: float
    decode_ms: list[float]
    up_bytes: int
    down_bytes: int


class WholeModelRig(LiveChain):
    """The whole model in one process on ``tier``; this process is the device and sends it requests.

    For the cloud an edge process relays. Reuses ``LiveChain``'s process watching (``_expect``) and
    stopping (``close``); ``weight_bytes`` is what the loaded model's parameters occupy."""

    def __init__(self, model: str, topo: Topology, tier: str, threads: int = 1):
        from runtime.checkpoint import load_spec

        L = load_spec(model).num_layers
        link = {n: {"bandwidth_mbit_s": topo.links[n].bandwidth_mbit_s, "rtt_ms": topo.links[n].rtt_ms}
                for n in ("device_edge", "edge_cloud")}
        up = {"device": None, "edge": link["device_edge"], "cloud": link["edge_cloud"]}[tier]
        roles = {tier: (_whole_main, _TierConfig(tier, model, 0, L, "none", "", up, None, threads, whole=True))}
        if tier == "cloud":
            roles["edge"] = (_relay_main, _TierConfig("edge", model, 0, 0, "none", "", link["device_edge"],
                                                      link["edge_cloud"], threads))
        self.topo, self.tier, self.conn = topo, tier, None
        self.procs, self.pipes, self.inbox = {}, {}, {r: [] for r in TIER_NAMES}
        ctx = mp.get_context("spawn")
        try:
            for role, (target, cfg) in roles.items():
                parent, child = ctx.Pipe()
                p = ctx.Process(target=target, args=(cfg, child), daemon=True, name=f"splitglm-live-{role}")
                p.start()
                child.close()
                self.procs[role], self.pipes[role] = p, parent
            if tier != "device":
                ports = {r: self._expect(r, "port")[1] for r in roles}
                if tier == "cloud":
                    self.pipes["edge"].send(ports["cloud"])
                self.conn = ShapedConn(_connect(ports["edge"]), **link["device_edge"])
            self.weight_bytes = self._expect(tier, "ready")[1]
            if tier == "cloud":
                self._expect("edge", "ready")
        except BaseException:
            self.close()
            raise

    def run(self, request: bytes, decode_steps: int, timeout: float = 600.0) -> Measured:
        """Send one request (``encode_request``); 1 + decode_steps tokens come back."""
        if self.conn is None:
            self.pipes["device"].send(("run", request))
            out = self._expect("device", "result", timeout)[1]
            times = [dilated_ms(ms, {"device": ms}, self.topo) for _, ms in out]
            return Measured([t for t, _ in out], times[0], times[1:], 0, 0)
        sent, received = self.conn.sent_bytes, self.conn.recv_bytes
        t0 = time.perf_counter()
        self.conn.send(request)
        tokens, arrivals, compute = [], [], 0.0
        for _ in range(decode_steps + 1):
            data = self.conn.recv()
            if data is None:
                self._expect(self.tier, "result", 5.0)  # raises the tier's error
            token, _, ms = decode_token(data)
            wall, compute = (time.perf_counter() - t0) * 1e3, compute + ms
            tokens.append(token)
            arrivals.append(dilated_ms(wall, {self.tier: compute}, self.topo))
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return Measured(tokens, arrivals[0], gaps, self.conn.sent_bytes - sent, self.conn.recv_bytes - received)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        super().close()


def fast_split_topology(topo: Topology) -> Topology:
    """split-fast's topology: the edge's in-process fast tail approximated by a zero-delay loopback hop.

    edge_cloud gets rtt 0 and a huge bandwidth, and the "cloud" runs at the edge's speed, so the cloud
    process stands for the edge running the cloud's layers (int8) itself; what remains of the hop is
    a loopback socket and protobuf (de)serialisation, well under a millisecond per step."""
    fast = topo.model_copy(deep=True)
    fast.links["edge_cloud"].rtt_ms = 0.0
    fast.links["edge_cloud"].bandwidth_mbit_s = HUGE_BANDWIDTH_MBIT_S
    fast.tiers["cloud"].speed_factor = topo.tiers["edge"].speed_factor
    return fast


def _split_run(live: LiveChain, ids: list[int], decode_steps: int) -> Measured:
    run = live.run(ids, decode_steps)
    link = run.steps[0]["link_bytes"]
    return Measured(run.tokens, run.ttft_ms, [s["measured_ms"] for s in run.steps[1:]], link["up"], link["down"])


def _repeat(once, repeats: int) -> list[Measured]:
    """One warm-up run (first-call overheads), then ``repeats`` measured ones."""
    once()
    return [once() for _ in range(repeats)]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def _row(system: str, topo: Topology, runs: list[Measured], leaves: str, fits: bool, equal: bool) -> dict:
    decode = [ms for r in runs for ms in r.decode_ms]
    ttfts = [r.ttft_ms for r in runs]
    return {
        "system": system,
        "topology": topo.name,
        "ttft_ms": round(statistics.median(ttfts), 3),
        "per_token_p50_ms": round(_percentile(decode, 50), 3),
        "per_token_p99_ms": round(_percentile(decode, 99), 3),
        "ttft_spread_ms": [round(min(ttfts), 3), round(max(ttfts), 3)],
        "uplink_bytes": int(statistics.median(r.up_bytes for r in runs)),
        "downlink_bytes": int(statistics.median(r.down_bytes for r in runs)),
        "leaves_device": leaves,
        "fits": fits,
        "repeats": len(runs),
        "tokens_equal_whole_model": equal,
    }


def bench_baselines(model: str, topology_path: str, split: dict, prompt_tokens: int = 96, decode_steps: int = 16,
                    repeats: int = 3, threads: int = 1, seed: int = 0) -> list[dict]:
    """Rows for device-only, edge-only, cloud-only, split-accurate and split-fast on one topology.

    ``split``: {"splits": [k1, k2], "codecs": {link: codec}, "compression": {tier: name}} (a plan's
    chosen candidate). The prompt is ``prompt_tokens`` seeded random ids: as text (the tokenizer's
    decoding) for the whole-model systems, as the ids themselves for the split ones."""
    from runtime.checkpoint import load_spec, load_tokenizer

    model, topo = str(model), load_topology(topology_path)
    tokenizer, spec = load_tokenizer(model), load_spec(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(spec.vocab_size, len(tokenizer)), (prompt_tokens,), generator=gen).tolist()
    text = tokenizer.decode(ids)
    text_request = encode_request(decode_steps, text=text)
    rows = []
    with WholeModelRig(model, topo, "device", threads) as rig:
        reference = rig.run(encode_request(decode_steps, ids=ids), decode_steps).tokens  # whole model, same ids
        runs = _repeat(lambda: rig.run(text_request, decode_steps), repeats)
        fits = rig.weight_bytes <= topo.tiers["device"].memory_mb * 2**20
    text_tokens = runs[0].tokens
    rows.append(_row("device-only", topo, runs, "nothing", fits, True))
    for tier in ("edge", "cloud"):
        with WholeModelRig(model, topo, tier, threads) as rig:
            runs = _repeat(lambda: rig.run(text_request, decode_steps), repeats)
        equal = all(r.tokens == text_tokens for r in runs)
        rows.append(_row(f"{tier}-only", topo, runs, "raw text (TLS-encrypted in transit)", True, equal))
    k1 = split["splits"][0]
    leaves = f"hidden states of layer {k1}, encoded with {split['codecs']['device_edge']} (TLS-encrypted)"
    fast = {**split["compression"], "cloud": FAST_COMPRESSION}
    for system, t, compression in (("split-accurate", topo, split["compression"]),
                                   ("split-fast", fast_split_topology(topo), fast)):
        with LiveChain(model, t, split["splits"], split["codecs"], compression, threads) as live:
            runs = _repeat(lambda: _split_run(live, ids, decode_steps), repeats)
        rows.append(_row(system, topo, runs, leaves, True, all(r.tokens == reference for r in runs)))
    for row in rows:
        row.update(prompt_tokens=prompt_tokens, decode_steps=decode_steps, prompt_text_bytes=len(text.encode("utf-8")))
    return rows

