"""Driving a segment (the PyTorch one or the CUDA engine) through several sessions' generations, for tests."""

from __future__ import annotations

import torch

from runtime.sampling import SamplingParams
from runtime.segment import SegmentInput


def drive(engine, prompts: dict, steps: int, params: SamplingParams, next_input, join: dict | None = None,
          join_at: int = -1) -> dict[str, list[int]]:
    """Generate for several sessions in lockstep (one engine call per step, all sessions in it); the sessions of
    ``join`` start at step ``join_at``. ``next_input(token)`` is a session's next row (ids or hidden)."""

    def start(batch: dict) -> dict:
        out = engine([SegmentInput(s, 0, sample=tuple(params.rows(len(p))), **_rows(engine, p))
                      for s, p in batch.items()])
        return {sid: [o.tokens[-1]] for sid, o in zip(batch, out)}

    tokens = start(prompts)
    pos = {sid: len(p) for sid, p in prompts.items()}
    for step in range(steps):
        if step == join_at:
            tokens.update(start(join))
            pos.update({sid: len(p) for sid, p in join.items()})
        live = list(tokens)
        out = engine([SegmentInput(s, pos[s], sample=tuple(params.rows(pos[s] + 1)),
                                   **_rows(engine, next_input(tokens[s][-1]))) for s in live])
        for sid, o in zip(live, out):
            tokens[sid].append(o.tokens[-1])
            pos[sid] += 1
    for sid in tokens:
        engine.close_session(sid)
    return tokens


def _rows(engine, rows: torch.Tensor) -> dict:
    return {"input_ids": rows} if engine.has_embed else {"hidden": rows}
