"""``splitglm distill``: students of a segment trained against the same layers at full precision.

- ``students``: make a student (layer-dropped, pruned, low-rank) from its teacher, and the depths aligned;
- ``dense``: the differentiable forward of a segment over (B, T) windows (causal attention, no KV pool);
- ``qat``: fake quantisation of a student's weights (straight-through), matching the runtime's int8/int4;
- ``train``: the multi-granularity loss, the loop (progress, checkpoints, resume, loss curve) and export.
"""
