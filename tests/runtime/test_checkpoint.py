"""Checkpoint discovery and the llama -> GLM conversion."""

from __future__ import annotations

import json

import pytest
import torch

from partitioner.convert import glm_config, glm_state_dict, halves_to_pairs
from runtime.checkpoint import CheckpointError, load_spec


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_spec(tmp_path / "nothing-here")


def test_hub_id_is_refused_with_a_hint():
    with pytest.raises(CheckpointError, match="hub id"):
        load_spec("THUDM/glm-edge-1.5b-chat")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        load_spec(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm"}))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_spec(tmp_path)


def test_halves_to_pairs_interleaves_each_head():
    heads, dim = 2, 4
    w = torch.arange(heads * dim, dtype=torch.float)[:, None]  # row i holds i
    assert halves_to_pairs(w, heads, dim)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("tied", [True, False])
def test_llama_converts_to_the_same_glm_network(tmp_path, tied):
    from safetensors.torch import save_file
    from transformers import GlmForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, tie_word_embeddings=tied, rope_parameters={"rope_theta": 5000.0,
            "rope_type": "default"},
        )
    ).eval()
    (tmp_path / "config.json").write_text(json.dumps(glm_config(llama)))
    save_file(glm_state_dict(llama), str(tmp_path / "model.safetensors"))
    glm = GlmForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 80, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(glm(ids).logits, llama(ids).logits, atol=1e-5, rtol=0)
