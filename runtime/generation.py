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

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from runtime.grammar import Matcher, masks_together
from runtime.sampling import SampleRow, SamplingParams

__all__ = ["LazyMask", "LazyMasks", "TokenState", "prefetches_masks"]


class LazyMasks:
    """The grammar's masks of one step (the next position and after each draft), computed when the sampler first
    asks: the CUDA engine samples after launching the forward pass, so the host computes them meanwhile. The
    matcher must not move between ``rows`` and the sampling (a session has one step in flight)."""

    def __init__(self, matcher: Matcher, drafts: list[int], ready: torch.Tensor | None = None):
        self.matcher, self.drafts = matcher, drafts
        self.masks: list[torch.Tensor] | None = None if ready is None else [ready]  # (``ready``: no drafts)

    def get(self, j: int) -> torch.Tensor:
        if self.masks is None:
            self.masks = self.matcher.masks(self.drafts)
        return self.masks[j]


class LazyMask:
    """A row's mask: the ``j``-th of a step's ``LazyMasks``, computed when called (``SampleRow.mask``)."""

    __slots__ = ("group", "j")

    def __init__(self, group: LazyMasks, j: int):
        self.group, self.j = group, j

    def __call__(self) -> torch.Tensor:
        return self.group.get(self.j)

    @staticmethod
    def together(masks: Sequence[LazyMask]) -> None:
        """Compute the masks of many sessions at once (``runtime.sampling.resolve_masks``): the steps without
        drafts in parallel (``masks_together``); those with drafts consume and roll back, one by one, later."""
        groups = {id(m.group): m.group for m in masks if isinstance(m, LazyMask) and m.group.masks is None}
        plain = [g for g in groups.values() if not g.drafts]
        if len(plain) > 1:
            for g, mask in zip(plain, masks_together([g.matcher for g in plain])):
                g.masks = [mask]


class _Prefetcher:
    """The background thread that computes the masks of committed sessions: the sessions that committed while
    it worked are taken together, in one ``masks_together`` call (llguidance's threads), so a step of many
    sessions costs one call, not one per session."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[tuple[Matcher, Future]] = []
        self._thread: ThreadPoolExecutor | None = None
        self._scheduled = False

    def submit(self, matcher: Matcher) -> Future:
        future: Future = Future()
        with self._lock:
            self._pending.append((matcher, future))
            if not self._scheduled:
                if self._thread is None:
                    self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
                self._thread.submit(self._drain)
                self._scheduled = True
        return future

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending, self._scheduled = self._pending, [], False
        try:
            masks = masks_together([m for m, _ in batch])
        except Exception:  # (one broken state: each alone, so that only its own future fails)
            for matcher, future in batch:
                try:
                    future.set_result(matcher.mask())
                except Exception as e:
                    future.set_exception(e)
            return
        for (_, future), mask in zip(batch, masks):
            future.set_result(mask)


_PREFETCH = _Prefetcher()


def prefetches_masks(segment) -> bool:
    """Whether the sessions a ``segment`` samples compute their next mask in the background after each commit.
    Not where the segment computes the step's masks itself while its layers run (``masks_while_running``: the
    CUDA engine fills its sampling buffers while the GPU works), for there a background thread only adds a
    hand-off to every commit (tens of microseconds at batch 1)."""
    return not getattr(segment, "masks_while_running", False)


class TokenState:
    """A generation's sampling parameters, the tokens it produced so far, and its grammar matcher (or None).

    After a commit the grammar's mask at the next position is computed at once in a background thread
    (``prefetch``): by the time the next step's rows are asked for (the token went to the edge, the next
    hidden states came back) it is ready, and the step does not wait for it. Every use of the matcher waits
    for that computation first (``matcher``), so it is never used by two threads at once."""

    def __init__(self, sampling: SamplingParams, matcher: Matcher | None = None, generated: Iterable[int] = (),
                 prefetch: bool = True):
        self.sampling, self._matcher, self.prefetch = sampling, matcher, prefetch
        self._next: Future | None = None  # the mask at the next position, being computed
        self._ready: torch.Tensor | None = None  # ... and computed
        self.tokens: list[int] = []
        self.counts: Counter[int] = Counter()
        self.commit(generated)

    @property
    def matcher(self) -> Matcher | None:
        """The grammar's matcher, once no background computation uses it."""
        self._settle()
        return self._matcher

    def _settle(self) -> None:
        """Wait for the background mask (if any) and keep it; where it failed, it is computed again (and fails)
        where it is needed, and the error is raised there."""
        future, self._next = self._next, None
        if future is not None:
            try:
                self._ready = future.result()
            except Exception:  # (a broken grammar state: ``rows`` raises it)
                self._ready = None

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
        if self._matcher is not None:
            self._settle()
            ready = self._ready
            self._matcher.check()  # (the masks come later, inside the step: a broken state is refused now)
            lazy = LazyMasks(self._matcher, list(drafts), ready if not drafts else None)
            masks = [LazyMask(lazy, j) for j in range(count)]
        return tuple(self.sampling.rows(first_position, count, seen, masks))

    def commit(self, tokens: Iterable[int]) -> None:
        """Tokens sampled (and kept), in order; GrammarError if the grammar refuses one."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        self.tokens.extend(tokens)
        self.counts.update(tokens)
        matcher, self._ready = self.matcher, None
        if matcher is not None:
            matcher.consume(tokens)
            if self.prefetch and not matcher.stopped:
                self._next = _PREFETCH.submit(matcher)

    def fork(self) -> TokenState:
        """An independent copy (a round's drafts go into the copy; the original stays at the committed tokens)."""
        matcher = self.matcher
        out = TokenState(self.sampling, None if matcher is None else matcher.fork(), prefetch=self.prefetch)
        out.tokens, out.counts = list(self.tokens), Counter(self.counts)
        return out

    @property
    def plain(self) -> bool:
        """No state matters: no penalty and no grammar (rows need no history)."""
        return self._matcher is None and not self.sampling.penalised
