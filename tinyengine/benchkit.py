"""Runners behind bench.py: drive the engine and kvpress over the same token ids, cheaply and exactly.

Two tricks keep the quality suites inside their time budget on a 2-core CPU; both are exact, and
both are checked against the plain path (tests/test_bench.py, and `verify_replay` at run time):

1. Prefill replay (our engine). With one prefill chunk, a policy only decides what the cache
   *keeps*: every layer's attention still sees the whole prompt, so the hidden states, queries,
   keys and values of the prompt are the same for every policy and budget (the engine computes
   the chunk's attention before it compresses). `ReplayModel` records them once, during the
   `full` run, and replays them into the other plans' prefills: the engine's own prefill code
   runs (scoring, selection, moments, per-layer budgets), minus the model's matmuls and the
   attention output it would throw away.
2. One forward, every press (kvpress). kvpress compresses in a forward hook after each
   attention layer, so its compression cannot change the hidden states of the prompt either.
   `PressBank` hooks every layer once and calls each press's own `compress` on the layer's
   uncompressed keys and values: one prefill yields the compressed caches of all presses and
   ratios, exactly as `with press(model): model.model(...)` would (kvpress's pipeline).

After prefill, everything runs token by token as in real use: our decode step (policies evict
as they go) and, for kvpress, the model's forward on its compressed DynamicCache, as
kvpress's pipeline does (question in one forward, then greedy tokens).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import tinyengine.engine as engine_module

# ----------------------------------------------------------------------------- prefill replay


@dataclass
class PrefillTape:
    """A full prefill, recorded: per layer q (only the last `window` query rows per batch row),
    k and v after RoPE; the logits of each row's last prompt token. `copies`: q, k and v stand for
    that many copies of their rows (repeat), tiled one layer at a time when replayed."""
    tokens: torch.Tensor  # [B, T]
    lengths: torch.Tensor  # [B]
    rows: torch.Tensor  # [B, W] query indices recorded per row
    q: list
    k: list
    v: list
    logits: torch.Tensor | None = None
    copies: int = 1

    def repeat(self, n: int) -> "PrefillTape":
        """The tape of this batch n times over, rows in the order [all rows] * n. The small fields
        are tiled here; q, k and v (every layer's queries, keys and values: gigabytes for a batch of
        4K-token prompts) stay shared, so n copies hold one layer's worth more, not n - 1 tapes
        (two workers each tiling a whole tape ran a 24 GiB machine out of memory)."""
        return PrefillTape(tile(self.tokens, n), tile(self.lengths, n), tile(self.rows, n), self.q, self.k, self.v,
                           tile(self.logits, n), self.copies * n)

    def layer(self, i: int) -> tuple:
        """Layer i's (q rows, k, v), tiled `copies` times."""
        return tuple(tile(t[i], self.copies) for t in (self.q, self.k, self.v))


def tile(t: torch.Tensor, n: int) -> torch.Tensor:
    """torch.cat([t] * n): the rows n times over (a view when t has one row)."""
    if n == 1:
        return t
    return t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else torch.cat([t] * n)


def _last_rows(lengths: torch.Tensor, T: int, window: int) -> torch.Tensor:
    """[B, W] indices of each row's last `window` real queries (clamped at 0), W = min(window, T)."""
    W = min(window, T)
    return (lengths[:, None] - W + torch.arange(W, device=lengths.device)).clamp(min=0)


class ReplayModel(nn.Module):
    """The model, plus recording and replaying of single-chunk prefills (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.args = model.args
        self._mode, self._tape, self._window = None, None, 0

    def output_weight(self):
        return self.inner.output_weight()

    def measure_linear(self, rows: int):
        self.inner.measure_linear(rows)

    @contextlib.contextmanager
    def recording(self, window: int):
        """Record the next prefill; yields the tape (filled when the block ends)."""
        tape = PrefillTape(None, None, None, [], [], [])
        self._mode, self._tape, self._window = "record", tape, window
        try:
            yield tape
        finally:
            self._mode = self._tape = None

    @contextlib.contextmanager
    def replaying(self, tape: PrefillTape):
        """Prefills inside the block replay `tape` instead of computing; the attention output
        that prefill discards is not computed either."""
        self._mode, self._tape = "replay", tape
        saved = engine_module.attention, engine_module.causal_attention
        engine_module.attention = engine_module.causal_attention = lambda q, *args, **kwargs: torch.zeros_like(q)
        try:
            yield
        finally:
            engine_module.attention, engine_module.causal_attention = saved
            self._mode = self._tape = None

    def forward(self, tokens, positions, attend_for_layer, last_only=None):
        if last_only is None or self._mode is None:  # decode steps (and plain prefills) run the model
            return self.inner(tokens, positions, attend_for_layer, last_only)
        tape = self._tape
        if self._mode == "record":
            if tape.tokens is not None:
                raise RuntimeError("ReplayModel records single-chunk prefills only (prefill_chunk must be None)")
            lengths = positions.max(dim=1).values + 1
            tape.tokens, tape.lengths = tokens.clone(), lengths
            tape.rows = _last_rows(lengths, tokens.shape[1], self._window)

            def capture(i):
                attend = attend_for_layer(i)

                def run(q, k, v):
                    idx = tape.rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
                    tape.q.append(q.gather(2, idx))
                    tape.k.append(k.clone())
                    tape.v.append(v.clone())
                    return attend(q, k, v)
                return run

            logits = self.inner(tokens, positions, capture, last_only)
            tape.logits = logits[:, -1].clone()
            return logits
        if tokens.shape != tape.tokens.shape or not torch.equal(tokens, tape.tokens):
            raise RuntimeError("replayed prefill got other tokens than the recorded one")
        for i in range(len(tape.k)):
            q_rows, k, v = tape.layer(i)
            B, H, W, D = q_rows.shape
            q = q_rows.new_zeros(B, H, tokens.shape[1], D)
            q.scatter_(2, tape.rows[:, None, :, None].expand(-1, H, -1, D), q_rows)
            attend_for_layer(i)(q, k, v)
        return tape.logits[:, None]


def plan_window(plans) -> int:
    """The most query rows any plan's prefill scorer reads (the recording keeps that many)."""
    w = [getattr(p.prefill, "window", 0) or 0 for p in plans if p is not None and p.prefill is not None]
    return 2**31 if any(x < 0 for x in w) else max(w + [1])  # window -1: every query (h2o)


def _state(engine) -> dict:
    state = {}
    for i, c in enumerate(engine.caches):
        valid = c.pos >= 0
        state[f"cache{i}.pos"] = c.pos
        state[f"cache{i}.k"] = torch.where(valid[..., None], c.k, 0)
        state[f"cache{i}.v"] = torch.where(valid[..., None], c.v, 0)
    modules = list(engine.plan.policies()) + [getattr(engine.plan, "correction", None)]
    for j, m in enumerate(m for m in modules if m is not None):
        for name, b in m.named_buffers():
            state[f"policy{j}.{name}"] = b
    return {k: v.clone() for k, v in state.items()}


def verify_replay(make_engine, replay: ReplayModel, tokens: torch.Tensor, lengths: torch.Tensor, atol=1e-5) -> str | None:
    """Prefill `tokens` once for real and once replayed from a `full` recording; None when the
    caches and policy states agree, else a line naming what differs."""
    from policies.base import CachePlan

    full = engine_module.Engine(replay, CachePlan())
    real, replayed = make_engine(), make_engine()
    window = plan_window([real.plan])
    T = tokens.shape[1]
    prompts = [row[: int(n)].tolist() for row, n in zip(tokens, lengths)]
    for e in (full, real, replayed):
        e.setup(tokens.shape[0], capacities(e, prompts, 4))
    with replay.recording(window) as tape:
        full.prefill(tokens, lengths)
    real.prefill(tokens, lengths)
    with replay.replaying(tape):
        replayed.prefill(tokens, lengths)
    a, b = _state(real), _state(replayed)
    for key in a:
        if a[key].shape != b[key].shape or not torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=1e-4):
            return f"replayed prefill differs from the real one in {key} ({T} tokens)"
    return None


# ----------------------------------------------------------------------------- driving the engine


def pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], device=device)
    tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, lengths


@torch.inference_mode()
def drive(engine, prompts, forced=None, new_tokens=0, *, tape: PrefillTape | None = None, replay: ReplayModel | None = None,
          record_window: int = 0, on_logits=None, stop_ids=(), ban_ids=(), row_plans=None):
    """Prefill `prompts`, feed each row its `forced` tokens through decode steps (teacher forcing,
    exact), then greedy-generate `new_tokens` per row.

    on_logits(t, logits [B, V]) sees the logits that predict the t-th token after the prompt
    (t = 0 from prefill). Returns (generated tokens per row, cut at its first stop token; the tape
    if `record_window` asked to record). With `tape` the prefill is replayed (exact, see
    ReplayModel). `row_plans`: one plan per row, the engine's policy at different budgets or
    ratios (Engine.prefill's row_plans), in a cache sized for the largest. `ban_ids`: tokens
    never chosen (e.g. stop tokens, to force a long output); logits passed to on_logits are untouched.
    """
    B = len(prompts)
    forced = forced or [[] for _ in range(B)]
    new = new_tokens if isinstance(new_tokens, list) else [new_tokens] * B
    steps = max(len(f) + n for f, n in zip(forced, new))
    limit = engine.args.max_position_embeddings
    if max(map(len, prompts)) + steps > limit:
        raise ValueError(f"prompt plus {steps} tokens exceed the model's context of {limit} tokens")
    tokens, lengths = pad(prompts, engine.device)
    engine.setup(B, capacities(engine, prompts, max(steps, 1), plans=row_plans))
    recorded = None
    if tape is not None:
        with replay.replaying(tape):
            logits = engine.prefill(tokens, lengths, row_plans=row_plans)
    elif record_window:
        with replay.recording(record_window) as recorded:
            logits = engine.prefill(tokens, lengths, row_plans=row_plans)
    else:
        logits = engine.prefill(tokens, lengths, row_plans=row_plans)
    out = [[] for _ in range(B)]
    done = [False] * B
    stop = set(stop_ids)
    for t in range(steps):
        if on_logits is not None:
            on_logits(t, logits)
        choice = logits
        if ban_ids:
            choice = logits.clone()
            choice[:, list(ban_ids)] = float("-inf")
        greedy = choice.argmax(-1).tolist()
        step_tokens = []
        for r in range(B):
            if t < len(forced[r]):
                step_tokens.append(forced[r][t])
                continue
            tok = greedy[r]
            step_tokens.append(tok)
            if t < len(forced[r]) + new[r] and not done[r]:
                if tok in stop:
                    done[r] = True
                else:
                    out[r].append(tok)
        finished = all(done[r] or t + 1 >= len(forced[r]) + new[r] for r in range(B))
        if t == steps - 1 or (finished and on_logits is None):
            break
        tok_t = torch.tensor(step_tokens, device=engine.device)[:, None]
        logits = engine.decode_step(tok_t, (lengths + t)[:, None])
    return out, recorded


def capacities(engine, prompts, steps: int, plans=None) -> list[int]:
    """Cache slots per layer for these prompts and steps (the largest any row's plan needs)."""
    L = engine.args.num_layers
    plans = plans or [engine.plan] * len(prompts)
    return [max(p.capacity(len(x), steps, i, L) for p, x in zip(plans, prompts)) for i in range(L)]


# ----------------------------------------------------------------------------- metrics


def compare(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | None = None):
    """Per row: KL(ref || logits), whether the top-1 tokens agree, and the NLL of `targets`."""
    ref = F.log_softmax(ref_logits.float(), -1)
    lp = F.log_softmax(logits.float(), -1)
    kl = (ref.exp() * (ref - lp)).sum(-1).clamp(min=0)
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).float()
    nll = None if targets is None else -lp.gather(-1, targets[:, None])[:, 0]
    return kl, top1, nll


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- transformers and kvpress


def load_hf(folder, attn: str = "sdpa"):
    """transformers' model for the same checkpoint folder, float32, eval mode."""
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn)
    return model.eval()


# kvpress presses that share a method with one of our policies, then its strongest others.
KVPRESS_SHARED = {"streamingllm": "StreamingLLMPress", "knorm": "KnormPress", "snapkv": "SnapKVPress",
                  "tova": "TOVAPress", "keydiff": "KeyDiffPress", "pyramidkv": "PyramidKVPress"}
KVPRESS_OTHERS = {"expected_attention": "ExpectedAttentionPress", "observed_attention": "ObservedAttentionPress"}


def make_press(name: str, ratio: float):
    import kvpress

    cls = {**KVPRESS_SHARED, **KVPRESS_OTHERS}[name]
    return getattr(kvpress, cls)(compression_ratio=ratio)


def needs_eager(press) -> bool:
    return type(press).__name__ == "ObservedAttentionPress"


class PressBank:
    """Compress one prefill with many kvpress presses at once (see the module docstring)."""

    def __init__(self, model, presses: dict):
        self.model, self.presses = model, presses

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor):
        """ids [1, T] -> (last-token logits [V], {name: [(k, v) per layer]}, full [(k, v) per layer])."""
        from kvpress.utils import extract_keys_and_values
        from transformers import DynamicCache

        model = self.model
        body = model.model
        results = {name: [None] * len(body.layers) for name in self.presses}
        for press in self.presses.values():
            press.post_init_from_model(model)

        def hook(module, args, kwargs, output):
            keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
            for name, press in self.presses.items():
                k, v = press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
                results[name][module.layer_idx] = (k.clone(), v.clone())
            return output

        eager = any(needs_eager(p) for p in self.presses.values())
        saved = model.config._attn_implementation
        if eager:
            model.set_attn_implementation("eager")
        hooks = []
        try:
            for layer in body.layers:
                layer.self_attn.rotary_emb = body.rotary_emb  # as kvpress's press(model) does
                hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
            if eager:
                model.set_attn_implementation(saved)
        full = [(layer.keys, layer.values) for layer in cache.layers]
        return out.logits[0, -1].float(), results, full


@torch.inference_mode()
def hf_continue(model, layers, context_len: int, forced: list[int], new_tokens: int, stop_ids=(), first_logits=None,
                on_logits=None) -> list[list[int]]:
    """Continue a (compressed) cache as kvpress's pipeline does: the forced tokens in one forward,
    then greedy tokens one by one. Positions continue from the uncompressed context length.

    layers: [(k, v) per layer], k [B, Hkv, n, D]: B caches of one prompt go through transformers
    as one batch (`stack_caches`; the rows never interact, so each gets the tokens it would get
    alone, up to the float rounding of a batched matmul). on_logits(t, logits [B, V]) as in
    `drive` (t = 0 is `first_logits` [V], the prefill's). Returns each row's generated tokens,
    cut at its first stop token (the batch runs until every row has stopped).
    """
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=list(layers), config=model.config)  # its first update copies; `layers` stay intact
    device = layers[0][0].device
    B = layers[0][0].shape[0]
    pos = context_len
    logits = first_logits[None].expand(B, -1) if first_logits is not None else None
    if on_logits is not None and logits is not None:
        on_logits(0, logits)
    if forced and len({k.shape[2] for k, _ in layers}) > 1:
        # Layers of different lengths (PyramidKVPress): transformers builds one causal mask from
        # layer 0's length, so a multi-token forward fails (kvpress 0.5.5's own pipeline raises
        # here with a question). One token at a time needs no mask and is the same computation.
        for t, tok in enumerate(forced):
            out = model(input_ids=torch.full((B, 1), tok, device=device), past_key_values=cache,
                        position_ids=torch.full((B, 1), pos, device=device))
            logits = out.logits[:, -1].float()
            if on_logits is not None:
                on_logits(t + 1, logits)
            pos += 1
    elif forced:
        ids = torch.tensor([forced], device=device).expand(B, -1)
        out = model(input_ids=ids, past_key_values=cache, position_ids=torch.arange(pos, pos + len(forced), device=device).expand(B, -1))
        all_logits = out.logits.float()
        if on_logits is not None:
            for t in range(len(forced)):
                on_logits(t + 1, all_logits[:, t])
        logits = all_logits[:, -1]
        pos += len(forced)
    generated = [[] for _ in range(B)]
    running = [True] * B
    stop = set(stop_ids)
    for step in range(new_tokens):
        toks = logits.argmax(-1)
        for i, tok in enumerate(toks.tolist()):
            running[i] = running[i] and tok not in stop
            if running[i]:
                generated[i].append(tok)
        if not any(running) or step == new_tokens - 1:
            break
        out = model(input_ids=toks[:, None].to(device), past_key_values=cache, position_ids=torch.full((B, 1), pos, device=device))
        logits = out.logits[:, -1].float()
        pos += 1
    return generated


def stack_caches(caches: dict) -> list[tuple[list, list]]:
    """{name: [(k, v) per layer]} of one prompt -> [(names, batched layers)]: the caches whose
    layers have the same lengths, concatenated along the batch (for `hf_continue`)."""
    groups = {}
    for name, layers in caches.items():
        groups.setdefault(tuple(k.shape[2] for k, _ in layers), []).append(name)
    return [(names, [(torch.cat([caches[n][i][0] for n in names]), torch.cat([caches[n][i][1] for n in names]))
                     for i in range(len(caches[names[0]]))]) for names in groups.values()]


def kv_entries(layers) -> int:
    """KV entries per kv head summed over layers (a compressed cache's size)."""
    return sum(k.shape[2] for k, _ in layers)


def percentile(xs, q) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(math.ceil(q * len(xs))) - 1))
    return xs[i]
