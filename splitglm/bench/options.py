"""Options and defaults several benches' commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

MODEL_HELP = "GLM checkpoint folder (default: the demo model)"
PLAN_HELP = "plan folder (default: the demo plan)"


def add_command(sub, name: str, run: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
    """The parser of ``splitglm bench NAME``, which runs ``run(args)``."""
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=run)
    return p


def print_result(result: dict, as_json: bool) -> None:
    """A bench's one result: a JSON line, or a ``key: value`` line per field, the keys right-aligned."""
    import json
    import sys

    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    width = max(map(len, result), default=0)
    for key, value in result.items():
        sys.stdout.write(f"{key:>{width}}: {value}\n")


def add_model_plan(p: argparse.ArgumentParser, plan_help: str = PLAN_HELP) -> None:
    """``--model`` and ``--plan``, both defaulting to the demo's."""
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--plan", help=plan_help)


def plan_of(args: argparse.Namespace) -> str:
    """``--plan``, or the demo plan of ``--model`` (made once, in the cache)."""
    from partitioner.plan.demo import demo_plan

    return args.plan or str(demo_plan(args.model))
