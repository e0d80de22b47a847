"""What every compression pass shares: choosing layers, finding and replacing linears, checking arguments."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from runtime.layers import DecoderLayer

LayerRange = range | tuple[int, int] | list[int] | None


class CompressionError(ValueError):
    """A compression pass or its arguments are invalid."""


def as_range(layers: LayerRange) -> range | None:
    """``[a, b)`` as a range; None stays None (every layer the module holds)."""
    if layers is None or isinstance(layers, range):
        return layers
    if not isinstance(layers, (list, tuple)) or len(layers) != 2 or not all(isinstance(i, int) for i in layers):
        raise CompressionError(f"layers must be [start, end) as two integers, got {layers!r}")
    start, end = layers
    if not 0 <= start <= end:
        raise CompressionError(f"layers must satisfy 0 <= start <= end, got [{start}, {end})")
    return range(start, end)


def decoder_layers(module: nn.Module, layers: LayerRange = None) -> list[tuple[int, DecoderLayer]]:
    """(global index, block) of every DecoderLayer in ``module`` whose index lies in ``layers``.

    Layers of the range that the module does not hold are skipped, so one
    description can be applied to each segment of a split.
    """
    wanted = as_range(layers)
    found = [(m.self_attn.layer, m) for m in module.modules() if isinstance(m, DecoderLayer)]
    return sorted((i, m) for i, m in found if wanted is None or i in wanted)


def linears_of(root: nn.Module, names: Iterable[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """(dotted name, module) of the plain nn.Linear modules under ``root``, optionally only ``names``."""
    found = [(n, m) for n, m in root.named_modules() if type(m) is nn.Linear]
    if names is None:
        return found
    names = list(names)
    known = {n for n, _ in root.named_modules()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CompressionError(f"no module named {unknown[0]!r} in a decoder layer; linears: {[n for n, _ in found]}")
    return [(n, m) for n, m in found if n in names or any(n.startswith(p + ".") for p in names)]


def replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.<dotted>`` was."""
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def check_fraction(value: float, what: str, upper_open: bool = True) -> float:
    """A fraction in [0, 1) (or (0, 1] when ``upper_open`` is False), else a clear error."""
    ok = isinstance(value, (int, float)) and (0 <= value < 1 if upper_open else 0 < value <= 1)
    if not ok:
        bounds = "[0, 1)" if upper_open else "(0, 1]"
        raise CompressionError(f"{what} must be a number in {bounds}, got {value!r}")
    return float(value)


def param_count(module: nn.Module) -> int:
    """Parameters plus buffers: what the module stores, whatever the dtype."""
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
