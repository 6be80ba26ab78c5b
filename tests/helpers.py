"""Real checkpoint folders for tests: tiny random models written by transformers, and the
embedded SmolLM2 converted once per session."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

# ChatML, as SmolLM2 and Qwen use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Madrid is the capital of Spain.",
    "def add(a, b):\n    return a + b\n",
    "Attention is all you need. Keys and values are cached.",
    "naïve café, 東京, emoji 😀 and numbers 1234567890",
] * 4

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_json() -> str:
    """A small byte-level BPE (256 bytes + merges + ChatML specials) trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def hf_config(family: str, tied: bool, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    common = dict(TINY, vocab_size=vocab_size, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaConfig(**common, rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, architectures=["LlamaForCausalLM"])
    if family == "qwen3":  # head_dim 24 != 64 / 4
        return Qwen3Config(**common, head_dim=24, rope_theta=1000000.0, architectures=["Qwen3ForCausalLM"])
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None, rope_theta=1000000.0, architectures=["MistralForCausalLM"])
    raise ValueError(f"unknown family {family!r}")


def tiny_hf_model(family: str = "llama", tied: bool = False, seed: int = 0):
    from transformers import AutoModelForCausalLM

    vocab = json.loads(tiny_tokenizer_json())["model"]["vocab"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, tied, len(vocab)), dtype=torch.float32).eval()
    with torch.no_grad():  # default init makes norms all-ones; random ones check that they are loaded
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def write_tiny_checkpoint(path, family: str = "llama", tied: bool = False, shards: int = 1, seed: int = 0,
                          model=None) -> Path:
    """A real checkpoint folder: transformers' save_pretrained (safetensors, at least `shards` files with an index when > 1),
    tokenizer.json, tokenizer_config.json (ChatML template) and generation_config.json."""
    path = Path(path)
    model = model if model is not None else tiny_hf_model(family, tied, seed)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # transformers packs whole tensors into shards of at most max_shard_size, so asking for
    # total/shards gives at least `shards` files (a few more when tensors do not pack evenly).
    model.save_pretrained(path, max_shard_size="10GB" if shards == 1 else total // shards)
    written = list(path.glob("*.safetensors"))
    assert len(written) >= shards and (shards > 1) == (path / "model.safetensors.index.json").is_file()
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
               "clean_up_tokenization_spaces": False}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}), encoding="utf-8")
    return path


@functools.lru_cache(maxsize=None)
def smollm2_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF converted (once per $TINYENGINE_CACHE)."""
    from tinyengine.checkpoint import resolve_checkpoint

    return resolve_checkpoint("smollm2-135m", progress=False)


def causal_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [B, T, V] through the model's forward with the reference attention."""
    from tinyengine.attention import attention

    B, T = tokens.shape
    pos = torch.arange(T).expand(B, T)

    def attend(q, k, v):
        return attention(q, k, v, pos, pos[:, None, :].expand(-1, k.shape[1], -1), backend="reference")

    with torch.no_grad():
        return model(tokens, pos, lambda i: attend)
