"""Choose the cuts k1 <= k2, the codec on each link and each segment's compression.

What it minimises, for the topology's workload mix (weights w_i, prompt P_i,
output N_i tokens):

    E[latency] = sum_i w_i * (TTFT(P_i) + (N_i - 1) * per_token) / sum_i w_i

    TTFT(P)   = device prefill [0, k1) of P tokens (with the embedding)
              + send P rows device->edge + edge prefill [k1, k2)
              + send P rows edge->cloud + cloud prefill [k2, L) + head
              + one round trip on each link (frames out, the token back)
    per_token = the same for one position (decode steps) -- one round trip
                per token, as the session owner drives the loop

    send n rows = n * hidden_size * bytes_per_element(codec) * 8 / bandwidth

subject to: the device running at least ``min_device_layers`` layers (no raw
token embedding leaves it), each tier's weights + KV caches (``context_tokens`` positions,
``max_sessions`` sessions) within its ``memory_mb`` (the edge also holds
[0, k1) to serve HTTP clients), and the summed perplexity increase of the
two codecs and the compression of each segment within the quality floor.
The space (L + 1)(L + 2) / 2 cut pairs x codecs^2 x compressions^3 is small
enough to search exhaustively.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from partitioner.plan.profiler import Profile
from partitioner.plan.topology import TIERS, Link, Tier, Topology

MIB = 1024 * 1024


@dataclass(frozen=True)
class CodecCost:
    name: str
    bytes_per_element: float  # prefill frames
    step_bytes_per_element: float  # one-position frames
    perplexity_delta_pct: float  # with this codec on ONE link


@dataclass(frozen=True)
class CompressionCost:
    """A compression choice, measured: its profile on this machine and its accuracy cost per layer."""

    name: str
    profile: Profile
    perplexity_delta_pct_per_layer: float
    cpu_decode: str = "eager"  # the CPU decode path the profile was measured on (runtime.cpu_decode)


@dataclass
class Candidate:
    splits: tuple[int, int]
    codecs: dict[str, str]
    compression: dict[str, str]
    ttft_ms: float
    per_token_ms: float
    expected_ms: float
    link_bytes_per_token: dict[str, float]
    perplexity_delta_pct: float
    memory_mb: dict[str, float] = field(default_factory=dict)
    cpu_decode: dict[str, str] = field(default_factory=dict)  # device / edge: eager or compiled


class Costs:
    """Prefix sums of one profile, so any layer range costs O(1): ``prefill[b] - prefill[a]``."""

    def __init__(self, profile: Profile, num_layers: int):
        self.profile = profile
        layers = [profile.layers[i] for i in range(num_layers)]
        self.prefill = list(itertools.accumulate((c.prefill_ms_per_token for c in layers), initial=0.0))
        self.decode = list(itertools.accumulate((c.decode_ms for c in layers), initial=0.0))
        self.weights = list(itertools.accumulate((c.weight_bytes for c in layers), initial=0))
        self.hidden_size = profile.hidden_size

    def compute_ms(
        self, tier: Tier, a: int, b: int, tokens: int, decode: bool, embed: bool = False, head: bool = False
    ) -> float:
        """Predicted time of layers [a, b) on ``tier`` for ``tokens`` new positions (1 when decoding)."""
        p = self.profile
        if decode:
            ms = self.decode[b] - self.decode[a]
            ms += (p.embed.decode_ms if embed and p.embed else 0.0) + (p.head.decode_ms if head and p.head else 0.0)
        else:
            ms = (self.prefill[b] - self.prefill[a]) * tokens
            ms += p.embed.prefill_ms_per_token * tokens if embed and p.embed else 0.0
            ms += p.head.decode_ms if head and p.head else 0.0  # the head runs on the last position only
        return ms / tier.speed_factor

    def memory_mb(self, tier: Tier, a: int, b: int, context: int, embed: bool = False, head: bool = False) -> float:
        """Weights of layers [a, b) (+ embedding / head) and KV caches of ``tier.max_sessions`` sessions."""
        p = self.profile
        weights = self.weights[b] - self.weights[a]
        weights += (p.embed.weight_bytes if embed and p.embed else 0) + (p.head.weight_bytes if head and p.head else 0)
        kv = p.kv_bytes_per_token_per_layer * (b - a) * context * tier.max_sessions
        return (weights + kv) / MIB


def send_ms(link: Link, rows: int, hidden_size: int, bytes_per_element: float) -> float:
    """Serialisation time of ``rows`` hidden-state rows on ``link`` (propagation is in the RTT)."""
    return rows * hidden_size * bytes_per_element * 8 / (link.bandwidth_mbit_s * 1e3)


def _latency(
    topo: Topology,
    costs: dict[str, Costs],
    k1: int,
    k2: int,
    L: int,
    codecs: tuple[CodecCost, CodecCost],
    tokens: int,
    decode: bool,
) -> float:
    """Owner -> device -> edge -> cloud -> token back to the owner, for ``tokens`` new positions."""
    t = topo.tiers
    C = costs["device"].hidden_size
    de, ec = topo.links["device_edge"], topo.links["edge_cloud"]
    bpe = [c.step_bytes_per_element if decode else c.bytes_per_element for c in codecs]
    return (
        costs["device"].compute_ms(t["device"], 0, k1, tokens, decode, embed=True)
        + send_ms(de, tokens, C, bpe[0])
        + de.rtt_ms
        + costs["edge"].compute_ms(t["edge"], k1, k2, tokens, decode)
        + send_ms(ec, tokens, C, bpe[1])
        + ec.rtt_ms
        + costs["cloud"].compute_ms(t["cloud"], k2, L, tokens, decode, head=True)
    )


def evaluate_candidate(
    topo: Topology,
    costs: dict[str, Costs],
    splits: tuple[int, int],
    codecs: tuple[CodecCost, CodecCost],
    compression: dict[str, CompressionCost],
    num_layers: int,
) -> Candidate | None:
    """Predicted times of one choice, or None when it breaks a memory cap or the quality floor."""
    k1, k2 = splits
    L = num_layers
    compute_layers = {"device": k1, "edge": k2 - k1, "cloud": L - k2}
    quality = sum(max(c.perplexity_delta_pct, 0.0) for c in codecs) + sum(
        max(compression[t].perplexity_delta_pct_per_layer, 0.0) * compute_layers[t] for t in compression
    )
    if quality > topo.max_perplexity_increase_pct:
        return None
    ctx = topo.context_tokens
    memory = {  # the edge also holds [0, k1) with the embedding, to serve HTTP clients itself
        "device": costs["device"].memory_mb(topo.tiers["device"], 0, k1, ctx, embed=True),
        "edge": costs["edge"].memory_mb(topo.tiers["edge"], 0, k2, ctx, embed=True),
        "cloud": costs["cloud"].memory_mb(topo.tiers["cloud"], k2, L, ctx, head=True),
    }
    if any(memory[t] > topo.tiers[t].memory_mb for t in memory):
        return None
    total_w = sum(w.weight for w in topo.workload)
    per_token = _latency(topo, costs, k1, k2, L, codecs, 1, decode=True)
    ttfts = {w.prompt_tokens: _latency(topo, costs, k1, k2, L, codecs, w.prompt_tokens, False) for w in topo.workload}
    expected = (
        sum(w.weight * (ttfts[w.prompt_tokens] + (w.output_tokens - 1) * per_token) for w in topo.workload) / total_w
    )
    C = costs["device"].hidden_size
    return Candidate(
        splits=splits,
        codecs={"device_edge": codecs[0].name, "edge_cloud": codecs[1].name},
        compression={t: c.name for t, c in compression.items()},
        ttft_ms=sum(w.weight * ttfts[w.prompt_tokens] for w in topo.workload) / total_w,
        per_token_ms=per_token,
        expected_ms=expected,
        link_bytes_per_token={
            "device_edge": C * codecs[0].step_bytes_per_element,
            "edge_cloud": C * codecs[1].step_bytes_per_element,
        },
        perplexity_delta_pct=quality,
        memory_mb=memory,
        cpu_decode={t: c.cpu_decode for t, c in compression.items() if t != "cloud"},
    )


def plan(
    topo: Topology,
    compressions: dict[str, list[CompressionCost]],
    codecs: list[CodecCost],
    num_layers: int,
    top: int = 8,
) -> list[Candidate]:
    """The best feasible choices (lowest expected latency first), at most ``top``; exhaustive search."""
    tiers = list(TIERS)
    costs = {(t, c.name): Costs(c.profile, num_layers) for t in tiers for c in compressions[t]}
    found = []
    for combo in itertools.product(*(compressions[t] for t in tiers)):
        chosen = dict(zip(tiers, combo))
        tier_costs = {t: costs[t, chosen[t].name] for t in tiers}
        first = min(topo.min_device_layers, num_layers)
        for k1, k2 in ((a, b) for a in range(first, num_layers + 1) for b in range(a, num_layers + 1)):
            runs = {"device": k1, "edge": k2 - k1, "cloud": num_layers - k2}
            if any(runs[t] == 0 and chosen[t].name != "none" for t in tiers):
                continue  # compressing a tier that runs no layer changes nothing: listed once, as "none"
            for pair in itertools.product(codecs, repeat=2):
                candidate = evaluate_candidate(topo, tier_costs, (k1, k2), pair, chosen, num_layers)
                if candidate is not None:
                    found.append(candidate)
    found.sort(key=lambda c: (round(c.expected_ms, 6), c.perplexity_delta_pct))  # ties: the more accurate
    return found[:top]
