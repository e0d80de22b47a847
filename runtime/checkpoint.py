"""Local GLM checkpoints: find them, read their config, load their weights.

Nothing here ever downloads: a path that does not exist is an error, and one
that looks like a hub id (``org/name``) says so.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SUPPORTED_MODEL_TYPES = ("glm", "glm4")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or of an unsupported kind."""


@dataclass(frozen=True)
class GlmSpec:
    """The shape of a GLM-family network, read from its ``config.json``."""

    model_type: str  # "glm" or "glm4" (glm4 adds post-attention and post-MLP norms)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # leading dims of each head that get rotary embedding
    rope_theta: float
    rms_norm_eps: float
    attention_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @property
    def sandwich_norm(self) -> bool:
        return self.model_type == "glm4"

    @classmethod
    def from_config(cls, cfg: dict) -> GlmSpec:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"unsupported model_type {model_type!r}: splitglm runs {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(GlmForCausalLM, Glm4ForCausalLM); convert a llama GGUF with `splitglm convert`"
            )
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        rope = cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise CheckpointError(f"unsupported rope_type {rope_type!r}: only 'default' rotary is implemented")
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg["num_key_value_heads"],
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            rope_theta=float(theta),
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            attention_bias=bool(cfg.get("attention_bias", True)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
        )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a local checkpoint folder and return it."""
    folder = Path(path).expanduser()
    if not folder.exists():
        hint = ""
        if _HUB_ID.match(str(path)) and not str(path).startswith((".", "/")):
            hint = (
                f" ({str(path)!r} looks like a model-hub id: splitglm never downloads; put the checkpoint "
                "in a local folder, or run `splitglm demo-model` for the demo model)"
            )
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist{hint}")
    if not folder.is_dir():
        raise CheckpointError(f"{str(folder)!r} is not a folder (a GGUF file? use `splitglm convert --gguf`)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{str(folder)!r} has no config.json: not a transformers checkpoint folder")
    if not sorted(folder.glob("*.safetensors")):
        raise CheckpointError(f"{str(folder)!r} has no *.safetensors weight files")
    return folder


def load_spec(path: str | os.PathLike) -> GlmSpec:
    """Read and validate the config of the checkpoint at ``path``."""
    folder = resolve_checkpoint(path)
    with open(folder / "config.json") as f:
        return GlmSpec.from_config(json.load(f))


def load_tensors(path: str | os.PathLike, wanted) -> dict[str, torch.Tensor]:
    """Load only the tensors whose names satisfy ``wanted(name)`` from every safetensors file."""
    folder = resolve_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if wanted(name):
                    tensors[name] = f.get_tensor(name)
    return tensors


def load_hf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The monolithic transformers model (the reference every split is checked against)."""
    from transformers import AutoModelForCausalLM

    load_spec(path)  # clear errors before transformers' own
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval()


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_checkpoint(path)), local_files_only=True)
