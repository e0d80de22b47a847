"""Compression described as data: ``[{"pass": "int8", "layers": [0, 10]}, ...]``, validated, then applied."""

from __future__ import annotations

import inspect
import logging

from torch import nn

from runtime.compress.common import CompressionError, as_range
from runtime.compress.lowrank import low_rank
from runtime.compress.prune import prune_heads, prune_mlp
from runtime.compress.quant import quantize_int4_weights, quantize_int8_weights
from runtime.compress.smooth import smoothquant
from runtime.compress.sparse import check_thresholds, sparse_mlp

logger = logging.getLogger(__name__)

PASSES = {
    "int8": quantize_int8_weights,
    "int4": quantize_int4_weights,
    "smoothquant": smoothquant,
    "prune_heads": prune_heads,
    "prune_mlp": prune_mlp,
    "low_rank": low_rank,
    "sparse_mlp": sparse_mlp,
}
NEEDS_CALIBRATION = {"smoothquant"}  # calibration comes from the caller, never from the description
OPTIONAL_CALIBRATION = {"prune_heads", "prune_mlp"}
ARGUMENT_CHECKS = {"sparse_mlp": lambda args: check_thresholds(args["thresholds"])}  # beyond names and layers


def _arguments(fn) -> tuple[set[str], set[str]]:
    """(all accepted, required) keyword names of a pass, beside the module and calibration data."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    names = {p.name for p in params} - {"calibration"}
    required = {p.name for p in params if p.default is inspect.Parameter.empty} - {"calibration"}
    return names, required


def validate(spec) -> list[dict]:
    """Check a description without touching a model; return it as a list of plain dicts."""
    if not isinstance(spec, list):
        raise CompressionError(f"a compression description is a list of passes, got {type(spec).__name__}")
    checked = []
    for n, entry in enumerate(spec):
        where = f"compression pass #{n}"
        if not isinstance(entry, dict) or "pass" not in entry:
            raise CompressionError(f"{where}: each pass is an object with a 'pass' key, got {entry!r}")
        name = entry["pass"]
        if name not in PASSES:
            raise CompressionError(f"{where}: unknown pass {name!r}; known passes: {', '.join(PASSES)}")
        accepted, required = _arguments(PASSES[name])
        if name in OPTIONAL_CALIBRATION:
            accepted.add("calibrated")  # true: score by calibration data instead of weight norms
        args = {k: v for k, v in entry.items() if k != "pass"}
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise CompressionError(
                f"{where} ({name}): unknown argument {unknown[0]!r}; it takes {', '.join(sorted(accepted))}"
            )
        missing = sorted(required - set(args))
        if missing:
            raise CompressionError(f"{where} ({name}): missing required argument {missing[0]!r}")
        try:
            as_range(args.get("layers"))
            ARGUMENT_CHECKS.get(name, lambda _args: None)(args)
        except CompressionError as e:
            raise CompressionError(f"{where} ({name}): {e}") from None
        checked.append(dict(entry))
    return checked


def apply_compression(module: nn.Module, spec: list[dict], calibration=None) -> list[dict]:
    """Apply each described pass in order to ``module``, in place; return what each pass did.

    ``calibration`` (token ids, or hidden states for a segment without the
    embedding) feeds SmoothQuant and calibration-based pruning.
    """
    checked = validate(spec)
    for n, entry in enumerate(checked):
        if (entry["pass"] in NEEDS_CALIBRATION or entry.get("calibrated")) and calibration is None:
            raise CompressionError(f"compression pass #{n} ({entry['pass']}) needs calibration data")
    reports = []
    for entry in checked:
        name, args = entry["pass"], {k: v for k, v in entry.items() if k != "pass"}
        if name in NEEDS_CALIBRATION:
            report = PASSES[name](module, calibration, **args)
        elif name in OPTIONAL_CALIBRATION and args.pop("calibrated", False):
            report = PASSES[name](module, calibration=calibration, **args)
        else:
            report = PASSES[name](module, **args)
        logger.info("compression %s: %s", name, report)
        reports.append(report)
    return reports
