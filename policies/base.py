"""The policy interface: who stays in the KV cache.

A policy scores cache entries per (batch row, kv head); higher means keep. It is consulted at
two moments:

  prefill  `prefill_scores(layer, keys, values, pos, window_probs)` sees every candidate of the
           layer (the compressed cache so far plus the new prompt chunk) and, if it sets
           `window > 0`, the attention of the chunk's last `window` real queries over those
           candidates (`window = -1`: every query of the chunk, summed into one row, h2o). The engine keeps the
           `budget` best per kv head (per layer: `layer_keep`, pyramidkv) and reports the
           selection with `on_select`; `start` opens each prefill with the per-row budgets.
  decode   `decode_scores(layer, probs, pos, written)` runs inside the compiled decode step
           after the new token was written into slot `written` [B, Hkv] and attention was
           computed; `probs` [B, Hq, S] is that step's attention over slots (only when
           `needs_probs`). It updates the policy's state (buffers, in place) and returns the
           scores of all slots. After the step's last layer, the engine's `choose_victim` turns
           every layer's scores into the slot to free per kv head (one call over all layers),
           and that layer's next token is written there.
           A policy whose `decode_scores` also takes every layer at once sets
           `scores_at_step_end`: then the engine calls `observe(layer, probs, pos, written, ...)`
           at each layer (by default it keeps `probs`) and `score_step(slice(None), pos, written,
           moments)` once after the last layer, which by default calls `decode_scores(slice(None),
           probs [L, B, Hq, S], pos [L, B, Hkv, S], written [L, B, Hkv])` (a smaller layer's
           slots padded with zeros: per-layer budgets). An eager step on a CPU pays per op, so
           scoring that batches over layers costs its op count once, not once per layer
           (BENCHMARKS.md, decode speed against context length). Written over leading dims
           (`...`, the last axes), one scorer serves both calls; every built-in decode policy
           does. momentkv overrides `observe` (it keeps what needs the layer's cache).

Decode code is branch-free tensor code: no .item(), no Python branch on data, so the decode
step compiles once. Per-layer state lives in buffers allocated by `allocate` for the largest
layer's cache; a layer's cache may be smaller (per-layer budgets, `layer_keep`), so index
per-slot state with `[..., :pos.shape[-1]]`.

Ties: when scores tie, the older token is evicted first (prefill keeps the newer), so which
tokens survive never depends on the order of the slots.

`CachePlan` composes a prefill part and a decode part (`snapkv+momentum`) and sizes the
static cache; see its docstring for the rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NEVER_EVICT = float("inf")
# Score of entries a policy must keep (sinks, recent windows, the observation window). Finite, so
# that if a pool ever held nothing else the argmin would still pick one of them (the oldest).
PROTECT = 1e30


class Policy(nn.Module):
    """Base class; on its own it is `full`: every entry scores the same and none is evicted."""

    name = "full"
    description = "keep everything (no eviction; runs the policy machinery, as a check)"
    has_prefill = True  # compresses the prompt
    has_decode = True  # evicts generated tokens
    window = 0  # prefill observation window the scorer needs (queries); 0 = none
    needs_probs = False  # decode_scores reads the step's attention probabilities
    scores_at_step_end = False  # decode_scores also scores every layer at once (module docstring)
    aliases: tuple[str, ...] = ()
    # One name that keeps the prompt's entries and the generated ones in separate pools (SCOPE):
    # make_plan builds it as a composed plan, prompt to --budget, generated within --decode-budget.
    separate_pools = False
    default_decode_budget: int | None = None  # --decode-budget when a separate-pools policy gets none
    # Options a user may set with --policy-arg key=value are the other plain class attributes.

    def __init__(self):
        super().__init__()
        self._kept = {}  # layer -> what `observe` kept this decode step (scores_at_step_end); not state

    def check_options(self):
        """Raise ValueError for option values the policy cannot run with (after --policy-arg)."""

    def check_budget(self, budget: int):
        """Raise ValueError naming the smallest budget this policy can honour."""
        if budget < 1:
            raise ValueError(f"budget must be at least 1 (got {budget})")

    def check_decode_budget(self, decode_budget: int):
        """The same for --decode-budget (the generated tokens' pool)."""
        self.check_budget(decode_budget)

    def layer_keep(self, layer: int, num_layers: int, keep: int, length: int) -> int:
        """Prompt entries layer `layer` keeps when the plan keeps `keep` of a `length`-token prompt
        per layer on average (PyramidKV). Default: every layer the same. Prefill parts only."""
        return keep

    # ---- state
    def allocate(self, num_layers: int, batch: int, kv_heads: int, capacity: int, device):
        """Allocate per-layer decode state for a cache of `capacity` slots. Default: none."""

    def start(self, keep: torch.Tensor, pool_budget: torch.Tensor):
        """At the start of each prefill: entries each row keeps of its prompt and its decode pool budget, [B] each."""

    def on_select(self, layer: int, idx: torch.Tensor, keep: torch.Tensor):
        """After each prefill selection: the cache now holds candidates `idx` [B, Hkv, n] (of the
        last `prefill_scores` call), where `keep`. For state that follows the kept entries."""

    def on_prefill(self, layer: int, kept_scores: torch.Tensor, kept: int, cache=None):
        """After prefill kept `kept` entries in slots [0, kept) with prefill scores `kept_scores`;
        `cache` is the layer's KVCache as prefill left it."""

    # ---- scoring
    def prefill_scores(self, layer, keys, values, pos, window_probs) -> torch.Tensor:
        return torch.zeros(pos.shape, device=pos.device)

    def decode_scores(self, layer, probs, pos, written) -> torch.Tensor:
        return torch.zeros(pos.shape, device=pos.device)

    def fused_score(self, correction):
        """How the fused CPU decode kernel (tinyengine/fused.py) serves this policy. None: it computes
        attention (and the probabilities, if `needs_probs`) as usual; a float w: it also computes the
        policy's per-slot decode observation with MI weight w, every layer's into one [L, B, Hkv, S]
        buffer that `score_step` gets as `observed` (observe is not called; momentkv); False: not at
        all, the torch path (the policy reads what only that path gives)."""
        return None

    def fused_step_end(self, pos, written, observed, pool_from, pool_budget, moments, keys, values) -> bool:
        """For a policy served by `fused_score`: the engine's whole step end (score_step on `observed`,
        the victim choice, the victims absorbed into `moments` and freed in `pos`, `written` set to
        the victims) in one pass of a kernel, if the policy has one and it applies; False: not done."""
        return False

    # ---- a decode step scored once for every layer (scores_at_step_end)
    def observe(self, layer: int, probs, pos, written, **extra):
        """At each layer: keep what score_step needs from this layer's attention (default: probs)."""
        self._kept[layer] = probs

    def kept_layers(self) -> list:
        """What observe kept at every layer this step, in layer order (and forgotten: it is not state)."""
        return [self._kept.pop(i) for i in sorted(self._kept)]

    def score_step(self, layer, pos, written, moments=None, observed=None) -> torch.Tensor:
        """After the last layer: every layer's scores at once (layer = slice(None), pos [L, B, Hkv, S]).
        observed [L, B, Hq, S]: every layer's probabilities, written there by the fused kernel (eager;
        tinyengine/engine.py), in place of what observe kept."""
        if observed is None:
            kept = self.kept_layers()
            observed = None if kept[0] is None else stack_layers(kept, pos.shape[-1])
        return self.decode_scores(layer, observed, pos, written)


def choose_victim(scores: torch.Tensor, pos: torch.Tensor, in_pool: torch.Tensor, pool_budget: torch.Tensor) -> torch.Tensor:
    """The slot to free per (row, kv head): [..., B, Hkv, S] -> [..., B, Hkv] (leading dims: layers). pool_budget: [B].

    While the pool (the entries the policy may evict) holds at most `pool_budget` entries, the
    answer is an empty slot (nothing is evicted). Once it holds more, the pool's lowest-scoring
    entry is evicted. The cache has one slot more than it can keep, so an empty slot exists
    whenever the pool is within budget.
    """
    valid = pos >= 0
    pool = valid & in_pool
    masked = torch.where(pool, scores, NEVER_EVICT)
    tied = pool & (masked == masked.amin(dim=-1, keepdim=True))  # the lowest; among ties, the oldest
    lowest = torch.where(tied, pos, torch.iinfo(pos.dtype).max).argmin(dim=-1)
    empty = (~valid).to(torch.int8).argmax(dim=-1)
    over = pool.sum(dim=-1) > pool_budget[:, None]
    return torch.where(over, lowest, empty)


def keep_top(scores: torch.Tensor, pos: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Prefill selection: the best valid candidates per (row, kv head), `budget` [B] per row.

    Returns (idx [B, Hkv, n], keep [B, Hkv, n]) with n = min(max(budget), N): candidate indices in
    position order, and whether each is kept (False past the row's budget or on empty candidates).
    """
    n = min(int(budget.max()), scores.shape[-1])
    ranked = torch.where(pos >= 0, scores.float(), float("-inf"))
    # Best first; among equal scores the newer first (stable sort of the newest-first order).
    newest_first = pos.argsort(dim=-1, descending=True, stable=True)
    best = ranked.gather(-1, newest_first).argsort(dim=-1, descending=True, stable=True)[..., :n]
    top = newest_first.gather(-1, best)
    keep = (ranked.gather(-1, top) > float("-inf")) & (torch.arange(n, device=pos.device) < budget[:, None, None])
    # Order kept entries by position (dropped ones last) so the cache reads like the text.
    order_key = torch.where(keep, pos.gather(-1, top), torch.iinfo(torch.long).max)
    order = order_key.argsort(dim=-1)
    return top.gather(-1, order), keep.gather(-1, order)


def stack_layers(per_layer: list[torch.Tensor], slots: int, keep_last: int = 0) -> torch.Tensor:
    """[..., S_l (+ keep_last)] per layer -> [L, ..., slots (+ keep_last)]: a smaller layer's slots
    (per-layer budgets) padded with zeros, its last `keep_last` columns kept last (momentkv's
    virtual slot)."""
    def widen(t):
        missing = slots + keep_last - t.shape[-1]
        if missing == 0:
            return t
        if keep_last == 0:
            return torch.nn.functional.pad(t, (0, missing))
        zeros = t.new_zeros(t.shape[:-1] + (missing,))
        return torch.cat([t[..., :-keep_last], zeros, t[..., -keep_last:]], dim=-1)

    return torch.stack([widen(t) for t in per_layer])


def group_sum(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Attention each slot receives from its kv head's query heads: [..., Hq, S] -> [..., Hkv, S]."""
    return probs.float().unflatten(-2, (kv_heads, -1)).sum(dim=-2)


def recent_mask(pos: torch.Tensor, n) -> torch.Tensor:
    """Entries among the `n` newest positions of each (row, kv head): [..., B, Hkv, S]. n: int or [B].

    Relative to the newest entry held, so it is the last n tokens of the text (a recent window
    is always kept, so all of them are there)."""
    if isinstance(n, torch.Tensor):
        n = n.view(-1, 1, 1)
    return pos > pos.amax(dim=-1, keepdim=True) - n


@dataclass
class CachePlan:
    """A prefill part and a decode part, with their budgets.

    - `prefill` (or None): compresses the prompt to `budget` entries per kv head (or, with
      `ratio`, to int(prompt_len * (1 - ratio)) as kvpress's compression_ratio).
    - `decode` (or None): evicts during generation.
        * unified (one name that defines both, e.g. h2o): its pool is the whole cache and its
          budget is what prefill kept (`budget`) in total;
        * composed (`snapkv+momentum`), decode-only alone (`momentum`) or one name with
          separate pools (`scope`: prefill is decode, not unified): its pool is the generated
          tokens only, within `decode_budget`; what prefill kept is frozen.
    - no decode part: generated tokens are never evicted; the cache grows by max_new_tokens.
    """

    prefill: Policy | None = None
    decode: Policy | None = None
    budget: int | None = None  # entries kept per kv head after prefill (None: all)
    ratio: float | None = None  # alternative to budget: fraction of the prompt removed
    decode_budget: int | None = None  # generated entries per kv head (decode pool)
    unified: bool = False
    correction: "nn.Module | None" = None  # moments of the evicted set, NC (policies/correction.py)
    reserved: int = 0  # slots per kv head given up for the moments (count_moments_in_budget)

    @property
    def name(self) -> str:
        if self.unified or (self.prefill is not None and self.prefill is self.decode):  # one name (separate pools: scope)
            return self.decode.name
        parts = [p.name for p in (self.prefill, self.decode) if p is not None]
        return "+".join(parts) or "full"

    def policies(self):
        seen = []
        for p in (self.prefill, self.decode):
            if p is not None and all(p is not q for q in seen):
                seen.append(p)
        return seen

    def prefill_keep(self, prompt_len: int, layer: int | None = None, num_layers: int | None = None) -> int:
        """How many prompt entries per kv head survive prefill (in `layer`, if given: PyramidKV)."""
        keep = self._prefill_keep(prompt_len)
        if layer is None or not self.compresses_prompt():
            return keep
        return min(prompt_len, self.prefill.layer_keep(layer, num_layers, keep, prompt_len))

    def _prefill_keep(self, prompt_len: int) -> int:
        if self.prefill is None:
            return prompt_len
        if self.ratio is not None:
            return max(1, int(prompt_len * (1 - self.ratio)) - self.reserved)
        return prompt_len if self.budget is None else min(self.budget - self.reserved, prompt_len)

    def compresses_prompt(self) -> bool:
        return self.prefill is not None and (self.budget is not None or self.ratio is not None)

    def pool_budget(self, prompt_len: int) -> int:
        """Entries the decode policy may hold in its pool."""
        if self.decode is None:
            return 2**62
        if not self.unified:  # the moments' slots come from the prompt's budget if it has one
            return self.decode_budget - (0 if self.compresses_prompt() else self.reserved)
        if self.budget is None and self.ratio is None:
            return 2**62  # `full`: the machinery runs, nothing is ever evicted
        return self.budget - self.reserved if self.budget is not None else self.prefill_keep(prompt_len)

    def reserve(self, slots: int):
        """Give up `slots` per kv head for the moments (--policy-arg count_moments_in_budget=1)."""
        prompt = self.compresses_prompt()
        charged = self.budget if prompt else self.decode_budget
        if charged is not None:
            try:  # what is left must still satisfy the policy (e.g. hold snapkv's window)
                if charged - slots < 1:
                    raise ValueError("nothing is left")
                (self.prefill.check_budget if prompt else self.decode.check_decode_budget)(charged - slots)
            except ValueError as e:
                raise ValueError(f"the moments take {slots} slots per kv head, leaving {charged - slots} of the budget "
                                 f"{charged} ({e}); raise the budget or drop count_moments_in_budget") from None
        self.reserved = slots

    def capacity(self, prompt_len: int, max_new_tokens: int, layer: int | None = None, num_layers: int | None = None) -> int:
        """Slots per kv head the static cache needs (in `layer`, if given): what is kept, plus one spare to write into."""
        kept = self.prefill_keep(prompt_len, layer, num_layers)
        if self.decode is None:
            return kept + max_new_tokens
        if self.unified:
            return min(self.pool_budget(prompt_len), prompt_len + max_new_tokens) + 1
        return kept + min(self.decode_budget, max_new_tokens) + 1
