"""What a codec on the split links costs in accuracy and what it saves in bytes.

For each codec the hidden states crossing both links (device->edge at k1,
edge->cloud at k2) travel as real serialized ``Frame`` bytes; the receiver
parses and validates them exactly as an agent does. Reported against the
same split with no codec at all:

- ``bytes_per_element``: frame bytes (all metadata counted) / hidden values carried,
  for prefill frames of ``window`` positions;
- ``step_bytes_per_element``: the same for one-position decode-step frames;
- ``perplexity`` and ``perplexity_delta_pct`` over the text;
- ``token_agreement``: how often the greedy next token is unchanged.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from protos.frames import frame_from_bytes, frame_to_bytes, make_frame
from runtime.segment import Segment, SegmentInput

STEP_SAMPLE = 64  # positions whose one-position frames are measured for step_bytes_per_element


@dataclass
class CodecQuality:
    codec: str
    bytes_per_element: float
    step_bytes_per_element: float
    perplexity: float
    perplexity_delta_pct: float
    token_agreement: float
    tokens: int
    baseline_perplexity: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Window:
    """One window of the text with what needs no codec: the device output and the baseline's answers."""

    ids: torch.Tensor  # (T,)
    device_out: torch.Tensor  # (T, C) hidden states at k1
    nll: torch.Tensor  # (T - 1,) baseline next-token negative log-likelihoods
    greedy: torch.Tensor  # (T - 1,) baseline greedy next tokens


class FrameLink:
    """Carries hidden states across a link as serialized frames, counting bytes and values."""

    def __init__(self, codec: str | None, hidden_size: int):
        self.codec, self.hidden_size = codec, hidden_size
        self.bytes = self.elements = 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.codec is None:
            return hidden
        data = frame_to_bytes(make_frame(uuid.uuid4().hex, 0, 0, hidden, self.codec))
        self.bytes += len(data)
        self.elements += hidden.numel()
        return frame_from_bytes(data, self.hidden_size).hidden

    @property
    def bytes_per_element(self) -> float:
        return self.bytes / max(self.elements, 1)


def _run(segment: Segment, rows: torch.Tensor, embed: bool = False) -> torch.Tensor:
    """One fresh session through ``segment``: (T,) ids or (T, C) hidden -> (T, C) or (T, V)."""
    session = uuid.uuid4().hex
    item = SegmentInput(session, 0, input_ids=rows) if embed else SegmentInput(session, 0, hidden=rows)
    try:
        return segment([item])[0]
    finally:
        segment.close_session(session)


def scores(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, V) logits of (T,) ids -> next-token NLL (T - 1,) and greedy choices (T - 1,)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -logprobs.gather(1, ids[1:, None])[:, 0]
    return nll, logprobs.argmax(-1)


def windows_of(ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows of at least two tokens (each predicts its own positions 1..T-1)."""
    return [ids[i : i + window] for i in range(0, ids.shape[0], window) if ids[i : i + window].shape[0] > 1]


def _prepare(segments: list[Segment], ids: torch.Tensor, window: int, progress: bool) -> list[_Window]:
    device, edge, cloud = segments
    out = []
    for chunk in tqdm(windows_of(ids, window), desc="baseline", disable=not progress, leave=False):
        hidden = _run(device, chunk, embed=True)
        nll, greedy = scores(_run(cloud, _run(edge, hidden)), chunk)
        out.append(_Window(chunk, hidden, nll, greedy))
    return out


def _step_bytes_per_element(codec: str, hidden: torch.Tensor) -> float:
    rows = hidden[:STEP_SAMPLE]
    total = sum(len(frame_to_bytes(make_frame("s" * 32, p, p, rows[p : p + 1], codec))) for p in range(rows.shape[0]))
    return total / rows.numel()


def evaluate_codecs(
    segments: list[Segment],
    ids: torch.Tensor,
    codecs: Iterable[str],
    window: int = 1024,
    progress: bool = True,
    reference: list[Segment] | None = None,
) -> list[CodecQuality]:
    """Measure each codec on both links of a device/edge/cloud split over the token ids ``ids``.

    A codec entry ``"a/b"`` puts codec a on device->edge and b on edge->cloud.
    With ``reference`` (the uncompressed split), ``segments`` may be compressed:
    the baseline comes from ``reference``, so compression and codecs are
    measured together, as deployed.
    """
    device, edge, cloud = segments
    windows = _prepare(reference or segments, ids, window, progress)
    inputs = (
        [w.device_out for w in windows] if reference is None else [_run(device, w.ids, embed=True) for w in windows]
    )
    base_nll = torch.cat([w.nll for w in windows])
    base_ppl = math.exp(float(base_nll.mean()))
    results = []
    for codec in codecs:
        names = codec.split("/") if "/" in codec else [codec, codec]
        links = [FrameLink(name, device.spec.hidden_size) for name in names]
        nll, agree = [], []
        for w, hidden in tqdm(list(zip(windows, inputs)), desc=codec, disable=not progress, leave=False):
            logits = _run(cloud, links[1](_run(edge, links[0](hidden))))
            n, greedy = scores(logits, w.ids)
            nll.append(n)
            agree.append(greedy == w.greedy)
        ppl = math.exp(float(torch.cat(nll).mean()))
        step = [_step_bytes_per_element(name, inputs[0]) for name in names]
        results.append(
            CodecQuality(
                codec=codec,
                bytes_per_element=round(sum(link.bytes for link in links) / sum(link.elements for link in links), 4),
                step_bytes_per_element=round(sum(step) / 2, 4),
                perplexity=round(ppl, 4),
                perplexity_delta_pct=round(100 * (ppl / base_ppl - 1), 3),
                token_agreement=round(float(torch.cat(agree).float().mean()), 4),
                tokens=int(base_nll.numel()),
                baseline_perplexity=round(base_ppl, 4),
            )
        )
    return results


def format_table(results: list[CodecQuality]) -> str:
    """A plain-text table of the measurements, one row per codec."""
    if not results:
        return "no codecs evaluated"
    head = f"{'codec':<24} {'B/elt':>7} {'step B/elt':>10} {'perplexity':>10} {'delta %':>8} {'agreement':>9}"
    lines = [
        f"baseline perplexity {results[0].baseline_perplexity:.4f} over {results[0].tokens} predicted tokens",
        head,
        "-" * len(head),
    ]
    for r in results:
        lines.append(
            f"{r.codec:<24} {r.bytes_per_element:>7.4f} {r.step_bytes_per_element:>10.4f} {r.perplexity:>10.4f} "
            f"{r.perplexity_delta_pct:>+8.3f} {r.token_agreement:>9.4f}"
        )
    return "\n".join(lines)
