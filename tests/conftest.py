"""Shared fixtures: tiny random glm / glm4 checkpoints and the converted demo model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # the CUDA engine's Triton kernels then run on CPU tensors, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
GPL3 = "/usr/share/common-licenses/GPL-3"


def _save_tiny(kind: str, folder) -> str:
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    config_cls, model_cls = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}[kind]
    config = config_cls(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # random biases too, so the bias path is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session", params=["glm", "glm4"])
def tiny_checkpoint(request, tmp_path_factory) -> str:
    return _save_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_glm(tmp_path_factory) -> str:
    return _save_tiny("glm", tmp_path_factory.mktemp("tiny-glm-single"))


@pytest.fixture(scope="session")
def demo_checkpoint() -> str:
    from partitioner.convert import demo_model

    return str(demo_model())


@pytest.fixture(scope="session")
def gpl3_text() -> str:
    with open(GPL3) as f:
        return f.read()


def _hypothesis_profiles() -> None:
    """CI runs the property tests derandomized, so a red build is reproducible; locally they explore."""
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


_hypothesis_profiles()


@pytest.fixture()
def mosquitto(tmp_path):
    """A real Mosquitto broker for one test (``.url``, ``.restart()``)."""
    from tests.procs import Mosquitto

    broker = Mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_plan(tiny_glm, tmp_path_factory) -> str:
    """A plan folder of the tiny glm model: splits 2,4 and lossless fp32 frames on both links."""
    from partitioner.plan.export import cached_plan, fixed_plan

    return str(cached_plan(tiny_glm, fixed_plan((2, 4), ("fp32", "fp32")), tmp_path_factory.mktemp("plans")))


@pytest.fixture(scope="session")
def talking_model(tiny_glm, tmp_path_factory) -> str:
    """The tiny glm checkpoint with a character tokenizer, so every tier of its plans can serve text."""
    import shutil

    from splitglm.fuzz.stack import char_tokenizer

    folder = tmp_path_factory.mktemp("talking-model") / "model"
    shutil.copytree(tiny_glm, folder)
    char_tokenizer().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def talking_plan(tiny_plan, tmp_path_factory) -> str:
    """The tiny plan with a character tokenizer in its device and edge tiers, so both can serve text (the
    device agent renders prompts, the edge's HTTP API serves completions)."""
    import shutil

    from splitglm.fuzz.stack import char_tokenizer

    plan = tmp_path_factory.mktemp("talking") / "plan"
    shutil.copytree(tiny_plan, plan)
    for tier in ("device", "edge"):
        char_tokenizer().save_pretrained(str(plan / tier))
    return str(plan)
