"""What a generation's next token depends on besides the logits: the tokens it produced and its grammar state.

``TokenState`` is kept by every tier that samples a session (``runtime.terminal.TailSessions``: the cloud,
the edge's fast tail, the local chain) and by the edge's drafter (``edge_node.speculation``). It turns the
session's ``SamplingParams`` into the ``SampleRow`` of each position: the draw keyed by position, the
penalties' counts of the tokens generated before it, and the grammar's mask there. For a speculative
verification, the rows after each draft count and mask as if the drafts before it were generated: a draft
is only accepted where it equals the token sampled there, so the accepted prefix was sampled exactly as a
plain step would have.

Only generated tokens are ever counted: the cloud never sees the prompt's ids, so the penalties are over the
completion (OpenAI's definition; vLLM's ``repetition_penalty`` also counts the prompt, ours does not). A
session that moves to another tier (a replay: ``GenerationParams.generated_tokens``) rebuilds its state
from the tokens, so its next tokens are exactly those the old tier would have sampled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from functools import partial

import torch

from runtime.grammar import Matcher
from runtime.sampling import SampleRow, SamplingParams

__all__ = ["LazyMasks", "TokenState"]


class LazyMasks:
    """The grammar's masks of one step (the next position and after each draft), computed when the sampler first
    asks: the CUDA engine samples after launching the forward pass, so the host computes them meanwhile. The
    matcher must not move between ``rows`` and the sampling (a session has one step in flight)."""

    def __init__(self, matcher: Matcher, drafts: list[int]):
        self.matcher, self.drafts = matcher, drafts
        self.masks: list[torch.Tensor] | None = None

    def get(self, j: int) -> torch.Tensor:
        if self.masks is None:
            self.masks = self.matcher.masks(self.drafts)
        return self.masks[j]


class TokenState:
    """A generation's sampling parameters, the tokens it produced so far, and its grammar matcher (or None)."""

    def __init__(self, sampling: SamplingParams, matcher: Matcher | None = None, generated: Iterable[int] = ()):
        self.sampling, self.matcher = sampling, matcher
        self.tokens: list[int] = []
        self.counts: Counter[int] = Counter()
        self.commit(generated)

    def rows(self, first_position: int, drafts: Sequence[int] = ()) -> tuple[SampleRow, ...]:
        """The rows sampling positions first_position .. first_position + len(drafts): the next token, and the
        token after each draft (as if the drafts before it were generated)."""
        count = len(drafts) + 1
        seen = None
        if self.sampling.penalised:
            counts, seen = Counter(self.counts), []
            for j in range(count):
                seen.append(tuple(counts.items()))
                if j < len(drafts):
                    counts[int(drafts[j])] += 1
        masks = None
        if self.matcher is not None:
            self.matcher.check()  # (the masks come later, inside the step: a broken state is refused now)
            lazy = LazyMasks(self.matcher, list(drafts))
            masks = [partial(lazy.get, j) for j in range(count)]
        return tuple(self.sampling.rows(first_position, count, seen, masks))

    def commit(self, tokens: Iterable[int]) -> None:
        """Tokens sampled (and kept), in order; GrammarError if the grammar refuses one."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        self.tokens.extend(tokens)
        self.counts.update(tokens)
        if self.matcher is not None:
            self.matcher.consume(tokens)

    def fork(self) -> TokenState:
        """An independent copy (a round's drafts go into the copy; the original stays at the committed tokens)."""
        out = TokenState(self.sampling, None if self.matcher is None else self.matcher.fork())
        out.tokens, out.counts = list(self.tokens), Counter(self.counts)
        return out

    @property
    def plain(self) -> bool:
        """No state matters: no penalty and no grammar (rows need no history)."""
        return self.matcher is None and not self.sampling.penalised
