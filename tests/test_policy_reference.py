"""Each policy's tensor code against a plain-torch loop reference, and its compiled decode step.

References are written token by token with Python loops and dicts (no slots, no masks): the
policy's rule as the paper states it. The policy code under test works on slots, with masks
and buffers, inside the engine's decode step (compiled once, branch-free).

  - decode: `simulate` drives a policy's decode_scores + the engine's choose_victim on a slot
    cache for many steps with random attention; `reference_decode` replays the same steps on
    token sets. Scores and evictions must agree at every step.
  - prefill: snapkv / knorm / keydiff / tova / h2o scores against loops.
  - the real engine on a 2-layer model: compiled decode (fullgraph, dynamic=False) equals eager
    for every decode policy, with no recompile across steps, prompt lengths and batch contents.
"""
from __future__ import annotations

import math

import pytest
import torch

from policies import make_plan
from policies.base import PROTECT, choose_victim
from tinyengine.engine import Engine

DECODE_SPECS = {  # decode policies with small options, as make_plan builds them
    "streamingllm": dict(spec="streamingllm", budget=6, options=dict(n_sink=2)),
    "h2o": dict(spec="h2o", budget=6),
    "tova": dict(spec="tova", budget=6),
    "scope": dict(spec="scope", decode_budget=5, options=dict(recent=2)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- decode reference
def token_scores(name, policy, kept, probs, newest, state, budget):
    """The policy's score of each kept token at one step (loops). kept: tokens of one (row, kv
    head); probs[g][t]: attention of the group's query head g (or, for tova, of every query head
    of the layer) to token t; state: per-token running state (h2o)."""
    scores = {}
    for t in kept:
        if name == "streamingllm":
            scores[t] = PROTECT if t < policy.n_sink else float(t)
        elif name == "tova":
            scores[t] = sum(p[t] for p in probs) / len(probs)
        elif name == "h2o":
            state[t] = state.get(t, 0.0) + sum(p[t] for p in probs)  # a new token starts from 0
            recent = math.floor(budget * policy.recent_ratio)
            scores[t] = PROTECT if t > newest - recent else state[t]
        elif name == "scope":
            scores[t] = PROTECT if t > newest - policy.recent else sum(p[t] for p in probs)
    return scores


def reference_victim(scores, pool, budget):
    """The evicted token: none while the pool fits, else the lowest score, the oldest among ties."""
    members = [t for t in scores if t in pool]
    if len(members) <= budget:
        return None
    return min(members, key=lambda t: (scores[t], t))


def simulate(name, policy, plan, B, Hkv, G, prompt, steps, seed, step_fn=None):
    """Run `steps` decode steps of a policy on a slot cache with random attention.

    prompt: per (row, kv head) list of prompt positions held (frozen unless the plan is unified).
    Returns per step: pos [B, Hkv, S] after the write, probs [B, Hq, S], scores, victims."""
    g = torch.Generator().manual_seed(seed)
    P = 1 + max((max(p) for row in prompt for p in row if p), default=-1)  # first generated position
    budget = plan.pool_budget(P)
    S = max(len(p) for row in prompt for p in row) + min(budget, steps) + 1
    pos = torch.full((B, Hkv, S), -1, dtype=torch.long)
    perm = torch.randperm(S, generator=g)
    for b in range(B):
        for h in range(Hkv):
            # tova needs every kv head to hold the same token in the same slot (see its docstring)
            slots = perm if name == "tova" else torch.randperm(S, generator=g)
            for i, p in enumerate(prompt[b][h]):
                pos[b, h, slots[i]] = p
    policy.allocate(1, B, Hkv, S, "cpu")
    policy.start(torch.tensor([len(prompt[b][0]) for b in range(B)]), torch.full((B,), budget))
    policy.on_prefill(0, None, 0)
    slot = (pos < 0).to(torch.int8).argmax(dim=-1)
    prompt_len = torch.full((B,), P)
    budgets = torch.full((B,), budget)
    step = step_fn or decode_step
    out = []
    for t in range(steps):
        pos.scatter_(2, slot.unsqueeze(-1), P + t)
        logits = torch.randn(B, Hkv * G, S, generator=g) * 3
        if t % 3 == 0:  # ties: some steps give equal attention to several tokens
            logits = logits.round()
        valid = (pos >= 0).repeat_interleave(G, dim=1)
        probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
        written = slot.clone()
        before = pos.clone()
        scores, victim = step(policy, probs, pos, written, prompt_len, budgets, plan.unified)
        out.append(dict(pos=before, probs=probs, scores=scores.clone(), victim=victim.clone()))
        pos.scatter_(2, victim.unsqueeze(-1), -1)
        slot = victim
    return out


def decode_step(policy, probs, pos, written, prompt_len, budgets, unified):
    """What the engine's decode step does after attention (tinyengine/engine.py)."""
    scores = policy.decode_scores(0, probs, pos, written)
    in_pool = pos >= (0 if unified else prompt_len[:, None, None])
    return scores, choose_victim(scores, pos, in_pool, budgets)


def reference_decode(name, policy, plan, B, Hkv, G, prompt, trace):
    """Replay `trace` token by token and check every step's scores and eviction."""
    P = 1 + max((max(p) for row in prompt for p in row if p), default=-1)
    budget = plan.pool_budget(P)
    for b in range(B):
        for h in range(Hkv):
            kept, state = list(prompt[b][h]), {}
            for t, step in enumerate(trace):
                new = P + t
                kept.append(new)
                pos = step["pos"][b, h].tolist()
                slot_of = {p: s for s, p in enumerate(pos) if p >= 0}
                assert sorted(slot_of) == sorted(kept), f"{name}: step {t} row {b} head {h}: cache holds the wrong tokens"
                heads = range(Hkv * G) if name == "tova" else range(h * G, (h + 1) * G)
                probs = [{p: step["probs"][b, q, s].item() for p, s in slot_of.items()} for q in heads]
                scores = token_scores(name, policy, kept, probs, new, state, budget)
                got = {p: step["scores"][b, h, s].item() for p, s in slot_of.items()}
                for p in kept:
                    assert got[p] == pytest.approx(scores[p], rel=1e-5, abs=1e-6), f"{name}: step {t}, token {p}"
                pool = set(kept) if plan.unified else {p for p in kept if p >= P}
                victim = reference_victim(scores, pool, budget)
                chosen = pos[step["victim"][b, h].item()]
                assert chosen == (victim if victim is not None else -1), f"{name}: step {t}: evicted {chosen}, expected {victim}"
                if victim is not None:
                    kept.remove(victim)
                    state.pop(victim, None)


def prompts_for(name, B, Hkv, seed):
    """Prompt entries held at the start: none for unified policies; a compressed prompt (different
    tokens per kv head) for the separate-pools policy."""
    if name != "scope":
        return [[[] for _ in range(Hkv)] for _ in range(B)]
    g = torch.Generator().manual_seed(seed)
    return [[sorted(torch.randperm(12, generator=g)[:5].tolist()) for _ in range(Hkv)] for _ in range(B)]


@pytest.mark.parametrize("name", DECODE_SPECS)
@pytest.mark.parametrize("seed", range(3))
def test_decode_equals_loop_reference(name, seed):
    plan = make_plan(**DECODE_SPECS[name])
    B, Hkv, G = 2, 2, 2
    prompt = prompts_for(name, B, Hkv, seed)
    trace = simulate(name, plan.decode, plan, B, Hkv, G, prompt, steps=14, seed=seed)
    reference_decode(name, plan.decode, plan, B, Hkv, G, prompt, trace)


# ---------------------------------------------------------------------------- prefill references
def random_candidates(B=2, Hkv=2, G=2, N=20, W=4, seed=0):
    """Candidates in position order with padding at the end of the second row, and window probs."""
    g = torch.Generator().manual_seed(seed)
    lengths = [N, N - 5]
    pos = torch.full((B, Hkv, N), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        pos[b, :, :n] = torch.arange(n)
    keys = torch.randn(B, Hkv, N, 8, generator=g)
    logits = torch.randn(B, Hkv * G, W, N, generator=g) * 2
    probs = torch.zeros_like(logits)
    for b, n in enumerate(lengths):
        for w in range(W):
            q = n - W + w  # causal: query at q sees 0..q
            probs[b, :, w, : q + 1] = torch.softmax(logits[b, :, w, : q + 1], dim=-1)
    return keys, pos, probs, lengths


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_scores_equal_loops(pooling):
    keys, pos, probs, lengths = random_candidates()
    policy = make_plan("snapkv", budget=64, options=dict(window=4, kernel=5, pooling=pooling)).prefill
    got = policy.prefill_scores(0, keys, None, pos, probs)
    B, Hkv, N = pos.shape
    G, W, k = probs.shape[1] // Hkv, probs.shape[2], policy.kernel
    for b, n in enumerate(lengths):
        prefix = n - W  # the window's tokens are kept; the pooling sees the prefix only, zero-padded
        for h in range(Hkv):
            for j in range(n):
                if j >= prefix:
                    assert got[b, h, j] == PROTECT
                    continue
                per_head = []
                for q in range(h * G, (h + 1) * G):
                    votes = [sum(probs[b, q, w, i].item() for w in range(W)) / W if 0 <= i < prefix else 0.0
                             for i in range(j - k // 2, j + k // 2 + 1)]
                    per_head.append(max(votes) if pooling == "max" else sum(votes) / k)
                assert got[b, h, j].item() == pytest.approx(sum(per_head) / G, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("vote_mean", ["window", "token"])
@pytest.mark.parametrize("seed", range(2))
def test_momentkv_votes_equal_loops(vote_mean, seed):
    """momentkv's attention base (kernel 1, nothing protected, no MI) with a window shorter than the
    prompt: "window" divides a token's summed votes by the W window queries, "token" by the window
    queries that see it (the ones at or after its position), as kvpress's ObservedAttention."""
    keys, pos, probs, lengths = random_candidates(W=6, seed=seed)
    B, Hkv, N = pos.shape
    G, W = probs.shape[1] // Hkv, probs.shape[2]
    policy = make_plan("momentkv", budget=64, options=dict(window=W, kernel=1, recent=0, mi="none", nc=False,
                                                           vote_mean=vote_mean)).prefill
    policy.allocate(1, B, Hkv, N, "cpu")
    policy.start(torch.full((B,), 8), torch.full((B,), 8))
    qpos = torch.tensor([[n - W + w for w in range(W)] for n in lengths])
    window = (torch.zeros(B, Hkv * G, W, 8), qpos, torch.ones(B, W, dtype=torch.bool))
    got = policy.prefill_scores(0, keys, None, pos, probs, window=window)
    for b, n in enumerate(lengths):
        for h in range(Hkv):
            for j in range(n):
                voters = [w for w in range(W) if qpos[b, w] >= j]
                count = len(voters) if vote_mean == "token" else W
                votes = [sum(probs[b, q, w, j].item() for w in voters) / max(count, 1) for q in range(h * G, (h + 1) * G)]
                assert got[b, h, j].item() == pytest.approx(sum(votes) / G, rel=1e-5, abs=1e-7)


def test_knorm_and_keydiff_scores_equal_loops():
    keys, pos, _, lengths = random_candidates()
    knorm = make_plan("knorm", budget=8).prefill.prefill_scores(0, keys, None, pos, None)
    keydiff = make_plan("keydiff", budget=8).prefill.prefill_scores(0, keys, None, pos, None)
    for b, n in enumerate(lengths):
        for h in range(keys.shape[1]):
            units = [keys[b, h, j] / keys[b, h, j].norm() for j in range(n)]  # padding is left out
            anchor = sum(units) / n
            for j in range(n):
                assert knorm[b, h, j].item() == pytest.approx(-keys[b, h, j].norm().item(), rel=1e-6)
                cos = (keys[b, h, j] @ anchor / (keys[b, h, j].norm() * anchor.norm())).item()
                assert keydiff[b, h, j].item() == pytest.approx(-cos, rel=1e-5, abs=1e-6)


def test_tova_prefill_scores_equal_loops():
    _, pos, probs, lengths = random_candidates()
    got = make_plan("tova", budget=8).prefill.prefill_scores(0, None, None, pos, probs[:, :, -1:])
    for b, n in enumerate(lengths):
        for h in range(pos.shape[1]):
            for j in range(n):
                want = PROTECT if j == n - 1 else sum(probs[b, q, -1, j].item() for q in range(probs.shape[1])) / probs.shape[1]
                assert got[b, h, j].item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------- engine
def tiny_model(layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.llama import ModelArgs, Transformer

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"])
    hf = LlamaForCausalLM(cfg).eval()
    model = Transformer(ModelArgs.from_hf_config(cfg.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=False)
    return model.eval()


def prompts_of(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]


def test_h2o_prefill_scores_are_attention_column_sums_and_carry_across_chunks():
    """After prefill, a kept token's h2o score is the attention the prompt's queries gave it
    (summed over the kv head's query heads), whether the prompt came in one pass or in chunks."""
    from tinyengine.attention import reference_attention

    model = tiny_model()
    prompt = prompts_of([23], seed=3)[0]
    states = []
    for chunk in (None, 5):
        engine = Engine(model, make_plan("h2o", budget=64), prefill_chunk=chunk)
        engine.generate([prompt], 1)
        states.append(engine.plan.decode.scores[:, 0, :, :23].clone())
    torch.testing.assert_close(states[1], states[0], rtol=1e-5, atol=1e-6)
    # the loop reference for layer 0: recompute the prompt's attention with plain torch
    captured = {}

    def attend_for(i):
        def attend(q, k, v):
            if i == 0:
                captured["q"], captured["k"] = q, k
            T = q.shape[2]
            p = torch.arange(T)[None]
            return reference_attention(q, k, v, p, p[:, None].expand(-1, k.shape[1], -1))[0]
        return attend

    tokens = torch.tensor([prompt])
    with torch.no_grad():
        model(tokens, torch.arange(23)[None], attend_for)
    q, k = captured["q"][0], captured["k"][0]
    for h in range(k.shape[0]):
        for j in range(23):
            total = 0.0
            for head in (2 * h, 2 * h + 1):
                for i in range(j, 23):
                    logits = q[head, i] @ k[h, : i + 1].T / math.sqrt(q.shape[-1])
                    total += torch.softmax(logits, dim=-1)[j].item()
            assert states[0][0, h, j].item() == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("name, backend", [("streamingllm", None), ("h2o", None), ("tova", None), ("scope", None),
                                           ("pyramidkv+h2o", None), ("h2o", "reference"), ("pyramidkv+h2o", "reference")])
def test_compiled_decode_equals_eager_without_recompiles(name, backend):
    """None: the CPU's default, the fused kernels (as operators when compiled); reference: the torch
    code, the compiled path on CUDA."""
    import torch._dynamo

    specs = dict(DECODE_SPECS, **{
        "streamingllm": dict(spec="streamingllm", budget=10, options=dict(n_sink=2)),
        "h2o": dict(spec="h2o", budget=10), "tova": dict(spec="tova", budget=10),
        "pyramidkv+h2o": dict(spec="pyramidkv+h2o", ratio=0.5, decode_budget=4, options=dict(window=2, beta=2)),
    })
    model = tiny_model(seed=1)
    eager = Engine(model, make_plan(**specs[name]), decode_backend=backend)
    compiled = Engine(model, make_plan(**specs[name]), compile=True, decode_backend=backend)
    torch._dynamo.reset()
    first = prompts_of([12, 7], seed=2)
    for e in (eager, compiled):  # one allocation for every batch below, so the graph never changes
        L = model.args.num_layers
        e.setup(2, [max(e.plan.capacity(n, 25, i, L) for n in (12, 30, 50)) for i in range(L)])
    assert compiled.generate(first, 12) == eager.generate(first, 12)
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed, lengths in [(4, [30, 3]), (5, [1, 50]), (6, [20, 20])]:
            batch = prompts_of(lengths, seed=seed)
            assert compiled.generate(batch, 25) == eager.generate(batch, 25)
            for a, b in zip(compiled.caches, eager.caches):
                assert torch.equal(a.pos, b.pos)
