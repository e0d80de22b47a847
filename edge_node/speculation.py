"""How many tokens the edge drafts before the cloud verifies them (pure functions and one small estimator).

A round of speculative split decoding: the owner runs its layers on the last committed token and on g
drafted ones (g + 1 owner steps), the edge's fast tail drafts g tokens, and the cloud verifies the g + 1
positions in one step. With each draft accepted with probability alpha, as long as the ones before it
were (the standard model of speculative decoding), a round yields on average

    E(g) = (1 - alpha^(g+1)) / (1 - alpha)          tokens (g + 1 when alpha = 1)

and takes

    T(g) = (g + 1) * owner + g * draft + rtt + verify + g * verify_row     milliseconds

(owner: the owner's step and its hops to the edge; draft: a fast-tail step; rtt: the edge-cloud round
trip; verify: the cloud's step; verify_row: what each extra verified position adds to it). The edge
maximises the expected accurate tokens per second, E(g) / T(g), over 0 <= g <= max_draft; g = 0 is the
plain accurate path (one token per round trip), chosen whenever no g > 0 beats it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundCosts:
    """What one round costs, milliseconds (see the module docstring)."""

    owner_ms: float
    draft_ms: float
    rtt_ms: float
    verify_ms: float
    verify_row_ms: float = 0.0


def expected_tokens(alpha: float, g: int) -> float:
    """Mean tokens a round of g drafts yields (accepted drafts + the cloud's own token)."""
    if alpha >= 1.0:
        return g + 1.0
    return (1.0 - alpha ** (g + 1)) / (1.0 - alpha)


def round_ms(costs: RoundCosts, g: int) -> float:
    c = costs
    return (g + 1) * c.owner_ms + g * c.draft_ms + c.rtt_ms + c.verify_ms + g * c.verify_row_ms


def tokens_per_s(alpha: float, costs: RoundCosts, g: int) -> float:
    return 1e3 * expected_tokens(alpha, g) / max(round_ms(costs, g), 1e-6)


def best_draft(alpha: float, costs: RoundCosts, max_draft: int, at_least: int = 0) -> int:
    """The g in [at_least, max_draft] with the most expected tokens per second (0, with at_least 0, unless
    speculating beats it by more than 2%)."""
    rates = {g: tokens_per_s(alpha, costs, g) for g in range(at_least, max_draft + 1)}
    best = max(rates, key=lambda g: (rates[g], -g))
    if at_least == 0 and rates[best] <= rates[0] * 1.02:  # a margin: not for a 2% gain
        return 0
    return best


class Acceptance:
    """Per-draft acceptance probability, estimated from verifications (thread-safe).

    A verification of g drafts that accepted a of them saw a successes and, when a < g, one failure (the
    first rejected draft; the ones after it were never judged). alpha = successes / trials, starting from a
    prior worth ``prior_weight`` trials at ``prior``, everything decayed by ``decay`` per verification.
    """

    def __init__(self, prior: float = 0.8, prior_weight: float = 4.0, decay: float = 0.95):
        self.decay = decay
        self._successes, self._trials = prior * prior_weight, prior_weight
        self._lock = threading.Lock()

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        with self._lock:
            self._successes = self._successes * self.decay + accepted
            self._trials = self._trials * self.decay + accepted + (1 if accepted < drafted else 0)

    @property
    def alpha(self) -> float:
        with self._lock:
            return min(max(self._successes / max(self._trials, 1e-9), 0.0), 0.999)
