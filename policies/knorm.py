"""KNorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression").

Prefill only. The paper observes that keys with a low L2 norm receive high attention, so each
kv head keeps the entries whose keys have the smallest norm: score = -||k||_2 (computed in
float32, as kvpress's KnormPress). Keys are the cached ones, after RoPE (RoPE is a rotation,
so the norm is the same as before it). No attention is needed.
"""
from __future__ import annotations

import torch

from policies.base import Policy


class KNorm(Policy):
    name = "knorm"
    description = "KNorm: keep the prompt keys with the smallest L2 norm (prefill only)"
    has_decode = False

    def prefill_scores(self, layer, keys, values, pos, window_probs):
        return -torch.linalg.vector_norm(keys.float(), dim=-1)
