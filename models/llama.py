"""One Llama-family decoder: Llama 3.x, Mistral, Qwen3 and SmolLM2.

The differences between the families are a handful of config fields:
  - Llama 3.x: rope_scaling {"rope_type": "llama3", ...} stretches the low RoPE frequencies.
  - Qwen3: RMSNorm on each head's q and k (q_norm / k_norm) and head_dim != hidden / heads.
  - SmolLM2 (and Llama 3.2 1B/3B): tied input/output embeddings.
  - Mistral v0.3: plain Llama with its own theta (sliding_window null in v0.3).

Parameter names are exactly the Hugging Face checkpoint names, so loading is a dict lookup.
The model holds no cache: attention reads and writes the layer's `tinyengine.cache.KVCache`,
which the engine hands in, so the same module serves prefill, chunked prefill and the
compiled decode step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models import linear_forms
from models.linear_forms import linear, pack
from tinyengine.errors import TinyEngineError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3
    attention_bias: bool = False
    family: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise TinyEngineError(
                f"unsupported architecture {arch!r} (config.json 'architectures'); "
                f"tinyengine runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = cfg["num_attention_heads"]
        if family == "mistral" and cfg.get("sliding_window"):
            # Mistral v0.1 used a 4K sliding window; v0.2+ set it to null. A static cache with a
            # policy is the sliding-window alternative here, so refuse rather than silently differ.
            raise TinyEngineError(
                f"Mistral with sliding_window={cfg['sliding_window']} is not supported; "
                "use Mistral v0.2 or later (sliding_window null)"
            )
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=family == "qwen3",
            attention_bias=bool(cfg.get("attention_bias", False)),
            family=family,
        )


def _rope_theta(cfg: dict) -> float:
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}  # transformers >= 5 writes rope_parameters
    return float(params.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict) -> dict | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise TinyEngineError(f"unsupported rope_scaling type {kind!r}; tinyengine supports 'llama3'")
    return dict(scaling)


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama 3's piecewise rescaling when configured."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D] (the Hugging Face "rotate half" layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) whose forward is `linear`."""

    packed = None  # oneDNN-blocked copy of `weight` (Transformer.pack_weights); not a parameter or buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)

    def forward(self, x, cos, sin, attend):
        """attend(q, k, v) -> [B, Hq, T, D] is the engine's cache-aware attention for this layer."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    """Holds the `model.*` parameters so names match the checkpoints."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = _Body(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.output_packed = None  # pack_weights
        self.measured_rows = set()  # (rows, threads) that measure_linear has seen

    def pack_weights(self):
        """Keep a oneDNN-blocked copy of every weight matrix (the output layer's too), a third form
        for `models.linear_forms` to measure and use where fastest (often from ~4 rows: batched
        decode on CPU; the linear table of BENCHMARKS.md), for twice the weight memory. Float32 on
        CPU only; call it after the weights are loaded (or sharded), since the copy does not follow
        later changes to them."""
        weight = self.output_weight()
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
            raise ValueError(f"pack_weights needs float32 weights on a CPU with oneDNN (got {weight.dtype} on {weight.device})")
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = pack(m.weight)
        self.output_packed = pack(weight)
        self.measured_rows.clear()  # measure again, with the packed form

    def measure_linear(self, rows: int, max_bytes: int = 2**30):
        """Choose the fastest form of each weight product of `rows` rows (models/linear_forms.py), once per
        row count, shape and thread count in a process: times the layers' matrices in order (as many
        whole layers as fit in `max_bytes`, at least one) and the output layer's. forward() calls it
        (a forked worker with fewer threads measures again) and Engine.setup does for its batch, so
        a timed step does not pay for it (SmolLM2: ~0.5 s per row count on 2 cores)."""
        if rows > linear_forms.TUNED_ROWS or (rows, torch.get_num_threads()) in self.measured_rows:
            return
        self.measured_rows.add((rows, torch.get_num_threads()))
        mats, size = [], 0
        for layer in self.model.layers:
            mine = [(m.weight, m.packed) for m in layer.modules() if isinstance(m, Linear)]
            size += sum(w.numel() * w.element_size() for w, _ in mine)
            if mats and size > max_bytes:
                break
            mats += mine
        mats.append((self.output_weight(), self.output_packed))
        linear_forms.measure(mats, rows)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, T] (int) -> cos, sin [B, T, head_dim]."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, tokens, positions, attend_for_layer, last_only: torch.Tensor | None = None):
        """tokens, positions: [B, T]. attend_for_layer(i) gives layer i's attention callable.

        last_only: optional [B] index of the one position per row whose logits are wanted
        (prefill needs only the last real token; computing 49K-way logits for every
        prompt token would dominate prefill time).
        """
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            self.measure_linear(tokens.numel())
            if last_only is not None:
                self.measure_linear(len(last_only))
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, attend_for_layer(i))
        if last_only is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_only].unsqueeze(1)
        x = self.model.norm(x)
        return linear(x, self.output_weight(), packed=self.output_packed).float()
