"""Moment-KV (moment-kv-momentum.txt, Algorithm 1): momentum-scored decode-time eviction.

Decode only: the prompt's entries (all of them alone; whatever the prefill policy kept when
composed, e.g. `snapkv+momentum`) are frozen, and the generated tokens share a pool of
`--decode-budget` entries per kv head (Eq. 3). Each generated token i carries an importance
s_i, updated at every decode step t from the attention a_i it receives from the current query,
averaged over all query heads of the layer (Eq. 4):

    s_i <- beta s_i + (1 - beta) a_i                          (Eq. 5)

(`one_minus_beta=False` is the appendix's s_i <- beta s_i + a_i. Both start at 0 and are
linear in a, so s differs by the constant factor 1/(1-beta) and every eviction is the same;
the option exists so the scores can be compared or combined with the paper's appendix.)

The new token enters the pool with s = 0 and receives this step's update, i.e. (1 - beta)
times its own self-attention, before the capacity check (Eq. 6). Then, if the pool holds more
than the budget, its lowest-scoring token is evicted (Eq. 7-9), which may be the new token
itself. No recency window. The engine's `choose_victim` does the check and the argmin over the
pool (generated positions only, since the plan is not unified).

`debias=True` (not in the paper; off by default) ranks by s / (1 - beta^age), age = the steps
since the token entered: Adam's bias correction, so a token's score estimates its mean
attention from the first step instead of starting near 0 and needing ~1/(1 - beta) steps to
catch up with older tokens. The paper's rule (debias=False) makes a fresh token compete with
(1 - beta) times its self-attention, so the newest tokens go first; BENCHMARKS.md's long
generation table runs both.

`per_kv_head=True` averages over the query heads of each GQA group instead of all heads, so
each kv head ranks its tokens by its own group's attention. The paper's default is all heads;
that mean goes through `tinyengine.dist.head_mean`, so tensor-parallel ranks agree.
"""
from __future__ import annotations

import torch

from policies.base import Policy
from tinyengine import fused
from tinyengine.dist import head_mean

STATIONARY = 1e6  # the age of entries whose score is not an EMA started at 0 (no bias to correct)


def received_attention(probs: torch.Tensor, kv_heads: int, per_kv_head: bool) -> torch.Tensor:
    """Attention each slot receives, [..., Hq, S] -> [..., Hkv, S]: mean over all query heads (Eq. 4)
    or over each kv head's group."""
    if per_kv_head:
        return probs.unflatten(-2, (kv_heads, -1)).mean(-2)
    mean = head_mean(probs, dim=-2).unsqueeze(-2)
    return mean.expand(*mean.shape[:-2], kv_heads, mean.shape[-1])


def momentum_update(s: torch.Tensor, a: torch.Tensor, written: torch.Tensor, beta: float, one_minus_beta: bool,
                    age: torch.Tensor | None = None):
    """In place: s [B, Hkv, S] <- beta s + (1 - beta) a, with the written slot's s reset to 0 first (Eq. 5-6).

    Returns s, or with `age` (steps each slot has been scored, updated in place) s / (1 - beta^age).
    """
    idx = written.unsqueeze(-1)
    s.scatter_(-1, idx, 0.0)
    s.mul_(beta).add_(a, alpha=(1.0 - beta) if one_minus_beta else 1.0)
    if age is None:
        return s
    age.scatter_(-1, idx, 0.0).add_(1.0)
    return s / (1.0 - torch.pow(beta, age))


class Momentum(Policy):
    name = "momentum"
    description = "Moment-KV: prompt frozen, generated tokens kept by momentum of attention (--decode-budget)"
    aliases = ("moment-kv",)
    has_prefill = False
    has_decode = True
    needs_probs = True
    scores_at_step_end = True  # decode_scores is written for one layer or all at once
    beta = 0.97  # momentum factor (the paper grid-searched 0.3 to 0.98)
    one_minus_beta = True  # Eq. 5 as in the main text; False: the appendix's s <- beta s + a
    per_kv_head = False  # True: average over each GQA group's heads instead of all heads
    debias = False  # True: rank by s / (1 - beta^age) (not in the paper)

    def check_options(self):
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"momentum: beta must be in [0, 1) (got {self.beta})")

    def allocate(self, num_layers, batch, kv_heads, capacity, device):
        self.register_buffer("scores", torch.zeros(num_layers, batch, kv_heads, capacity, device=device), persistent=False)
        self.register_buffer("age", torch.zeros(num_layers, batch, kv_heads, capacity if self.debias else 0, device=device),
                             persistent=False)

    def on_prefill(self, layer, kept_scores, kept, cache=None):
        self.scores[layer].zero_()  # the prompt is frozen; generated tokens start at 0 when written
        self.age[layer].fill_(STATIONARY)

    def decode_scores(self, layer, probs, pos, written):
        a = received_attention(probs, pos.shape[-2], self.per_kv_head)
        s = self.scores[layer][..., : pos.shape[-1]]  # a layer's cache may be smaller (per-layer budgets)
        age = self.age[layer][..., : pos.shape[-1]] if self.debias else None
        if self.one_minus_beta:  # eager on a CPU: one C pass (tinyengine/fused.py; this is its reference)
            scores = fused.momentum_scores(s, a, written, self.beta, age)
            if scores is not None:
                return scores
        return momentum_update(s, a, written, self.beta, self.one_minus_beta, age)
