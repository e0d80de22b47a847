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

subject to: each tier's weights + KV caches (``context_tokens`` positions,
``max_sessions`` sessions) within its ``memory_mb`` (the edge also holds
[0, k1) to serve HTTP clients), and the summed perplexity increase of the
two codecs and the compression of each segment within the quality floor.
The space (L + 1)(L + 2) / 2 cut pairs x codecs^2 x compressions^3 is small
enough to search exhaustively.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .profiler import Profile, StageCost
from .topology import Link, Tier, Topology

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


def _stage_ms(cost: StageCost | None, tokens: int, decode: bool) -> float:
    if cost is None:
        return 0.0
    return cost.decode_ms if decode else cost.prefill_ms_per_token * tokens


def segment_ms(profile: Profile, tier: Tier, layers: range, tokens: int, decode: bool,
               embed: bool = False, head: bool = False) -> float:
    """Predicted time of a segment on ``tier`` for ``tokens`` new positions (1 when decoding)."""
    ms = sum(_stage_ms(profile.layers[i], tokens, decode) for i in layers)
    ms += _stage_ms(profile.embed, tokens, decode) if embed else 0.0
    ms += _stage_ms(profile.head, 1, decode) if head else 0.0  # the head runs on the last position only
    return ms / tier.speed_factor


def send_ms(link: Link, rows: int, hidden_size: int, bytes_per_element: float) -> float:
    return rows * hidden_size * bytes_per_element * 8 / (link.bandwidth_mbit_s * 1e3)


def segment_memory_mb(profile: Profile, layers: range, tier: Tier, context: int,
                      embed: bool = False, head: bool = False) -> float:
    weights = sum(profile.layers[i].weight_bytes for i in layers)
    weights += profile.embed.weight_bytes if embed and profile.embed else 0
    weights += profile.head.weight_bytes if head and profile.head else 0
    kv = profile.kv_bytes_per_token_per_layer * len(layers) * context * tier.max_sessions
    return (weights + kv) / MIB


def _latency(topo: Topology, prof: dict[str, Profile], k1: int, k2: int, L: int,
             codecs: tuple[CodecCost, CodecCost], tokens: int, decode: bool) -> float:
    t = topo.tiers
    C = prof["device"].hidden_size
    de, ec = topo.links["device_edge"], topo.links["edge_cloud"]
    bpe = [c.step_bytes_per_element if decode else c.bytes_per_element for c in codecs]
    return (
        segment_ms(prof["device"], t["device"], range(0, k1), tokens, decode, embed=True)
        + send_ms(de, tokens, C, bpe[0]) + de.rtt_ms
        + segment_ms(prof["edge"], t["edge"], range(k1, k2), tokens, decode)
        + send_ms(ec, tokens, C, bpe[1]) + ec.rtt_ms
        + segment_ms(prof["cloud"], t["cloud"], range(k2, L), tokens, decode, head=True)
    )


def evaluate_candidate(topo: Topology, profiles: dict[str, Profile], splits: tuple[int, int],
                       codecs: tuple[CodecCost, CodecCost], compression: dict[str, CompressionCost],
                       num_layers: int) -> Candidate | None:
    """Predicted times of one choice, or None when it breaks a memory cap or the quality floor."""
    k1, k2 = splits
    L = num_layers
    ranges = {"device": range(0, k1), "edge": range(0, k2), "cloud": range(k2, L)}
    memory = {
        tier: segment_memory_mb(profiles[tier], ranges[tier], topo.tiers[tier], topo.context_tokens,
                                embed=tier != "cloud", head=tier == "cloud")
        for tier in ranges
    }
    if any(memory[t] > topo.tiers[t].memory_mb for t in memory):
        return None
    compute_layers = {"device": k1, "edge": k2 - k1, "cloud": L - k2}
    quality = sum(c.perplexity_delta_pct for c in codecs) + sum(
        compression[t].perplexity_delta_pct_per_layer * compute_layers[t] for t in compression
    )
    if quality > topo.max_perplexity_increase_pct:
        return None
    total_w = sum(w.weight for w in topo.workload)
    per_token = _latency(topo, profiles, k1, k2, L, codecs, 1, decode=True)
    ttfts = {w.prompt_tokens: _latency(topo, profiles, k1, k2, L, codecs, w.prompt_tokens, False)
             for w in topo.workload}
    expected = sum(w.weight * (ttfts[w.prompt_tokens] + (w.output_tokens - 1) * per_token)
                   for w in topo.workload) / total_w
    C = profiles["device"].hidden_size
    return Candidate(
        splits=splits,
        codecs={"device_edge": codecs[0].name, "edge_cloud": codecs[1].name},
        compression={t: c.name for t, c in compression.items()},
        ttft_ms=sum(w.weight * ttfts[w.prompt_tokens] for w in topo.workload) / total_w,
        per_token_ms=per_token,
        expected_ms=expected,
        link_bytes_per_token={"device_edge": C * codecs[0].step_bytes_per_element,
                              "edge_cloud": C * codecs[1].step_bytes_per_element},
        perplexity_delta_pct=quality,
        memory_mb=memory,
    )


def plan(topo: Topology, compressions: dict[str, list[CompressionCost]], codecs: list[CodecCost],
         num_layers: int, top: int = 8) -> list[Candidate]:
    """Every feasible choice, best (lowest expected latency) first; at most ``top`` of them."""
    found = []
    tiers = list(compressions)
    for k1, k2 in ((a, b) for a in range(num_layers + 1) for b in range(a, num_layers + 1)):
        for pair in itertools.product(codecs, repeat=2):
            for combo in itertools.product(*(compressions[t] for t in tiers)):
                chosen = dict(zip(tiers, combo))
                profiles = {t: chosen[t].profile for t in tiers}
                candidate = evaluate_candidate(topo, profiles, (k1, k2), pair, chosen, num_layers)
                if candidate is not None:
                    found.append(candidate)
    found.sort(key=lambda c: c.expected_ms)
    return found[:top]
