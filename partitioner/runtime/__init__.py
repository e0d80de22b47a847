"""The runtime core of every tier, CPU and GPU alike: segments, the KV pool, the step, the scheduler, sampling,
artifacts and backends. It imports nothing from ``partitioner.plan``, ``partitioner.eval`` or the agents."""
