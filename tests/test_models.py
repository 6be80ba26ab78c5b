"""Logits equal transformers' (float32, 1e-4) for every family, loaded from real safetensors folders."""
import pytest
import torch
from helpers import causal_logits, tiny_hf_model, write_tiny_checkpoint

from tinyengine.engine import Engine
from tinyengine.weights import load_model

CASES = [(family, tied, shards) for family in ("llama", "qwen3", "mistral") for tied in (False, True) for shards in (1, 3)]


@pytest.mark.parametrize("family,tied,shards", CASES)
def test_logits_equal_transformers(tmp_path, family, tied, shards):
    hf = tiny_hf_model(family, tied, seed=2 * shards + tied)
    folder = write_tiny_checkpoint(tmp_path / "ckpt", family, tied, shards, model=hf)
    model = load_model(folder)
    assert model.args.family == family and model.args.tie_word_embeddings == tied
    assert not hasattr(model, "lm_head") if tied else torch.equal(model.lm_head.weight, hf.lm_head.weight)
    # 80 tokens: past Llama 3's original context of 64, where its rope scaling matters most.
    tokens = torch.randint(0, hf.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(causal_logits(model, tokens), expected, atol=1e-4, rtol=0)
    # The engine's prefill (SDPA over the cache) gives the same last-token logits.
    engine = Engine(model)
    engine.setup(2, 96)
    last = engine.prefill(tokens, torch.tensor([80, 80]))
    torch.testing.assert_close(last, expected[:, -1], atol=1e-4, rtol=0)


def test_family_specifics_reach_the_model(tmp_path):
    qwen = load_model(write_tiny_checkpoint(tmp_path / "q", "qwen3"))
    assert qwen.args.head_dim == 24 and qwen.args.qk_norm and qwen.model.layers[0].self_attn.q_proj.out_features == 4 * 24
    llama = load_model(write_tiny_checkpoint(tmp_path / "l", "llama"))
    assert llama.args.rope_scaling["rope_type"] == "llama3" and llama.args.rope_theta == 500000.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_on_load(tmp_path, dtype):
    hf = tiny_hf_model("llama")
    model = load_model(write_tiny_checkpoint(tmp_path, model=hf), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.inv_freq.dtype == torch.float32  # RoPE angles stay float32
    torch.testing.assert_close(model.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(dtype))
    tokens = torch.randint(0, hf.config.vocab_size, (1, 16))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(causal_logits(model, tokens), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("tied", [False, True])
def test_cpu_projections_are_column_major(tmp_path, tied):
    """tinyengine/weights.py stores decode's matrices column-major on CPU (faster one-row products):
    same shapes and values as the checkpoint, transposed strides; vectors stay contiguous."""
    hf = tiny_hf_model("llama", tied)
    model = load_model(write_tiny_checkpoint(tmp_path, "llama", tied, model=hf))
    for name, p in model.named_parameters():
        expected = hf.state_dict()[name]
        assert torch.equal(p, expected), name
        column_major = name.endswith("_proj.weight") or name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")
        assert p.stride() == ((1, p.shape[0]) if column_major else expected.contiguous().stride()), name
