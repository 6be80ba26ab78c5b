"""SCOPE (Wu et al. 2024, "SCOPE: Optimizing Key-Value Cache Compression in Long-context
Generation"), with its Slide strategy for the decoding phase.

SCOPE separates the two phases' caches: the prompt's entries form a prefill pool that
is frozen after prefill, and the generated tokens a decoding pool of its own budget, so long
outputs cannot push out what the prompt needed and the prompt cannot crowd the output.

  prefill pool  SnapKV selection to --budget (policies/snapkv.py, same options); without
                --budget or --ratio the whole prompt is kept (the paper's main setting).
  decoding pool `--decode-budget` generated tokens per kv head (default 512, one of the
                paper's two budgets): the newest `recent` tokens are always kept, and the rest
                of the pool holds the generated tokens with the largest attention from the
                current query (Slide: "heavy hitters" re-selected at every step from the
                instantaneous attention, summed over the query heads of the kv head's group;
                the authors' code: recent window 256 within a decoding budget of 512 or 1024).
                In our engine that is: evict the generated token outside the recent window
                with the least attention from this step's query.

Only the Slide strategy is implemented. The Adaptive one (the decoding pool grows by one slot
every `delta` steps up to the budget) and Discontinuous one (re-select only every few steps)
save memory and memory traffic in a cache that grows; a static cache is allocated at the full
decoding budget at once and evicting costs no copy, so neither would save anything here.

A single name behaves as a composed plan (`separate_pools`): see policies/__init__.py.
"""
from __future__ import annotations

from policies.base import PROTECT, group_sum, recent_mask
from policies.snapkv import SnapKV


class Scope(SnapKV):
    name = "scope"
    description = "SCOPE: SnapKV prompt pool frozen + a decoding pool by Slide (--decode-budget)"
    has_decode = True
    needs_probs = True
    scores_at_step_end = True  # decode_scores is written for one layer or all at once
    separate_pools = True
    default_decode_budget = 512
    recent = 256  # newest generated tokens always kept in the decoding pool

    def check_options(self):
        super().check_options()
        if self.recent < 1:
            raise ValueError(f"scope: recent must be at least 1 (got {self.recent})")

    def check_decode_budget(self, decode_budget: int):
        if decode_budget < self.recent + 1:
            raise ValueError(f"scope keeps a recent window of {self.recent} generated tokens: --decode-budget must be "
                             f"at least recent + 1 = {self.recent + 1} (got {decode_budget}); "
                             "or lower it with --policy-arg recent=N")

    def decode_scores(self, layer, probs, pos, written):
        return group_sum(probs, pos.shape[-2]).masked_fill(recent_mask(pos, self.recent), PROTECT)
