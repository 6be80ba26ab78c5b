"""H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models").

Unified. Each kv head keeps a recent window of the newest tokens and the "heavy hitters": the
tokens with the largest accumulated attention, i.e. the attention they received from every
query since they entered the cache, summed (Sec. 4, Algorithm 1: the greedy H2 eviction; the
score of a token only grows while it is cached, and the lowest one outside the recent window
is evicted when the new token needs room).

  - GQA: a kv head's score sums the attention of the query heads of its group (H2O was written
    for multi-head attention, one score per head; a kv head serves G query heads, so it adds
    their votes). Each kv head keeps its own tokens.
  - budget split: `recent_ratio` of the budget is the recent window, the rest heavy hitters;
    the paper's experiments use equal parts (e.g. 10% heavy + 10% recent), so the default 0.5.
    A budget B keeps floor(B * recent_ratio) recent tokens.
  - prefill: every query of the prompt adds its attention (`window = -1`: the engine passes
    the sum of every query's probabilities in each prefill chunk, [B, Hq, 1, cache + chunk],
    computed in blocks of queries), so after the prompt a token's score is its column sum of
    the prompt's attention matrix, as in H2O's implementation; then the budget is applied
    once. Across prefill chunks the scores carry over exactly.
  - decode: each step, the new token's slot starts at 0, every slot adds this step's attention
    (the recursion s_t = s_{t-1} + sum over the group of p_t), then the engine evicts the
    lowest-scoring entry outside the recent window.
"""
from __future__ import annotations

import torch

from policies.base import PROTECT, Policy, group_sum, recent_mask


class H2O(Policy):
    name = "h2o"
    description = "H2O: heavy hitters by accumulated attention + a recent window (unified)"
    aliases = ("heavy_hitter",)
    needs_probs = True
    scores_at_step_end = True  # decode_scores is written for one layer or all at once
    recent_ratio = 0.5  # fraction of the budget given to the recent window

    def __init__(self):
        super().__init__()
        self.window = -1  # prefill: every query of the chunk adds its attention (structural, not an option)

    def check_options(self):
        if not 0 <= self.recent_ratio < 1:
            raise ValueError(f"h2o: recent_ratio must be in [0, 1) (got {self.recent_ratio})")

    def min_budget(self) -> int:
        """Smallest budget with at least one recent token (if any are asked for) and one heavy hitter."""
        need = 1
        while self.recent_ratio > 0 and int(need * self.recent_ratio) < 1:
            need += 1
        return need

    def check_budget(self, budget: int):
        need = self.min_budget()
        if budget < need:
            raise ValueError(f"h2o needs a budget of at least {need} (one heavy hitter and a recent window of "
                             f"floor(budget * recent_ratio={self.recent_ratio}) >= 1 tokens; got {budget})")

    def _recent(self, budget: torch.Tensor) -> torch.Tensor:
        return (budget.double() * self.recent_ratio).floor().long()

    # ---- state
    def allocate(self, num_layers, batch, kv_heads, capacity, device):
        self.register_buffer("scores", torch.zeros(num_layers, batch, kv_heads, capacity, device=device), persistent=False)
        self.register_buffer("recent", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self._prefill = [None] * num_layers

    def start(self, keep, pool_budget):
        self._prefill_recent = self._recent(keep)
        self.recent.copy_(self._recent(pool_budget))
        self._prefill = [None] * len(self._prefill)  # accumulated scores of what each layer kept so far
        self._candidates = [None] * len(self._prefill)

    def on_select(self, layer, idx, keep):
        self._prefill[layer] = self._candidates[layer].gather(-1, idx) * keep

    def on_prefill(self, layer, kept_scores, kept, cache=None):
        self.scores[layer].zero_()
        if self._prefill[layer] is not None:
            n = self._prefill[layer].shape[-1]
            self.scores[layer, :, :, :n] = self._prefill[layer]

    # ---- scoring
    def prefill_scores(self, layer, keys, values, pos, window_probs):
        acc = group_sum(window_probs.float().sum(dim=2), pos.shape[1])  # this chunk's queries
        if self._prefill[layer] is not None:  # the cache's entries come first among the candidates
            n = self._prefill[layer].shape[-1]
            acc[..., :n] += self._prefill[layer]
        self._candidates[layer] = acc
        return acc.masked_fill(recent_mask(pos, self._prefill_recent), PROTECT)

    def decode_scores(self, layer, probs, pos, written):
        acc = self.scores[layer, :, :, : pos.shape[-1]]
        acc.scatter_(-1, written.unsqueeze(-1), 0.0)  # a new token starts from nothing
        acc.add_(group_sum(probs, pos.shape[-2]))
        return acc.masked_fill(recent_mask(pos, self.recent), PROTECT)
