"""The live rig of ``splitglm partition --measure``: a candidate plan run on the real processes.

``partitioner.plan.live`` chooses the candidates and compares prediction with
measurement; this runs one candidate (``system_rig``, a
``partitioner.plan.live.Rig``), on the same processes and link proxy as the
system tests:

1. its plan is exported (``partitioner.plan.export``) into a temporary folder,
   each tier's compression for the tier's backend, as ``splitglm partition``
   exports the chosen one;
2. ``LocalSystem`` starts the broker, the cloud and the edge; the edge reaches
   the cloud through a ``DelayProxy`` of the topology's edge_cloud RTT and
   bandwidth, the device reaches the broker through one of device_edge's;
3. the device is ``LocalDevice``: the plan's device tier in this process,
   driving the owner's decode loop over the device agent's MQTT link. (The
   device agent process renders its prompt from sensor readings; a
   measurement needs prompts of the workload's exact length and each step's
   timings.)

Generations are greedy, on the accurate path (policy "accurate", no
speculation) and without stop tokens, so each runs its 1 + decode_steps
steps. A step's wall time is the device's compute plus its wait for the
answer; each tier's compute comes from the step's timings (the device's own,
the edge's ``edge_compute``, the cloud's ``compute``), for time dilation.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from partitioner.plan.live import LiveRun
from partitioner.plan.topology import TIERS, Topology, tier_backend
from protos import splitglm_pb2 as pb

from .linkproxy import DelayProxy
from .system import LocalDevice, LocalSystem

NO_SPECULATION = ("--speculate", "false")  # the candidate's split itself, one token per step


def export_candidate(model: str | os.PathLike, topo: Topology, candidate: dict, out: Path) -> Path:
    """``candidate`` (splits, codecs, compression names) as a plan folder ``out`` for ``topo``'s backends."""
    from partitioner.plan.export import export_plan
    from partitioner.plan.measure import compression_entry

    plan = {
        "topology": topo.name,
        "splits": list(candidate["splits"]),
        "codecs": dict(candidate["codecs"]),
        "compression": {t: compression_entry(tier_backend(topo, t), candidate["compression"][t]) for t in TIERS},
    }
    export_plan(model, plan, out)
    return out


class SystemRun:
    """One candidate on the running processes: ``run`` one generation (a ``LiveRun``); ``link``, the
    device's ``DelayProxy``, counts the bytes on the device's link."""

    def __init__(self, device: LocalDevice, link: DelayProxy | None = None):
        self.device, self.link = device, link

    def run(self, prompt_ids: list[int], decode_steps: int, policy: str = "accurate") -> LiveRun:
        """Prefill ``prompt_ids``, then ``decode_steps`` greedy steps: 1 + decode_steps tokens; ``policy``
        "fast": the edge's fast tail finishes them instead of the cloud."""
        params = pb.GenerationParams(max_tokens=decode_steps + 1, policy=policy, speculate=pb.SPECULATE_OFF)
        generation = self.device.generation(prompt_ids, params)
        tokens = [event.token for event in generation]
        steps = [step_record(s, path) for s, path in zip(generation.step_timings, generation.paths)]
        return LiveRun(tokens, steps)


def step_record(timings: dict[str, float], path: int = pb.ACCURATE) -> dict:
    """A step of ``Generation.step_timings`` as a ``LiveRun`` step: wall time and each tier's compute, ms.

    On the fast path (``path``) the tail's step is the edge's fast tail: edge compute, no cloud."""
    if path == pb.FAST:
        edge, cloud = timings["edge_compute"] + timings["tail"], 0.0
    else:
        edge, cloud = timings["edge_compute"], timings["compute"]
    return {"wall_ms": timings["owner"] + timings["downstream"], "compute_ms": {"device": timings["owner"],
                                                                                "edge": edge, "cloud": cloud}}


@contextmanager
def system_rig(model: str | os.PathLike, topo: Topology, candidate: dict, threads: int = 1) -> Iterator[SystemRun]:
    """``candidate`` exported and running on broker, cloud and edge processes plus a device here, its links
    shaped as ``topo``'s; everything stops (and the plan folder goes) when the context ends."""
    de, ec = topo.links["device_edge"], topo.links["edge_cloud"]
    torch_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="splitglm-live-") as folder:
        plan = str(export_candidate(model, topo, candidate, Path(folder) / "plan"))
        system = LocalSystem(plan, threads=threads, device_agent=False, edge_args=NO_SPECULATION,
                             cloud_rtt_ms=ec.rtt_ms, cloud_bandwidth_mbit_s=ec.bandwidth_mbit_s,
                             device_rtt_ms=de.rtt_ms, device_bandwidth_mbit_s=de.bandwidth_mbit_s)
        with system:
            torch.set_num_threads(threads)  # the device tier, in this process
            device = LocalDevice(plan, system.device_broker)
            try:
                yield SystemRun(device, system.device_proxy)
            finally:
                device.close()
                torch.set_num_threads(torch_threads)
