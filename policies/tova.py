"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): Token Omission Via Attention.

Unified. At every step the cache holds at most `budget` entries; when a new token pushes it
over, TOVA drops the entry to which the current query gives the least attention, averaged over
all the attention heads of the layer (one decision per layer, so every kv head keeps the same
tokens). No state is kept between steps.

  decode   score = mean over the layer's query heads of this step's attention probabilities;
           the new token is scored like the others (it may be dropped at once, as in TOVA).
  prefill  score = the prompt's last query's attention, averaged over all heads (kvpress's
           TOVAPress); the last token itself is always kept (kvpress does the same, "a very
           slight difference from TOVA"). With chunked prefill each chunk's last query scores.

The head average goes through `tinyengine.dist.head_mean`, so tensor-parallel ranks (each
holding some heads) make the single process's decision.

Averaging over heads slot by slot needs every kv head to hold the same token in the same slot.
TOVA keeps that true by construction: every kv head gets the same scores, hence the same
selection at prefill (candidates in position order), the same first free slot and the same
victim (ties broken by position) at every step. Under composition (`snapkv+tova`) the prompt
entries differ per kv head, but they are frozen and the generated ones (the pool) stay aligned.
"""
from __future__ import annotations

from policies.base import PROTECT, Policy
from tinyengine.dist import head_mean


class TOVA(Policy):
    name = "tova"
    description = "TOVA: drop the entry the current query attends least, averaged over heads (unified)"
    needs_probs = True
    scores_at_step_end = True  # decode_scores is written for one layer or all at once

    def __init__(self):
        super().__init__()
        self.window = 1  # the prompt's (each prefill chunk's) last query; structural, so not an option

    def prefill_scores(self, layer, keys, values, pos, window_probs):
        scores = head_mean(window_probs[:, :, -1], dim=1).unsqueeze(1).expand(pos.shape)
        last = pos == pos.amax(dim=-1, keepdim=True)
        return scores.masked_fill(last, PROTECT)

    def decode_scores(self, layer, probs, pos, written):
        return head_mean(probs, dim=-2).unsqueeze(-2).expand(pos.shape)
