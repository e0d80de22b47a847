"""Tier and link descriptions (YAML) that the planner cuts a model for.

Every field carries its unit in its name. A tier's speed comes from a
profile file measured on that tier, or from ``speed_factor`` applied to a
profile of this machine (2.0 = twice as fast as this machine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TIERS = ("device", "edge", "cloud")
LINKS = ("device_edge", "edge_cloud")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Tier(_Strict):
    backend: Literal["torch", "onnxruntime", "tensorrt"] = "torch"
    threads: int = Field(2, ge=1, description="CPU threads the segment runs with")
    memory_mb: float = Field(gt=0, description="memory cap for weights + KV caches, MiB")
    profile: str | None = Field(None, description="profile JSON measured on this tier (splitglm profile)")
    speed_factor: float = Field(1.0, gt=0, description="speed relative to the profiled machine; 2.0 = twice as fast")
    max_sessions: int = Field(1, ge=1, description="concurrent sessions whose KV caches must fit")
    cpu_decode: Literal["auto", "eager", "compiled"] = Field(
        "auto", description="device and edge with the torch backend: how the tier runs its decode steps "
        "(runtime.cpu_decode; the edge's fast tail too); auto = the path whose measured step is shorter"
    )
    gpu_weights: Literal["bfloat16", "fp8"] | None = Field(
        None, description="cloud only: its GPU's weights for the layers' products; fp8 = E4M3 with per-channel "
        "scales (Ada, Hopper), about half the bytes of bfloat16 (`splitglm bench cloud-fp8` measures its cost)"
    )


class Link(_Strict):
    bandwidth_mbit_s: float = Field(gt=0, description="usable bandwidth, Mbit/s")
    rtt_ms: float = Field(ge=0, description="round-trip time, ms")


class Workload(_Strict):
    """One kind of request in the mix the planner optimises for."""

    prompt_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1)
    weight: float = Field(1.0, gt=0, description="relative frequency in the mix")


class Topology(_Strict):
    name: str
    description: str = ""
    tiers: dict[str, Tier]
    links: dict[str, Link]
    workload: list[Workload] = Field(min_length=1)
    max_perplexity_increase_pct: float = Field(1.0, ge=0, description="quality floor for codecs + compression")
    context_tokens: int = Field(2048, ge=1, description="longest prompt + output a session may reach (KV memory)")
    min_device_layers: int = Field(
        1, ge=0, description="layers the device must run: embeddings map back to tokens, so with 0 raw text leaves it"
    )

    @model_validator(mode="after")
    def _names(self) -> Topology:
        if set(self.tiers) != set(TIERS):
            raise ValueError(f"tiers must be exactly {', '.join(TIERS)}; got {', '.join(sorted(self.tiers))}")
        for name in ("device", "edge"):
            if self.tiers[name].gpu_weights is not None:
                raise ValueError(f"gpu_weights is the cloud tier's setting; tier {name} has it")
        for name, tier in self.tiers.items():
            if tier.cpu_decode == "compiled" and (name == "cloud" or tier.backend != "torch"):
                raise ValueError(f"cpu_decode: compiled is for a device or edge tier of the torch backend; tier "
                                 f"{name} is {'the cloud' if name == 'cloud' else tier.backend}")
        if set(self.links) != set(LINKS):
            raise ValueError(f"links must be exactly {', '.join(LINKS)}; got {', '.join(sorted(self.links))}")
        return self


class TopologyError(ValueError):
    """A topology file is missing or invalid."""


def load_topology(path: str | os.PathLike) -> Topology:
    file = Path(path)
    if not file.is_file():
        raise TopologyError(f"topology file {str(file)!r} does not exist")
    try:
        topo = Topology.model_validate(yaml.safe_load(file.read_text()))
    except (yaml.YAMLError, ValidationError) as e:
        raise TopologyError(f"invalid topology {str(file)!r}: {e}") from None
    for name, tier in topo.tiers.items():  # a profile path is relative to the topology file
        if tier.profile:
            path = (file.parent / tier.profile).resolve()
            if not path.is_file():
                raise TopologyError(f"{file}: tier {name}'s profile {tier.profile!r} does not exist ({path})")
            tier.profile = str(path)
    return topo


def tier_backend(topo: Topology, tier: str) -> str:
    """The backend a tier is planned and run with: onnxruntime where a device / edge tier asks, else torch.

    The cloud is planned with PyTorch profiles (a TensorRT engine is built from its segment at most)."""
    return "onnxruntime" if tier != "cloud" and topo.tiers[tier].backend == "onnxruntime" else "torch"
