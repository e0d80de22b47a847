"""``splitglm bench ...``: the benchmarks, one module each, and their one ``stats`` module.

A bench with a command of its own has ``add_parser(sub)`` (its options, under
``splitglm bench``) and ``run(args)`` (the command, which prints the result);
``add_parser`` below registers them, in the order of ``COMMANDS``. The other
modules serve those: ``baselines`` and ``report`` (``all``'s sections and its
REPORT.md; ``python -m splitglm.bench.report OUT`` rewrites one), ``slow``
(``soak``'s slow-consumer phase), ``stats`` (percentiles, medians, ratios),
``llama_cpp`` (``cpu``'s llama.cpp rows), ``options`` (options several benches share) and ``select_patch`` (paho past
1024 descriptors, for ``fanin``).
"""

from __future__ import annotations

from importlib import import_module

COMMANDS = ("all", "codecs", "cloud", "cloud_gpu", "cloud_fp8", "speculative", "soak", "fanin", "split", "router",
            "fuzz", "sparse", "structured", "observability", "cpu")


def add_parser(sub) -> None:
    """``splitglm bench``, with a subcommand per module of ``COMMANDS``."""
    bench = sub.add_parser("bench", help="benchmarks that report numbers").add_subparsers(dest="bench", required=True)
    for name in COMMANDS:
        import_module(f"{__name__}.{name}").add_parser(bench)
