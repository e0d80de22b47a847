"""The runtime every tier runs, CPU and GPU alike.

- the model: checkpoints, layers, segments, the KV pool, the step, the scheduler, sampling, the CUDA engine,
  artifacts (tier loading and manifests), backends and the compression passes applied at load;
- sessions: the owner's decode loop (``owner``), the terminal that samples (``terminal``: the one type the
  cloud, the fast tail and the local chain wrap, and the one mapping from failures to status), the step ledger
  (``ledger``), the split-point history and its replay (``history``), the per-answer report (``report``) and
  the split model chained in one process (``local``);
- ``stats``: the one percentile definition (nearest rank) of the benches and the edge's estimates;
- services: settings and signal handling (``settings``) and logging (``logs``: text or JSON lines, request and
  session ids), shared by the three agents.

It imports only ``protos``: nothing from ``partitioner``, the agents or ``splitglm``.
"""
