"""Convert a llama.cpp GGUF file into a Hugging Face style folder that `load_model` reads.

Every tensor is dequantized to float32 with the `gguf` package (the same routine transformers'
GGUF loader uses, so logits match it exactly), renamed from llama.cpp's names to Hugging Face's,
and written to model.safetensors. Metadata becomes config.json / generation_config.json, and the
GGUF's vocabulary and merges become a byte-level BPE tokenizer.json (with tokenizer_config.json
holding the chat template).

llama.cpp's converter permutes the rows of Q and K for "llama" GGUFs (it stores RoPE's pairs
interleaved, (x0, x1), (x2, x3), ..., while Hugging Face rotates halves, (x0, x_{D/2}), ...);
`unpermute` undoes it. Qwen3 GGUFs are stored unpermuted (NeoX RoPE), so nothing is undone there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tinyengine.errors import TinyEngineError

# Bump when the folder layout changes, so that caches made by older versions are rebuilt.
CONVERTER_VERSION = 1

ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}

# llama.cpp name (inside blk.N.) -> Hugging Face name (inside model.layers.N.)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Byte-level BPE pre-tokenization per `tokenizer.ggml.pre` (the regexes llama.cpp uses).
# SmolLM/StarCoder split every digit first, then apply GPT-2's regex (as SmolLM2's own
# tokenizer.json does: Digits(individual_digits) + ByteLevel).
DIGIT_SPLITTING = {"smollm", "starcoder", "refact", "codeshell", "command-r"}
SPLIT_REGEXES = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`)."""
    rows, cols = w.shape[0], w.shape[-1]
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(w.shape)


class _Meta:
    """Typed access to GGUF key/values with errors that name the missing key."""

    def __init__(self, reader, path):
        self.fields, self.path = reader.fields, path

    def get(self, key, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def need(self, key):
        value = self.get(key)
        if value is None:
            raise TinyEngineError(f"{self.path} lacks GGUF metadata {key!r}; it is not a complete model file")
        return value


def hf_config(meta: _Meta, tensor_names: set[str], rope_freqs: np.ndarray | None) -> dict:
    arch = meta.need("general.architecture")
    if arch not in ARCHITECTURES:
        raise TinyEngineError(f"GGUF architecture {arch!r} is not supported; tinyengine converts {', '.join(ARCHITECTURES)}")
    hf_arch, model_type = ARCHITECTURES[arch]
    heads = int(meta.need(f"{arch}.attention.head_count"))
    hidden = int(meta.need(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads)
    tokens = meta.need("tokenizer.ggml.tokens")
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(meta.get(f"{arch}.vocab_size") or len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.need(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length") or 2048),
        # Kept as stored (a float32 value), as transformers' GGUF loader does.
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon") or 1e-5),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        "rope_scaling": _rope_scaling(meta, arch, head_dim, rope_freqs),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "pad", "unk"):
        token_id = meta.get(f"tokenizer.ggml.{'unknown' if name == 'unk' else name}_token_id")
        if token_id is not None:
            cfg[f"{name}_token_id"] = int(token_id)
    return cfg


def _rope_scaling(meta: _Meta, arch: str, head_dim: int, rope_freqs: np.ndarray | None) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none") and rope_freqs is None:
        raise TinyEngineError(f"GGUF rope scaling {kind!r} is not supported; tinyengine supports Llama 3's")
    if rope_freqs is None:
        return None
    # Llama 3.1+ GGUFs store the per-frequency divisors as a tensor instead of the parameters.
    # Recognise the published parameter sets by recomputing their divisors.
    from models.llama import ModelArgs, rope_frequencies

    theta = float(meta.get(f"{arch}.rope.freq_base") or 10000.0)
    plain = ModelArgs(1, 1, 1, 1, 1, head_dim, 1, rope_theta=theta)
    for factor in (8.0, 32.0, 16.0, 4.0):
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        scaled = ModelArgs(1, 1, 1, 1, 1, head_dim, 1, rope_theta=theta, rope_scaling=scaling)
        divisors = (rope_frequencies(plain) / rope_frequencies(scaled)).numpy()
        if np.allclose(divisors, rope_freqs.reshape(-1), rtol=1e-4):
            return scaling
    raise TinyEngineError("GGUF rope_freqs tensor matches no Llama 3 rope scaling that tinyengine knows")


def hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None for tensors we drop."""
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    if base in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[base]}.{suffix}"
    return None


def dequantize(tensor) -> np.ndarray:
    import gguf

    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims fastest-first
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    data = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
    return data if data.flags.writeable else data.copy()  # F32 tensors are views of the read-only mmap


def build_tokenizer(meta: _Meta):
    """The GGUF's vocab + merges as a `tokenizers.Tokenizer` (byte-level BPE, as GPT-2/SmolLM2)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TinyEngineError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use the model's Hugging Face folder instead of the GGUF"
        )
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=pre not in SPLIT_REGEXES)
    if pre in DIGIT_SPLITTING:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in SPLIT_REGEXES:
        split = pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise TinyEngineError(f"GGUF pre-tokenizer {pre!r} is not supported; use the model's Hugging Face folder")
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                                                           special_tokens=[(bos, int(bos_id))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(meta: _Meta) -> dict:
    tokens = meta.need("tokenizer.ggml.tokens")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length") or 2048),
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            cfg[f"{name}_token"] = tokens[token_id]
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


def generation_config(meta: _Meta) -> dict:
    eos = []
    for key in ("eos", "eot", "eom"):  # end of sequence / turn / message all end a reply
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and int(token_id) not in eos:
            eos.append(int(token_id))
    cfg = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        cfg["bos_token_id"] = int(meta.get("tokenizer.ggml.bos_token_id"))
    return cfg


def convert_gguf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Write config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json for `gguf_path` into `out_dir` (created; files overwritten)."""
    import gguf
    from safetensors.torch import save_file
    from tqdm import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the reader fails in many ways (bad magic, truncation, ...) on a bad file
        raise TinyEngineError(f"cannot read GGUF file {gguf_path}: {e}; is it a complete .gguf download?") from None
    meta = _Meta(reader, gguf_path)
    names = {t.name for t in reader.tensors}
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = dequantize(by_name["rope_freqs.weight"]) if "rope_freqs.weight" in names else None
    config = hf_config(meta, names, rope_freqs)
    tokenizer = build_tokenizer(meta)  # before the slow part: fail fast on unsupported vocabularies

    permute_heads = {}
    if meta.get("general.architecture") == "llama":  # llama.cpp permutes Q/K only for "llama" models
        permute_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor", disable=not progress):
        name = hf_name(t.name)
        if name is None:
            continue
        w = dequantize(t)
        part = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if part in permute_heads and t.name.endswith(".weight"):
            w = unpermute(w, permute_heads[part])
        elif part in permute_heads:  # a bias (Q/K biases are rare in llama GGUFs) is permuted the same way
            w = unpermute(w[:, None], permute_heads[part])[:, 0]
        tensors[name] = torch.from_numpy(w)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    del tensors
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config(meta))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta))
    return out_dir


def _write_json(path: Path, obj: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.chmod(path, 0o644)
