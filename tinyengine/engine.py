"""Prefill, the compiled decode step, and the generation loop.

The engine owns one static `KVCache` per layer and a `CachePlan` (prefill policy + decode
policy + budgets). It hands the model, layer by layer, an `attend(q, k, v)` closure that
writes the new keys/values into the cache and attends over its slots:

  prefill (eager, chunk by chunk): without a prefill policy the chunk is appended to the
      cache; with one, the chunk is attended together with the compressed cache so far and the
      policy keeps its `budget` best entries per kv head (so the KV held never exceeds
      budget + chunk).
  decode (one token per row, torch.compile'd once): each layer writes into the slot freed
      last step, attends and lets the decode policy score its slots; after the last layer the
      victims of every layer are chosen and freed at once, for the next step. Branch-free
      tensor code with fixed shapes, so the graph never recompiles.

Batches of prompts of different lengths are right-padded; padding has no valid position, so
it is never attended to, and generated tokens reuse its slots. Rows with one prompt (parallel
samples; bench.py's budgets as rows) score its first chunk once and, when the plan never evicts
the prompt, attend to its slots once per decode step for all of them (`shared_slots`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from policies.base import CachePlan, Policy, choose_victim, keep_top
from tinyengine import fused
from tinyengine.attention import PAD_QUERY_POS, attention, attention_probs, causal_attention, reference_attention
from tinyengine.cache import KVCache, first_free_slot
from tinyengine.errors import TinyEngineError


def distinct_rows(tokens: torch.Tensor, lengths: torch.Tensor):
    """(first [U], copy [B]) such that row b's prompt is row first[copy[b]]'s, or None if every
    row's prompt differs. Rows with one prompt (bench.py runs a policy at several budgets as rows,
    parallel samples of one prompt) hold the same queries and keys in the first prefill chunk,
    where the caches are still empty: prefill scoring's attention is computed once for them."""
    distinct, copy = torch.unique(torch.cat([tokens, lengths[:, None]], 1), dim=0, return_inverse=True)
    if len(distinct) == len(tokens):
        return None
    rows = torch.arange(len(tokens), device=tokens.device)
    first = torch.full((len(distinct),), len(tokens), device=tokens.device).scatter_reduce(0, copy, rows, "amin")
    return first, copy


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids."""
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def default_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """(prefill, decode) attention backends. Measured in BENCHMARKS.md (bench.py attention). On a
    CPU, decode runs the fused kernel (tinyengine/fused.py) in float32 when it builds, eager or
    compiled (as an operator); any other dtype, the reference."""
    if device.type == "cuda":
        return "flex", "flex"
    return "sdpa", "fused" if fused.usable_for(device, dtype) else "reference"


class Engine:
    def __init__(self, model, plan: CachePlan | None = None, *, compile: bool = False,
                 prefill_chunk: int | None = None, prefill_backend: str | None = None,
                 decode_backend: str | None = None):
        self.model = model
        self.args = model.args
        self.plan = plan or CachePlan()
        self.device = model.output_weight().device
        self.dtype = model.output_weight().dtype
        default_prefill, default_decode = default_backends(self.device, self.dtype)
        self.prefill_backend = prefill_backend or default_prefill
        self.decode_backend = decode_backend or default_decode
        self.prefill_chunk = prefill_chunk
        self.caches: list[KVCache] = []
        self.batch = self.capacity = 0
        self.compiled = compile
        # The fused CPU decode kernel (tinyengine/fused.py), and how it serves the decode policy
        self._fused_decode = self.decode_backend == "fused"
        if self._fused_decode and not fused.usable_for(self.device, self.dtype):
            raise TinyEngineError(f"decode backend 'fused' decodes in float32 on the CPU with a C compiler "
                                  f"(tinyengine/fused.py); this engine is {self.dtype} on {self.device}"
                                  f"{'' if fused.available() else ' without the kernels'}: choose reference, sdpa or flex")
        self._fused_score = self.plan.decode.fused_score(self.plan.correction) if self.plan.decode is not None else None
        # The kernel computes the policy's per-slot observation itself (momentkv) and writes it into
        # step_scores, read at the step's end: nothing to keep per layer, nothing to stack
        self._kernel_scores = self._fused_decode and self._fused_score is not None and self._fused_score is not False
        # Eager, it writes the probabilities of a policy that keeps them as they are (Policy.observe)
        # straight into step_probs [L, B, Hq, S], which score_step reads: no per-layer tensors to stack
        # (while the policy scores at the step's end: read at each step, which tests switch off)
        policy = self.plan.decode
        self._kernel_probs = (self._fused_decode and not compile and policy is not None and policy.needs_probs
                              and self._fused_score is None and type(policy).observe is Policy.observe)
        self.decode_step = torch.compile(self._decode_step, fullgraph=True, dynamic=False) if compile else self._decode_step
        nc = self.plan.correction
        if nc is not None and nc.count_in_budget:  # the moments' memory, in cache slots, comes off the budget
            slot_bytes = 2 * self.args.head_dim * self.dtype.itemsize + 8  # K, V and the int64 position
            try:
                self.plan.reserve(nc.reserved_tokens(self.args.head_dim, slot_bytes))
            except ValueError as e:
                raise TinyEngineError(str(e)) from None

    # ------------------------------------------------------------------ setup
    def setup(self, batch: int, capacity: int | list[int]):
        """Allocate the static caches (reused while batch and capacity suffice). capacity: slots
        per kv head, for every layer or a list with one per layer (per-layer budgets: pyramidkv)."""
        a = self.args
        caps = list(capacity) if isinstance(capacity, (list, tuple)) else [capacity] * a.num_layers
        if batch == self.batch and all(c <= cache.capacity for c, cache in zip(caps, self.caches)):
            return
        capacity = max(caps)  # policy state is allocated for the largest layer
        # Every layer's slot positions live in one tensor (each cache views its part; a smaller layer
        # leaves its tail empty), and so do the scores of a decode step: choosing and freeing the
        # victims then takes a dozen ops per step rather than a dozen per layer, which is most of
        # what a policy costs an eager decode step (BENCHMARKS.md, decode speed vs context).
        self.pos = torch.full((a.num_layers, batch, a.num_kv_heads, capacity), -1, dtype=torch.long, device=self.device)
        self.step_scores = torch.zeros(self.pos.shape, device=self.device)
        self.caches = [KVCache(batch, a.num_kv_heads, cap, a.head_dim, self.dtype, self.device, pos=self.pos[i, :, :, :cap])
                       for i, cap in enumerate(caps)]
        self.layer_keys, self.layer_values = [c.k for c in self.caches], [c.v for c in self.caches]  # (looked up once)
        self.layer_scores = [self.step_scores[i, :, :, :cap] for i, cap in enumerate(caps)]
        if self._kernel_probs:  # (a smaller layer's tail stays 0, as base.stack_layers pads)
            self.step_probs = torch.zeros(a.num_layers, batch, a.num_heads, capacity, device=self.device)
            self.layer_probs = [self.step_probs[i, :, :, :cap] for i, cap in enumerate(caps)]
        self.next_slot = torch.zeros(a.num_layers, batch, a.num_kv_heads, dtype=torch.long, device=self.device)
        self.prompt_len = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.pool_budget = torch.zeros(batch, dtype=torch.long, device=self.device)
        for p in self.plan.policies():
            p.allocate(a.num_layers, batch, a.num_kv_heads, capacity, self.device)
        if self.plan.correction is not None:
            self.plan.correction.allocate(a.num_layers, batch, a.num_kv_heads, a.head_dim, self.device)
        self.batch, self.capacity = batch, capacity
        self.shared_slots = [0] * a.num_layers  # set by each prefill
        if self.device.type == "cpu":  # choose the weight products' forms for `batch` rows now, not in a timed step
            self.model.measure_linear(batch)

    def kv_bytes(self) -> int:
        """Bytes the caches hold allocated (K, V and slot positions), policy state excluded."""
        return sum(c.nbytes() for c in self.caches)

    def state_bytes(self) -> int:
        """Bytes of policy state, the moments of the evicted set (policies/correction.py) included."""
        modules = self.plan.policies() + ([self.plan.correction] if self.plan.correction is not None else [])
        return sum(b.numel() * b.element_size() for p in modules for b in p.buffers())

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, row_plans: list | None = None) -> torch.Tensor:
        """tokens [B, T] right-padded, lengths [B] -> logits [B, V] at each row's last token.

        row_plans: optional plan per row, the engine's policy at other budgets or ratios: each row
        keeps its own plan's share of its prompt and decode pool (bench.py runs one policy at several
        budgets as rows of one batch; the cache must be set up for the largest). The policies read
        budgets only through these per-row counts, so a row computes what it would alone.
        """
        B, T = tokens.shape
        for c in self.caches:
            c.reset()
        if self.plan.correction is not None:
            self.plan.correction.reset()
        self.prompt_len.copy_(lengths)
        rows = list(zip(row_plans or [self.plan] * B, lengths.tolist(), strict=True))
        self.pool_budget.copy_(torch.tensor([plan.pool_budget(n) for plan, n in rows]))
        self._keep = torch.tensor([plan.prefill_keep(n) for plan, n in rows], device=self.device)
        L = self.args.num_layers  # each layer's keep (differs under per-layer budgets: pyramidkv)
        self._layer_keep = [torch.tensor([plan.prefill_keep(n, i, L) for plan, n in rows], device=self.device)
                            for i in range(L)]
        for p in self.plan.policies():
            p.start(self._keep, self.pool_budget)
        self._distinct = distinct_rows(tokens, lengths)
        chunk = self.prefill_chunk or T
        self._stored = [0] * L  # entries per kv head each layer's cache holds after the chunks so far
        self._kept_scores = [None] * self.args.num_layers
        for c0 in range(0, T, chunk):
            c1 = min(c0 + chunk, T)
            idx = torch.arange(c0, c1, device=self.device).expand(B, -1)
            real = idx < lengths[:, None]
            q_pos = torch.where(real, idx, PAD_QUERY_POS)
            kv_pos = torch.where(real, idx, -1)
            last = (lengths - 1 - c0).clamp(0, c1 - c0 - 1)
            chunk_logits = self.model(tokens[:, c0:c1], torch.where(real, idx, 0),
                                      lambda i: self._prefill_attend(i, q_pos, kv_pos, lengths, c0), last)[:, -1]
            ends_here = ((lengths - 1 >= c0) & (lengths - 1 < c1))[:, None]  # the row's last token is in this chunk
            logits = chunk_logits if c0 == 0 else torch.where(ends_here, chunk_logits, logits)
            self._stored = self._after_chunk(c1)
        for i, cache in enumerate(self.caches):
            for p in self.plan.policies():
                p.on_prefill(i, self._kept_scores[i], self._stored[i], cache=cache)
            self.next_slot[i] = first_free_slot(cache.pos)
        self.shared_slots = [self._shared_slots(cache) for cache in self.caches]
        return logits

    def _shared_slots(self, cache) -> int:
        """How many leading slots of this layer hold the same prompt tokens in every row and stay
        for the whole decode (reference_attention's `shared`): rows with one prompt (distinct_rows),
        a plan that never evicts the prompt (not unified) and no NC correction. 0 when compiled: the
        graph would depend on it (one graph for every prompt)."""
        if (self.plan.unified or self.plan.correction is not None or self.compiled
                or self._distinct is None or len(self._distinct[0]) > 1):  # (one row is distinct: None)
            return 0
        same = ((cache.pos == cache.pos[:1]).all(0) & (cache.pos[0] >= 0)).all(0)  # [S]: the slot agrees in every row and head
        return int(same.long().cumprod(0).sum())  # its leading run: prompt slots, frozen (they are never in the pool)

    def _after_chunk(self, tokens_so_far: int) -> list[int]:
        if not self.plan.compresses_prompt():
            return [tokens_so_far] * len(self._layer_keep)
        return [min(int(keep.max()), tokens_so_far) for keep in self._layer_keep]

    def _prefill_attend(self, layer, q_pos, kv_pos, lengths, c0):
        cache, plan, n = self.caches[layer], self.plan, self._stored[layer]

        def attend(q, k, v):
            T = k.shape[2]
            pos = kv_pos[:, None, :].expand(-1, k.shape[1], -1)
            if not plan.compresses_prompt():
                if n + T > cache.capacity:
                    raise TinyEngineError(f"prompt needs {n + T} cache slots but the cache holds {cache.capacity}")
                cache.k[:, :, n:n + T], cache.v[:, :, n:n + T], cache.pos[:, :, n:n + T] = k, v, pos
                if n == 0 and self.prefill_backend == "sdpa":
                    return causal_attention(q, k, v)
                return attention(q, cache.k[:, :, :n + T], cache.v[:, :, :n + T], q_pos,
                                 cache.pos[:, :, :n + T], backend=self.prefill_backend)
            keys = torch.cat([cache.k[:, :, :n], k], dim=2)
            values = torch.cat([cache.v[:, :, :n], v], dim=2)
            kpos = torch.cat([cache.pos[:, :, :n], pos], dim=2)
            if plan.correction is not None and plan.correction.apply_nc and c0 > 0:  # earlier chunks evicted
                out = plan.correction.attention(layer, q, keys, values, q_pos, kpos, self.prefill_backend, False)[0]
            elif n == 0 and self.prefill_backend == "sdpa":  # first chunk: plain causal
                out = causal_attention(q, k, v)
            else:
                out = attention(q, keys, values, q_pos, kpos, backend=self.prefill_backend)
            window_probs, extra = None, {}
            if plan.prefill.window != 0:  # < 0: every query of the chunk, summed (h2o)
                window, summed = (plan.prefill.window, False) if plan.prefill.window > 0 else (T, True)
                if n == 0 and self._distinct is not None:  # rows with one prompt: same queries, keys and probs
                    first, copy = self._distinct
                    window_probs = self._window_probs(q[first], keys[first], q_pos[first], kpos[first], lengths[first], c0,
                                                      window, summed)[copy]
                else:
                    window_probs = self._window_probs(q, keys, q_pos, kpos, lengths, c0, window, summed)
            if getattr(plan.prefill, "needs_query", False):  # e.g. momentkv's MI reads queries and moments
                extra = dict(window=self._window_queries(q, q_pos, lengths, c0, plan.prefill.window),
                             keep=self._layer_keep[layer], moments=plan.correction)
            scores = plan.prefill.prefill_scores(layer, keys, values, kpos, window_probs, **extra)
            if n:  # rows whose prompt ended in an earlier chunk keep what they hold, scores included
                ended = (lengths <= c0)[:, None, None]
                previous = torch.cat([self._kept_scores[layer], scores.new_zeros(scores.shape[:2] + (T,))], dim=2)
                scores = torch.where(ended, previous, scores)
            idx, keep = keep_top(scores, kpos, self._layer_keep[layer])
            plan.prefill.on_select(layer, idx, keep)
            if plan.correction is not None:  # the dropped candidates join the evicted set's moments
                kept = torch.zeros_like(kpos, dtype=torch.bool).scatter(2, idx, keep)
                plan.correction.absorb(layer, keys, values, (kpos >= 0) & ~kept)
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
            cache.fill(keys.gather(2, gather), values.gather(2, gather), kpos.gather(2, idx).masked_fill(~keep, -1))
            self._kept_scores[layer] = scores.gather(2, idx)
            return out

        return attend

    @staticmethod
    def _window_probs(q, keys, q_pos, kpos, lengths, c0, window, summed=False):
        """Attention of each row's last `window` real queries of this chunk over the candidates.

        Returns [B, Hq, window, N] (summed: their sum, [B, Hq, 1, N]); rows of the window that
        fall before the chunk or on padding are zero, so they add nothing to scores.
        """
        qw, qw_pos, ok = Engine._window_queries(q, q_pos, lengths, c0, window)
        return attention_probs(qw, keys, qw_pos, kpos, weight=ok.float(), summed=summed)

    @staticmethod
    def _window_queries(q, q_pos, lengths, c0, window):
        """Each row's last `window` real queries of this chunk: (q [B, Hq, window, D], positions
        [B, window], ok [B, window]: False for rows of the window before the chunk or on padding)."""
        B, Hq, T, D = q.shape
        last = (lengths - c0).clamp(max=T) - 1  # index of the row's last real query in the chunk
        idx = last[:, None] - torch.arange(window - 1, -1, -1, device=q.device)
        ok = idx >= 0
        idx = idx.clamp(min=0)
        return q.gather(2, idx[:, None, :, None].expand(-1, Hq, -1, D)), q_pos.gather(1, idx), ok

    # ------------------------------------------------------------------ decode
    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B, 1] -> logits [B, V]. Compiled once; shapes never change."""
        logits = self.model(tokens, positions, lambda i: self._decode_attend(i, positions[:, 0]))[:, -1]
        self._free_slots()
        return logits

    def _free_slots(self):
        """After every layer attended: choose each layer's victim from the step's scores, free it,
        and point the next write there (all layers at once: self.pos is [L, B, Hkv, S])."""
        plan = self.plan
        if plan.decode is None:  # nothing is evicted; the cache grows into its empty slots
            self.next_slot.copy_(first_free_slot(self.pos))
            return
        scores = self.step_scores
        pool_from = self.prompt_len * 0 if plan.unified else self.prompt_len  # the pool: positions from here on
        if self._kernel_scores:  # the kernel wrote every layer's observation (Policy.fused_score)
            if plan.decode.fused_step_end(self.pos, self.next_slot, scores, pool_from, self.pool_budget, plan.correction,
                                          self.layer_keys, self.layer_values):
                return  # on a CPU: all of the below in one C pass
            scores = plan.decode.score_step(slice(None), self.pos, self.next_slot, plan.correction, observed=scores)
        elif plan.decode.scores_at_step_end:  # every layer scored at once (policies/base.py)
            observed = dict(observed=self.step_probs) if self._kernel_probs else {}
            scores = plan.decode.score_step(slice(None), self.pos, self.next_slot, plan.correction, **observed)
        victim = fused.choose_victim(scores, self.pos, pool_from, self.pool_budget)  # [L, B, Hkv]; eager CPU: one C pass
        if victim is None:
            victim = choose_victim(scores, self.pos, self.pos >= pool_from[:, None, None], self.pool_budget)
        if plan.correction is not None:  # the victims join the evicted set's moments (an empty slot adds nothing)
            plan.correction.absorb_slots(victim, self.layer_keys, self.layer_values, self.pos)
        self.pos.scatter_(-1, victim.unsqueeze(-1), -1)
        self.next_slot.copy_(victim)

    def _decode_attend(self, layer, pos):
        cache, plan = self.caches[layer], self.plan

        def attend(q, k, v):
            slot = self.next_slot[layer]
            policy, nc = plan.decode, plan.correction
            need, scores = policy is not None and policy.needs_probs, None
            kernel_probs = self._kernel_probs and policy.scores_at_step_end
            mi_weight = self._fused_score
            if self._fused_decode and mi_weight is not False and self.shared_slots[layer] == 0:
                # The fused kernel: the step's write and one pass over the layer's keys and values for
                # attention, NC when it applies, and the probabilities (into step_probs, eager) or, for a
                # policy whose decode observation the kernel computes (momentkv), that, into step_scores
                # (with a correction, as that policy has, shared_slots is 0: every layer comes here)
                moments = nc.moments(layer) if nc is not None and nc.apply_nc else None
                out, probs, _ = fused.decode_attention(q, cache.k, cache.v, pos, cache.pos, moments, need and mi_weight is None,
                                                       mi_weight, self.layer_scores[layer] if self._kernel_scores else None,
                                                       write=(k, v, slot),
                                                       probs_out=self.layer_probs[layer] if kernel_probs else None)
                if self._kernel_scores or kernel_probs:
                    return out
            else:
                cache.write(slot, k[:, :, 0], v[:, :, 0], pos)
                if nc is not None:  # NC (or, for MI alone, plain attention): policies/correction.py
                    out, probs, scores = nc.attention(layer, q, cache.k, cache.v, pos[:, None], cache.pos, self.decode_backend, need)
                elif need or self.decode_backend in ("reference", "fused"):
                    out, probs = reference_attention(q, cache.k, cache.v, pos[:, None], cache.pos, shared=self.shared_slots[layer])
                else:
                    out, probs = attention(q, cache.k, cache.v, pos[:, None], cache.pos, backend=self.decode_backend), None
                if kernel_probs:  # (a layer with shared slots: the torch path) where score_step reads them
                    self.layer_probs[layer].copy_(probs[:, :, 0])
                    return out
            if policy is not None:  # its scores wait for the end of the step (_free_slots)
                probs = None if probs is None else probs[:, :, 0]
                if getattr(policy, "needs_query", False):
                    extra = dict(query=q, out=out, cache=cache, moments=nc, attn_scores=scores, value=v)
                else:
                    extra = {}
                if policy.scores_at_step_end:
                    policy.observe(layer, probs, cache.pos, slot, **extra)
                else:
                    keep = policy.decode_scores(layer, probs, cache.pos, slot, **extra)
                    self.step_scores[layer, :, :, : keep.shape[-1]].copy_(keep)
            return out

        return attend

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids=(), on_tokens=None) -> list[list[int]]:
        """Generate for a batch of tokenized prompts. on_tokens([token or None per row]) streams
        each step (None once a row has stopped).

        Returns each row's new tokens, up to and excluding its first stop token.
        """
        if max_new_tokens < 1:
            raise TinyEngineError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TinyEngineError("empty prompt: give at least one token of input")
        lengths = [len(p) for p in prompts]
        context = self.args.max_position_embeddings
        if max(lengths) >= context:
            raise TinyEngineError(f"prompt of {max(lengths)} tokens does not fit the model's context of {context} tokens; shorten it")
        max_new_tokens = min(max_new_tokens, context - max(lengths))
        B, T = len(prompts), max(lengths)
        tokens = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        length_t = torch.tensor(lengths, device=self.device)
        L = self.args.num_layers
        self.setup(B, [max(self.plan.capacity(n, max_new_tokens, i, L) for n in lengths) for i in range(L)])
        from tinyengine.tp import shared_seed  # (tp imports the model; a top-level import would be circular)

        generator = None
        seed = shared_seed(sampling.seed)  # tensor parallel: every rank must draw the same token
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        logits = self.prefill(tokens, length_t)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        stop = set(stop_ids)
        for step in range(max_new_tokens):
            tok = sample(logits, sampling, generator)
            new = []
            for i, t in enumerate(tok.tolist()):
                done[i] = done[i] or t in stop
                new.append(None if done[i] else t)
                if not done[i]:
                    out[i].append(t)
            if on_tokens is not None:
                on_tokens(new)
            if all(done) or step == max_new_tokens - 1:
                break
            positions = (length_t + step)[:, None]
            logits = self.decode_step(tok[:, None].clone(), positions)
        return out
