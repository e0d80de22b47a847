"""The runtime every tier runs, CPU and GPU alike.

- the model: checkpoints, layers, segments, the KV pool, the step, the scheduler, sampling, the CUDA engine,
  artifacts (tier loading and manifests), backends and the compression passes applied at load;
- sessions: the owner's decode loop (``owner``), the terminal that samples (``terminal``), the step ledger
  (``ledger``) and the split model chained in one process (``local``);
- services: settings, logging and signal handling shared by the three agents (``settings``).

It imports only ``protos``: nothing from ``partitioner``, the agents or ``splitglm``.
"""
