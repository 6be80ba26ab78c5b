"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

Prefill only. The last `window` queries of the prompt (the observation window) vote for the
earlier tokens (Sec. 4, Eq. 1-2 and Listing 1):

  1. votes: each candidate's attention from the window's queries, averaged over the window
     (the paper sums; the ranking is the same);
  2. pooling: a 1-D max (or average) pooling of width `kernel` along the sequence, so the
     neighbours of an important token survive with it ("clustering via pooling");
  3. GQA: the pooled votes are averaged over the query heads that share a kv head (as
     kvpress's SnapKVPress, following FasterDecoding/SnapKV#22);
  4. the window's own tokens are always kept; each kv head keeps its top `budget` (Eq. 2).

Defaults window 32, kernel 7, max pooling: the paper's LongBench setting. kvpress's SnapKVPress
defaults to window 64, kernel 5 and average pooling (zero-padded, divided by the kernel);
`--policy-arg window=64 --policy-arg kernel=5 --policy-arg pooling=avg` selects exactly what it
selects (tests/test_kvpress_equality.py).

Where the window does not fit the budget (budget < window, possible with --ratio on short
prompts) the newest window tokens are kept. With chunked prefill each chunk's last `window`
queries score the compressed cache plus the chunk, and pooling runs along the cache order
(kept entries by position, then the chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from policies.base import PROTECT, Policy


def snapkv_scores(window_probs: torch.Tensor, pos: torch.Tensor, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """window_probs [B, Hq, W, N] (zero rows for missing queries), pos [B, Hkv, N] -> scores [B, Hkv, N]."""
    B, Hkv, N = pos.shape
    G = window_probs.shape[1] // Hkv
    in_window = pos > pos.amax(dim=-1, keepdim=True) - window
    votes = window_probs.float().mean(dim=2)  # [B, Hq, N]
    # The window's tokens take no part in pooling: kvpress pools the prefix alone, zero-padded.
    # Votes are >= 0, so zeros there change neither an average (count includes padding) nor a max.
    votes = votes.masked_fill(in_window.repeat_interleave(G, dim=1), 0.0)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    votes = pool(votes, kernel, stride=1, padding=kernel // 2)
    return votes.view(B, Hkv, G, N).mean(dim=2).masked_fill(in_window, PROTECT)


class SnapKV(Policy):
    name = "snapkv"
    description = "SnapKV: the prompt's last `window` queries vote, pooled (prefill only)"
    has_decode = False
    window = 32  # observation window (queries at the end of the prompt)
    kernel = 7  # pooling width (odd)
    pooling = "max"  # "max" (the paper) or "avg" (kvpress)

    def check_options(self):
        if self.window < 1:
            raise ValueError(f"{self.name}: window must be at least 1 (got {self.window})")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be odd and positive (got {self.kernel})")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"{self.name}: pooling must be max or avg (got {self.pooling!r})")

    def check_budget(self, budget: int):
        if budget < self.window + 1:
            raise ValueError(f"{self.name} always keeps its observation window of {self.window} tokens: "
                             f"--budget must be at least window + 1 = {self.window + 1} (got {budget}); "
                             "or lower it with --policy-arg window=N")

    def prefill_scores(self, layer, keys, values, pos, window_probs):
        return snapkv_scores(window_probs, pos, self.window, self.kernel, self.pooling)
