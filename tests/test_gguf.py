"""The embedded SmolLM2 GGUF converted by tinyengine equals transformers loading the same GGUF."""
import json

import numpy as np
import pytest
import torch
from helpers import causal_logits

from tinyengine.checkpoint import embedded_gguf, resolve_checkpoint
from tinyengine.engine import Engine
from tinyengine.gguf_convert import unpermute
from tinyengine.tokenizer import Tokenizer
from tinyengine.weights import load_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loader (it dequantizes and un-permutes by itself): the reference."""
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_model(smollm2), Tokenizer.from_folder(smollm2)


def test_logits_equal_transformers_gguf(reference, ours):
    model, tok = ours
    ids = torch.tensor([tok.encode(tok.apply_chat_template(QUESTION), add_special_tokens=False)])
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(causal_logits(model, ids), expected, atol=1e-4, rtol=0)


def test_greedy_32_tokens_equal_transformers_gguf(reference, ours):
    model, tok = ours
    prompt = tok.encode(tok.apply_chat_template(QUESTION), add_special_tokens=False)
    mine = Engine(model).generate([prompt], 32)[0]  # no stop tokens: all 32 are compared
    ids = torch.tensor([prompt])
    theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=None)[0, len(prompt):].tolist()
    assert mine == theirs
    assert "Paris" in tok.decode(mine)


def test_converted_folder(smollm2):
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 576, 9, 3)
    assert cfg["rope_theta"] == 100000.0 and cfg["vocab_size"] == 49152
    gen = json.loads((smollm2 / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    tok = Tokenizer.from_folder(smollm2)
    assert tok.has_chat_template and tok.stop_token_ids == [2]
    assert tok.special_tokens["eos_token"] == "<|im_end|>"


def test_conversion_is_cached_and_atomic(smollm2, tinyengine_cache):
    assert smollm2.is_relative_to(tinyengine_cache)
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert resolve_checkpoint("smollm2-135m", progress=False) == smollm2  # second use: no conversion
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in smollm2.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary folder survives


def test_gguf_path_converts_into_the_same_cache(smollm2):
    assert resolve_checkpoint(str(embedded_gguf()), progress=False) == smollm2


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's convert_hf_to_gguf `permute`: reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)."""
    rng = np.random.default_rng(0)
    for n_head, head_dim, cols in [(9, 64, 576), (3, 64, 576), (4, 8, 5)]:
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(unpermute(permuted, n_head), w)


# ----------------------------------------------------------------------------- GGUF round trip
# A tiny Hugging Face model written as llama.cpp's convert_hf_to_gguf.py writes it (F32, Q/K rows
# permuted for "llama", rope_freqs for Llama 3 scaling, vocab + merges), converted back by
# tinyengine: logits equal the original model's, tokens equal the original tokenizer's.

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path, arch: str):
    import gguf
    from helpers import CHAT_TEMPLATE, tiny_tokenizer_json

    cfg = hf.config
    tok = json.loads(tiny_tokenizer_json())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        a = t.float().numpy().copy()
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{names[module]}.{suffix}"
            if arch == "llama" and module == "self_attn.q_proj":
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            if arch == "llama" and module == "self_attn.k_proj":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        w.add_tensor(gname, a)
    if (cfg.rope_parameters or {}).get("rope_type") == "llama3":
        from models.llama import ModelArgs, rope_frequencies

        plain = ModelArgs(1, 1, 1, 1, 1, cfg.head_dim, 1, rope_theta=cfg.rope_parameters["rope_theta"])
        scaled = ModelArgs(1, 1, 1, 1, 1, cfg.head_dim, 1, rope_theta=cfg.rope_parameters["rope_theta"],
                           rope_scaling=dict(LLAMA31_ROPE))
        w.add_tensor("rope_freqs.weight", (rope_frequencies(plain) / rope_frequencies(scaled)).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen3", False)])
def test_gguf_round_trip(tmp_path, family, tied):
    from helpers import hf_config, tiny_hf_model, tiny_tokenizer_json
    from transformers import AutoModelForCausalLM

    if family == "llama":  # Llama 3.1's own rope scaling: the converter must recognise it from rope_freqs
        cfg = hf_config("llama", tied, len(json.loads(tiny_tokenizer_json())["model"]["vocab"]))
        cfg.rope_parameters = {**LLAMA31_ROPE, "rope_theta": 500000.0}
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    else:
        hf = tiny_hf_model(family, tied)
    gguf_file = write_gguf(hf, tmp_path / f"tiny-{family}.gguf", family)
    folder = resolve_checkpoint(str(gguf_file), progress=False)
    model = load_model(folder)
    assert model.args.tie_word_embeddings == tied and model.args.head_dim == hf.config.head_dim
    if family == "llama":
        assert model.args.rope_scaling["factor"] == 8.0
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(causal_logits(model, tokens), expected, atol=1e-4, rtol=0)

    from tokenizers import Tokenizer as HFTokenizer

    original = HFTokenizer.from_str(tiny_tokenizer_json())
    ours = Tokenizer.from_folder(folder)
    for text in ["The quick brown fox", "café 😀 <|im_start|>user\nhi<|im_end|>", "  spaces\n\n"]:
        assert ours.encode(text) == original.encode(text).ids
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.stop_token_ids == [2]
