"""KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
LLM Inference in Resource-Constrained Environments").

Prefill only. Keys that point away from the others carry distinct information, so each kv head
keeps the keys least similar to the mean key direction: anchor = mean of the unit-normalized
keys of the candidates, score = -cos(k, anchor) (the paper's anchor-based score; the same
formula as kvpress's KeyDiffPress). No attention is needed.

Empty candidates (padding of shorter prompts in a batch, dropped entries) are left out of the
anchor. With chunked prefill the anchor is that of the compressed cache plus the chunk, which is
the paper's block-wise iterative eviction (kvpress: BlockPress(KeyDiffPress)).
"""
from __future__ import annotations

import torch.nn.functional as F

from policies.base import Policy


class KeyDiff(Policy):
    name = "keydiff"
    description = "KeyDiff: keep the prompt keys least similar to the mean key (prefill only)"
    has_decode = False

    def prefill_scores(self, layer, keys, values, pos, window_probs):
        keys = keys.float()
        valid = (pos >= 0).unsqueeze(-1)
        unit = F.normalize(keys, p=2, dim=-1) * valid
        anchor = unit.sum(dim=2, keepdim=True) / valid.sum(dim=2, keepdim=True).clamp(min=1)
        return -F.cosine_similarity(keys, anchor, dim=-1)
