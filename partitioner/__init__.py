"""The partitioner and the runtime every tier shares.

- ``runtime``: checkpoints, layers, the KV pool, segments, the scheduler, sampling, artifacts, backends and
  the compression passes applied at load;
- ``session``: the owner's decode loop and the terminal's bookkeeping (one of each);
- ``plan``: profiling, measurements, topologies, the planner, partition/export, the fast-tail choice, live runs;
- ``eval``: the quality harness (perplexity, agreement, codecs, compression).

``partitioner.runtime`` imports nothing from ``plan`` or ``eval``; no package here imports an agent.
"""
