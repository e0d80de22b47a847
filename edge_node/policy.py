"""The router's policy: which path serves a request, and when to switch a running one (pure functions).

Paths: "accurate" (the cloud tail) and "fast" (the edge's fast tail). Policies,
per deployment and per request:

- ``accurate``: always the cloud tail (a cloud failure still ends on the fast path:
  that is the caller's fallback, flagged degraded, not a policy choice);
- ``fast``: always the fast tail;
- ``adaptive`` (default): the maths below, from ``edge_node.estimates``.

Budget: the whole completion's ``latency_budget_ms``, or a per-token budget b
which stands for b * max_tokens (``total_budget_ms``; given both, the smaller).

Choosing (``choose``), for P prompt tokens, N = max_tokens, budget B, margin m:

    A = accurate.predict(P, N, "high")      F = fast.predict(P, N, "high")
    no budget              -> accurate
    A * (1 + m) <= B       -> accurate  (fits with the margin)
    F < A                  -> fast      (accurate would not fit; fast is quicker)
    otherwise              -> accurate  (neither fits; fast would be no quicker)

Switching (``should_switch``), after n of N tokens in ``elapsed`` ms on the accurate
path (r = N - n tokens left, time left T = B - elapsed):

    stay   = r * accurate.step_high
    switch = fast.replay_high * (P + n - 1) + r * fast.step_high
             (rebuild the fast tail's cache over the split-point history -- the prompt
             and the n - 1 tokens fed back so far -- then r fast steps)
    switch  iff  stay * (1 + m) > T  and  switch < stay

i.e. when the rest can no longer be done in time on the accurate path at its high
percentile, and the fast path would finish sooner, replay included.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .estimates import Estimates

DEFAULT_MARGIN = 0.2  # choose(): the accurate path's high prediction must fit the budget with 20% to spare


class Policy(StrEnum):
    ADAPTIVE = "adaptive"
    ACCURATE = "accurate"
    FAST = "fast"


DEFAULT_POLICY = Policy.ADAPTIVE


def parse_policy(name: str | Policy | None, default: Policy = DEFAULT_POLICY) -> Policy:
    """A policy from its name (None: ``default``); a clear ValueError for an unknown name."""
    if name is None:
        return default
    try:
        return Policy(name)
    except ValueError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(p.value for p in Policy)}") from None


def total_budget_ms(
    max_tokens: int, latency_budget_ms: float | None = None, token_budget_ms: float | None = None
) -> float | None:
    """The whole completion's budget (ms): ``latency_budget_ms``, or ``token_budget_ms * max_tokens``;
    with both, the smaller; None without either."""
    per_token = None if token_budget_ms is None else token_budget_ms * max_tokens
    budgets = [b for b in (latency_budget_ms, per_token) if b is not None]
    if any(b <= 0 for b in budgets):
        raise ValueError(f"a latency budget must be > 0 ms, got {budgets}")
    return min(budgets) if budgets else None


@dataclass(frozen=True)
class Decision:
    path: str  # "accurate" | "fast"
    predicted_ms: float  # the chosen path's mean prediction for the whole completion
    predicted_high_ms: float  # ... at its high percentile (what the choice compared)
    reason: str


def _decision(path: str, estimates: Estimates, prompt_tokens: int, max_tokens: int, reason: str) -> Decision:
    p = estimates[path]
    return Decision(
        path, p.predict(prompt_tokens, max_tokens, "mean"), p.predict(prompt_tokens, max_tokens, "high"), reason
    )


def choose(
    policy: Policy | str,
    budget_ms: float | None,
    prompt_tokens: int,
    max_tokens: int,
    estimates: Estimates,
    margin: float = DEFAULT_MARGIN,
) -> Decision:
    """The path that starts a request (see the module doc for the maths)."""
    policy = parse_policy(policy)
    args = (estimates, prompt_tokens, max_tokens)
    if policy is not Policy.ADAPTIVE:
        return _decision(policy.value, *args, f"policy {policy.value}")
    if budget_ms is None:
        return _decision("accurate", *args, "no latency budget")
    accurate = estimates.accurate.predict(prompt_tokens, max_tokens, "high")
    fast = estimates.fast.predict(prompt_tokens, max_tokens, "high")
    if accurate * (1 + margin) <= budget_ms:
        return _decision("accurate", *args, f"accurate p95 {accurate:.0f} ms +{margin:.0%} fits {budget_ms:.0f} ms")
    if fast < accurate:
        return _decision(
            "fast",
            *args,
            f"accurate p95 {accurate:.0f} ms +{margin:.0%} exceeds {budget_ms:.0f} ms; fast {fast:.0f} ms",
        )
    return _decision(
        "accurate", *args, f"neither fits {budget_ms:.0f} ms; fast {fast:.0f} ms is no quicker than {accurate:.0f} ms"
    )


def should_switch(
    policy: Policy | str,
    elapsed_ms: float,
    tokens_done: int,
    max_tokens: int,
    budget_ms: float | None,
    estimates: Estimates,
    prompt_tokens: int = 0,
    margin: float = 0.0,
) -> bool:
    """Whether a generation running on the accurate path should finish on the fast path (module doc).

    Only ``adaptive`` with a budget ever switches for time. ``prompt_tokens`` sizes the history the
    fast tail must replay; ``margin`` (default none: mid-generation only a real risk counts).
    """
    if parse_policy(policy) is not Policy.ADAPTIVE or budget_ms is None:
        return False
    left = max_tokens - tokens_done
    if left <= 0:
        return False
    stay = estimates.accurate.remaining(left, "high")
    if stay * (1 + margin) <= budget_ms - elapsed_ms:
        return False
    switch = estimates.fast.replay_ms(prompt_tokens + tokens_done - 1, "high") + estimates.fast.remaining(left, "high")
    return switch < stay
