"""MomentKV (policies/momentkv.py, policies/correction.py): exact moments, NC, MI, the engine wiring."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import make_plan
from policies.correction import Correction, batch_moments, flex_with_lse, moment_floats, nc_attention, nc_merge
from policies.momentkv import ABLATION, key_distinctness, mi_cost, mi_cost_decode, value_distances
from tinyengine.attention import reference_attention
from tinyengine.engine import Engine
from tinyengine.errors import TinyEngineError

from test_engine import prompts_of, tiny_pair

W = {"window": "16"}  # a small observation window for the tiny prompts (momentkv's default is 512)
SNAP = {**W, "recent": "-1", "kernel": "7"}  # SnapKV's base: its window protected, its pooling


@pytest.fixture(scope="module")
def model():
    return tiny_pair()[1]


def moments64(k, v):
    """Definition of the moments, float64, of one set: k, v [n, D]."""
    k, v = k.double(), v.double()
    mk, mv = k.mean(0), v.mean(0)
    return len(k), mk, mv, (v - mv).T @ (k - mk) / len(k)


# ----------------------------------------------------------------------------- moments


@given(seed=st.integers(0, 10**6), ops=st.lists(st.sampled_from(["one", "batch", "empty"]), min_size=1, max_size=12))
def test_moments_equal_batch_recomputation(seed, ops):
    """After any sequence of decode evictions (one slot per layer, row and head, some slots empty)
    and prefill evictions (a batch, into layer 1), the online moments of every layer equal the
    moments of everything evicted from it, recomputed at once. Layers hold different capacities."""
    from tinyengine.cache import KVCache

    g = torch.Generator().manual_seed(seed)
    L, B, H, D, caps = 2, 2, 2, 4, (3, 5)
    c = Correction()
    c.allocate(L, B, H, D, "cpu")
    evicted = [[[[] for _ in range(H)] for _ in range(B)] for _ in range(L)]
    for op in ops:
        if op == "batch":
            n = int(torch.randint(1, 9, (1,), generator=g))
            k, v = torch.randn(B, H, n, D, generator=g) * 3 + 1, torch.randn(B, H, n, D, generator=g)
            mask = torch.rand(B, H, n, generator=g) < 0.6
            c.absorb(1, k, v, mask)
            for b in range(B):
                for h in range(H):
                    evicted[1][b][h] += [(k[b, h, i], v[b, h, i]) for i in range(n) if mask[b, h, i]]
            continue
        pos = torch.full((L, B, H, max(caps)), -1)  # the engine's stacked slot positions, viewed per layer
        caches = [KVCache(B, H, cap, D, torch.float32, "cpu", pos=pos[i, :, :, :cap]) for i, cap in enumerate(caps)]
        for cache in caches:
            cache.k.copy_(torch.randn(cache.k.shape, generator=g) * 3 + 1)
            cache.v.copy_(torch.randn(cache.v.shape, generator=g))
        slots = torch.stack([torch.randint(0, cap, (B, H), generator=g) for cap in caps])
        held = (torch.rand(L, B, H, generator=g) < 0.7) & (op == "one")  # else the slot is empty
        pos.scatter_(3, slots.unsqueeze(-1), torch.where(held, 7, -1).unsqueeze(-1))
        before = [t.clone() for t in (c.n, c.mu_k, c.mu_v, c.C)]
        c.absorb_slots(slots, [x.k for x in caches], [x.v for x in caches], pos)
        for layer in range(L):
            for b in range(B):
                for h in range(H):
                    if held[layer, b, h]:
                        slot = slots[layer, b, h]
                        evicted[layer][b][h].append((caches[layer].k[b, h, slot], caches[layer].v[b, h, slot]))
                    else:  # an empty slot: bit for bit no change, no branch
                        assert all(torch.equal(x[layer, b, h], y[layer, b, h]) for x, y in zip((c.n, c.mu_k, c.mu_v, c.C), before))
    for layer in range(L):
        n, mk, mv, C = c.moments(layer)
        for b in range(B):
            for h in range(H):
                got = evicted[layer][b][h]
                if not got:
                    assert n[b, h] == 0 and not C[b, h].any() and not mk[b, h].any()
                    continue
                want = moments64(torch.stack([e[0] for e in got]), torch.stack([e[1] for e in got]))
                assert n[b, h] == want[0]
                for x, exp in zip((mk[b, h], mv[b, h], C[b, h]), want[1:]):
                    torch.testing.assert_close(x.double(), exp, atol=2e-5, rtol=1e-4)


def test_batch_moments_definition():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 20, 8, generator=g), torch.randn(1, 1, 20, 8, generator=g)
    mask = torch.rand(1, 1, 20, generator=g) < 0.5
    n, mk, mv, C = batch_moments(k, v, mask)
    want = moments64(k[0, 0][mask[0, 0]], v[0, 0][mask[0, 0]])
    assert n.item() == want[0]
    for got, exp in zip((mk[0, 0], mv[0, 0], C[0, 0]), want[1:]):
        torch.testing.assert_close(got.double(), exp, atol=1e-6, rtol=1e-5)
    assert moment_floats(64) == 64 * 64 + 2 * 64 + 1


# ----------------------------------------------------------------------------- NC


def gaussian_case(seed, B=2, Hq=4, Hkv=2, S=48, D=16, T=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g) * scale
    k = torch.randn(B, Hkv, S, D, generator=g) * scale
    v = torch.randn(B, Hkv, S, D, generator=g)
    evicted = torch.rand(B, Hkv, S, generator=g) < 0.5
    evicted[..., -1] = False  # every query keeps at least one slot
    return q, k, v, evicted


def split(k, v, evicted):
    """The cache after eviction (evicted slots emptied) and the evicted set's moments."""
    S = k.shape[2]
    pos = torch.arange(S).expand(k.shape[:3]).masked_fill(evicted, -1)
    return pos, batch_moments(k, v, evicted)


def full_attention(q, k, v):
    S = k.shape[2]
    pos = torch.arange(S).expand(k.shape[:3])
    return reference_attention(q, k, v, torch.full(q.shape[:1] + q.shape[2:3], S), pos)[0]


def nc_loop(q, k, v, evicted):
    """(Z_K o_K + Z_E (mu_v + tau C q)) / (Z_K + Z_E), one (row, head) at a time, float64."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    tau = 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kk, vv, ev = k[b, h // G].double(), v[b, h // G].double(), evicted[b, h // G]
            n, mk, mv, C = moments64(kk[ev], vv[ev]) if ev.any() else (0, 0, 0, 0)
            for t in range(T):
                qq = q[b, h, t].double()
                e = torch.exp(tau * kk[~ev] @ qq)
                zk, ok = e.sum(), e @ vv[~ev] / e.sum()
                ze = n * torch.exp(tau * qq @ mk) if n else 0.0
                pred = mv + tau * C @ qq if n else 0.0
                out[b, h, t] = (zk * ok + ze * pred) / (zk + ze)
    return out


def test_nc_with_nothing_evicted_is_plain_attention_exactly():
    q, k, v, _ = gaussian_case(0, T=3)
    pos = torch.arange(k.shape[2]).expand(k.shape[:3]).clone()
    pos[0, 1, 5:9] = -1  # holes are not evictions
    none = batch_moments(k, v, torch.zeros(k.shape[:3], dtype=torch.bool))
    q_pos = torch.full((2, 3), 100)
    out, probs, w, _ = nc_attention(q, k, v, q_pos, pos, none)
    plain, plain_probs = reference_attention(q, k, v, q_pos, pos)
    assert torch.equal(out, plain) and torch.equal(probs, plain_probs) and not w.any()


@pytest.mark.parametrize("seed", [0, 1])
def test_nc_equals_loop_reference_both_paths(seed):
    q, k, v, evicted = gaussian_case(seed, T=2)
    pos, m = split(k, v, evicted)
    q_pos = torch.full((2, 2), 1000)
    out, probs, w, _ = nc_attention(q, k, v, q_pos, pos, m)
    want = nc_loop(q, k, v, evicted)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1) + w, torch.ones_like(w))  # the virtual slot holds the rest
    # The LSE formulation (FlexAttention on CUDA; eager here) gives the same numbers.
    flex_out, lse = flex_with_lse(q, k, v, q_pos, pos)
    torch.testing.assert_close(nc_merge(q, flex_out, lse, m)[0].double(), want, atol=2e-5, rtol=1e-4)
    c = Correction()
    c.allocate(1, 2, 2, 16, "cpu")
    c.absorb(0, k, v, evicted)
    torch.testing.assert_close(c.correct(0, q, flex_out, lse).double(), want, atol=2e-5, rtol=1e-4)


def test_nc_is_exact_when_every_evicted_key_is_the_mean():
    q, k, v, evicted = gaussian_case(2, T=4)
    k = k.clone()
    shared = torch.randn(2, 2, 1, 16)
    k = torch.where(evicted.unsqueeze(-1), shared, k)  # the evicted keys coincide, their values differ
    pos, m = split(k, v, evicted)
    out = nc_attention(q, k, v, torch.full((2, 4), 1000), pos, m)[0]
    full = full_attention(q, k, v)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    plain = reference_attention(q, k, v, torch.full((2, 4), 1000), pos)[0]
    assert (plain - full).abs().max() > 1e-2  # eviction alone is visibly off here


@pytest.mark.parametrize("seed", range(4))
def test_nc_error_below_plain_eviction_on_gaussian_data(seed):
    q, k, v, evicted = gaussian_case(seed, B=4, S=256, T=16, D=32)
    pos, m = split(k, v, evicted)
    q_pos = torch.full((4, 16), 1000)
    full = full_attention(q, k, v)
    nc_err = (nc_attention(q, k, v, q_pos, pos, m)[0] - full).norm(dim=-1)
    plain_err = (reference_attention(q, k, v, q_pos, pos)[0] - full).norm(dim=-1)
    assert nc_err.mean() < 0.5 * plain_err.mean()
    assert (nc_err < plain_err).float().mean() > 0.9


# ----------------------------------------------------------------------------- MI


def test_nc_error_decomposes_exactly_per_evicted_token():
    """The identity MI rests on: o_true - o_NC = sum_E pbar phi(x_i) (v_i - o_NC), float64."""
    g = torch.Generator().manual_seed(5)
    D, S = 8, 30
    q, k, v = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(S, D, generator=g, dtype=torch.float64), torch.randn(S, D, generator=g, dtype=torch.float64)
    ev = torch.rand(S, generator=g) < 0.5
    tau = 1 / math.sqrt(D)
    n, mk, mv, C = moments64(k[ev], v[ev])
    e = torch.exp(tau * k @ q)
    Z = e.sum()
    o_true = e @ v / Z
    ze = n * torch.exp(tau * q @ mk)
    o_nc = (e[~ev] @ v[~ev] + ze * (mv + tau * C @ q)) / (e[~ev].sum() + ze)
    x = tau * (k[ev] - mk) @ q
    pbar = torch.exp(tau * q @ mk) / Z
    residual = ((pbar * (torch.expm1(x) - x)).unsqueeze(-1) * (v[ev] - o_nc)).sum(0)
    torch.testing.assert_close(o_true - o_nc, residual, atol=1e-12, rtol=1e-9)


def mi_loop(q, k, v, cand, current_set, reference_set, kind="nc", with_floor=False):
    """mi_cost by its definition (docstring of policies/momentkv.py, 4), float64, one (row, head,
    query) at a time, with distances taken directly: [B, Hq, T, S], 0 off the candidates.

    with_floor: also the float32 rounding floor of each cost, as float32 code that expands
    ||v_i - o||^2 = ||v_i||^2 - 2 o.v_i + ||o||^2 has it. That sum of D + 2 terms of size up to
    (|v_i| + |o|)^2 carries an absolute error up to (D + 2) u (|v_i| + |o|)^2 (u = 2^-24), so the
    distance one of up to sqrt((D + 2) u) (|v_i| + |o|): where v_i ~ o (a token holding nearly all
    the attention) that is all of it. The weight p_i - pbar (1 + x_i) cancels near x = 0 to an
    error of a few u (p_i + pbar (1 + |x_i|)). Floor = weight * distance error / rms + weight
    error * d_i / rms, each doubled for the other terms' (o's, the rms's) smaller errors."""
    B, Hq, T, D = q.shape
    G, tau = Hq // k.shape[1], 1 / math.sqrt(D)
    u = 2.0 ** -24
    cost = torch.zeros(B, Hq, T, k.shape[2], dtype=torch.float64)
    floor = torch.zeros_like(cost)
    for b in range(B):
        for h in range(Hq):
            kk, vv, c, cur, ref = k[b, h // G].double(), v[b, h // G].double(), cand[b, h // G], current_set[b, h // G], reference_set[b, h // G]
            if not ref.any():
                continue  # an empty summary: no cost
            n_c, mk_c, mv_c, C_c = moments64(kk[cur], vv[cur]) if cur.any() else (0, torch.zeros(D, dtype=torch.float64), 0, 0)
            n_r, mk_r, mv_r, C_r = moments64(kk[ref], vv[ref])
            for t in range(T):
                qq = q[b, h, t].double()
                e = torch.exp(tau * kk[c] @ qq)
                Z = e.sum() + n_c * torch.exp(tau * qq @ mk_c)  # normalizer estimated with the current summary
                o = (e @ vv[c] + (n_c * torch.exp(tau * qq @ mk_c) * (mv_c + tau * C_c @ qq) if n_c else 0)) / Z
                if kind == "nc":
                    x = tau * (kk[c] - mk_r) @ qq
                    pbar = torch.exp(tau * qq @ mk_r) / Z
                    weight = pbar * (torch.expm1(x) - x)
                    weight_error = 4 * u * (e / Z + pbar * (1 + x.abs()))
                    target = o
                else:
                    weight = e / Z
                    weight_error = 4 * u * weight
                    target = mv_r + tau * C_r @ qq
                d = (vv[c] - target).norm(dim=-1)
                rms = d.pow(2).mean().sqrt()
                cost[b, h, t, c] = weight * d / rms
                distance_error = math.sqrt((D + 2) * u) * (vv[c].norm(dim=-1) + target.norm())
                floor[b, h, t, c] = 2 * (weight * distance_error + weight_error * d) / rms
    return (cost, floor) if with_floor else cost


@pytest.mark.parametrize("kind", ["nc", "value"])
def test_mi_cost_equals_loop_reference(kind):
    q, k, v, evicted = gaussian_case(3, T=2, S=20)
    cand = ~evicted  # what is still cached: the candidates
    pos, current = split(k, v, evicted)
    drop = cand & (torch.rand(cand.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
    reference = batch_moments(k, v, evicted | drop)
    allowed = cand.unsqueeze(2).expand(-1, -1, 2, -1)
    got = mi_cost(q, allowed, k, v, current, reference, kind)
    torch.testing.assert_close(got.double(), mi_loop(q, k, v, cand, evicted, evicted | drop, kind), atol=1e-6, rtol=1e-4)


@settings(deadline=None)
@given(seed=st.integers(0, 10**6), scale=st.sampled_from([0.3, 1.0, 3.0]), evicted_share=st.sampled_from([0.0, 0.3, 0.8]),
       holes=st.booleans())
def test_mi_cost_decode_equals_mi_cost(seed, scale, evicted_share, holes):
    """The decode fast path (NC attention's own scores, w_E / n, one matmul over the values) is as
    accurate as the reference `mi_cost` on random inputs: keys spread from flat to peaked attention, nothing
    evicted (cost 0) to most of it, empty slots in the cache."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, S, D = 2, 6, 2, 24, 8
    q = torch.randn(B, Hq, 1, D, generator=g) * scale
    k, v = torch.randn(B, Hkv, S, D, generator=g) * scale, torch.randn(B, Hkv, S, D, generator=g)
    evicted = torch.rand(B, Hkv, S, generator=g) < evicted_share
    evicted[..., -1] = False
    pos = torch.arange(S).expand(B, Hkv, S).masked_fill(evicted, -1)
    if holes:  # never-written slots: position -1, zero key and value
        pos = pos.masked_fill(torch.rand(B, Hkv, S, generator=g) < 0.2, -1)
        pos[..., -1] = S - 1
    m = batch_moments(k, v, evicted)
    out, probs, w, (logits, probs_ext) = nc_attention(q, k, v, torch.full((B, 1), S), pos, m)
    reference = mi_cost(q, (pos >= 0).unsqueeze(2), k, v, m, m, "nc", out)[:, :, 0].double()
    G = Hq // Hkv
    assert torch.equal(probs_ext[..., :S], probs.view(B, Hkv, G, S)) and torch.equal(probs_ext[..., S], w.view(B, Hkv, G))
    got = mi_cost_decode(probs_ext[..., :S], probs_ext[..., S], logits[..., :S], logits[..., S], value_distances(out, v),
                         m[0], pos >= 0).view(B, Hq, S).double()
    assert torch.isfinite(got).all() and (got >= 0).all() and not got[(pos < 0).repeat_interleave(Hq // Hkv, 1)].any()
    # Both expand ||v_i - o||^2 in float32, so both are held to that expansion's rounding floor
    # against the exact float64 definition (mi_loop's docstring), not to each other's last bits.
    exact, floor = (t[:, :, 0] for t in mi_loop(q, k, v, pos >= 0, evicted, evicted, with_floor=True))
    for cost in (got, reference):
        assert ((cost - exact).abs() <= floor + 1e-5 * exact + 1e-7).all()


def test_mi_cost_sum_in_query_blocks_equals_one_pass(monkeypatch):
    import policies.momentkv as momentkv

    q, k, v, evicted = gaussian_case(3, T=9, S=20)
    pos, current = split(k, v, evicted)
    reference = batch_moments(k, v, evicted | (torch.rand(evicted.shape, generator=torch.Generator().manual_seed(1)) < 0.3))
    allowed = (~evicted).unsqueeze(2).expand(-1, -1, 9, -1)
    want = mi_cost(q, allowed, k, v, current, reference).sum(2)
    monkeypatch.setattr(momentkv, "query_block", lambda rows, elems: 2)  # blocks of 2, 2, 2, 2, 1 queries
    torch.testing.assert_close(momentkv.mi_cost_sum(q, allowed, k, v, current, reference), want, atol=1e-6, rtol=1e-5)


def test_mi_cost_is_zero_with_an_empty_summary_and_prefill_skips_it(model, monkeypatch):
    """Nothing evicted before and nothing to drop: every cost is 0 (mi_cost's scale), so prefill
    skips the window's pass (long generation's prompt within a unified budget): base + 0 = base.
    A prompt over the budget still runs it."""
    import policies.momentkv as momentkv

    q, k, v, evicted = gaussian_case(3, T=4, S=20)
    empty = batch_moments(k, v, torch.zeros_like(evicted))
    allowed = torch.ones(k.shape[0], k.shape[1], 4, k.shape[2], dtype=torch.bool)
    assert not mi_cost(q, allowed, k, v, empty, empty).any()
    calls = []
    real = momentkv.mi_cost_sum
    monkeypatch.setattr(momentkv, "mi_cost_sum", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    prompts = prompts_of([60, 45])
    Engine(model, make_plan("momentkv", budget=80)).generate(prompts, 4)
    assert not calls  # (decode's MI is the kernel's or mi_cost_decode)
    Engine(model, make_plan("momentkv", budget=40)).generate(prompts, 4)
    assert calls


# ----------------------------------------------------------------------------- plans and the engine


def test_plans_and_errors():
    assert make_plan("momentkv", budget=128).correction.apply_nc
    assert make_plan("snapkv+momentum", budget=64, decode_budget=8, correction="nc").correction.apply_nc
    assert make_plan("h2o", budget=64, correction="nc").correction is not None
    assert make_plan("snapkv+momentum", budget=64, decode_budget=8).correction is None
    variants = {name: make_plan("momentkv", budget=128, options=opts) for name, opts in ABLATION.items()}
    assert variants["evict-only"].correction is None
    assert variants["NC"].correction.apply_nc and variants["NC"].decode.mi == "none"
    assert not variants["MI"].correction.apply_nc and variants["MI"].decode.mi == "nc"
    assert not make_plan("momentkv", budget=128, correction="none").correction.apply_nc  # MI alone
    with pytest.raises(ValueError, match="evicts none"):
        make_plan("full", correction="nc")
    with pytest.raises(ValueError, match="unknown correction"):
        make_plan("momentkv", budget=128, correction="magic")
    with pytest.raises(ValueError, match="keeps no moments"):
        make_plan("h2o", budget=64, options={"count_moments_in_budget": "true"})
    with pytest.raises(ValueError, match="unknown mi"):
        make_plan("momentkv", budget=128, options={"mi": "psychic"})
    with pytest.raises(ValueError, match="window"):
        make_plan("momentkv", budget=64, options={"window": 64, "recent": -1})  # SnapKV's window 64 needs 65
    make_plan("momentkv", budget=64)  # the default protects a recent fraction of the budget, not the window
    with pytest.raises(ValueError, match="carry"):
        make_plan("momentkv", budget=128, options={"carry": "all"})
    with pytest.raises(ValueError, match="recent"):
        make_plan("momentkv", budget=128, options={"recent": 1.0})
    with pytest.raises(ValueError, match="vote_mean must be window or token"):
        make_plan("momentkv", budget=128, options={"vote_mean": "query"})
    with pytest.raises(ValueError, match="base must be attention or keys"):
        make_plan("momentkv", budget=128, options={"base": "values"})
    with pytest.raises(ValueError, match="base=keys protects the newest tokens"):
        make_plan("momentkv", budget=128, options={"base": "keys", "recent": -1})


def layer0_kv(model, tokens):
    """Keys (after RoPE) and values of layer 0 for every token: they do not depend on the cache."""
    e = Engine(model)
    e.setup(1, len(tokens) + 1)
    e.prefill(torch.tensor([tokens]), torch.tensor([len(tokens)]))
    return e.caches[0].k[0, :, : len(tokens)], e.caches[0].v[0, :, : len(tokens)]


@pytest.mark.parametrize("spec,kw,chunk", [
    ("momentkv", dict(budget=40, options=W), None),
    ("momentkv", dict(budget=40, options=W), 16),
    ("momentkv", dict(budget=40, options={**W, "vote_mean": "token"}), 16),
    ("snapkv+momentum", dict(budget=40, decode_budget=8, correction="nc"), 16),
])
def test_engine_moments_are_those_of_the_evicted_tokens(model, spec, kw, chunk):
    """End to end, layer 0: the moments equal the moments of every token no longer in the cache,
    whether prefill dropped it (batch merges, chunk by chunk) or decode evicted it (one by one)."""
    (prompt,) = prompts_of([70])
    e = Engine(model, make_plan(spec, **kw), prefill_chunk=chunk)
    out = e.generate([prompt], 40)[0]
    tokens = prompt + out[:-1]  # the last token was sampled, never written
    k, v = layer0_kv(model, tokens)
    pos = e.caches[0].pos[0]
    budget = kw["budget"] + kw.get("decode_budget", 0)
    assert ((pos >= 0).sum(-1) <= budget).all()
    n, mk, mv, C = e.plan.correction.moments(0)
    for h in range(pos.shape[0]):
        gone = torch.ones(len(tokens), dtype=torch.bool)
        gone[pos[h][pos[h] >= 0]] = False
        want = moments64(k[h][gone], v[h][gone])
        assert n[0, h] == want[0] == len(tokens) - (pos[h] >= 0).sum()
        for got, exp in zip((mk[0, h], mv[0, h], C[0, h]), want[1:]):
            torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-4)


def test_engine_nc_without_evictions_is_bitwise_plain(model):
    prompts = prompts_of([30, 12])
    tokens = torch.zeros(2, 30, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([30, 12])
    plain, nc = Engine(model, make_plan("momentum", decode_budget=64)), Engine(model, make_plan("momentum", decode_budget=64, correction="nc"))
    for e in (plain, nc):
        e.setup(2, 100)
    a, b = plain.prefill(tokens, lengths), nc.prefill(tokens, lengths)
    assert torch.equal(a, b)
    for step in range(10):
        tok, positions = a.argmax(-1, keepdim=True), (lengths + step)[:, None]
        a, b = plain.decode_step(tok, positions), nc.decode_step(tok, positions)
        assert torch.equal(a, b)


def test_momentkv_without_mi_and_nc_keeps_snapkvs_prompt(model):
    prompts = prompts_of([80, 50])
    for chunk in (None, 32):
        snap = Engine(model, make_plan("snapkv", budget=40, options=W), prefill_chunk=chunk)
        mkv = Engine(model, make_plan("momentkv", budget=40, options={**SNAP, **ABLATION["evict-only"]}), prefill_chunk=chunk)
        for e in (snap, mkv):
            e.generate(prompts, 1)
        for a, b in zip(snap.caches, mkv.caches):
            assert torch.equal(a.pos.sort(-1).values, b.pos[..., : a.pos.shape[-1]].sort(-1).values)


def test_all_query_base_with_h2os_recent_window_keeps_h2os_prompt(model):
    """window >= the prompt, no pooling, recent=0.5, without MI: every prompt query votes, so the
    ranking is H2O's accumulated attention and the protected window H2O's: the same prompt set."""
    prompts = prompts_of([80, 50])
    h2o = Engine(model, make_plan("h2o", budget=40))
    mkv = Engine(model, make_plan("momentkv", budget=40, options={"window": 128, "kernel": 1, "recent": 0.5,
                                                                 **ABLATION["evict-only"]}))
    for e in (h2o, mkv):
        e.generate(prompts, 1)
    for a, b in zip(h2o.caches, mkv.caches):
        assert torch.equal(a.pos.sort(-1).values, b.pos[..., : a.pos.shape[-1]].sort(-1).values)


def test_recent_window_survives_decode(model):
    """recent=r: the newest floor(r * budget) tokens are never evicted, at prefill or decode."""
    prompts = prompts_of([90, 41])
    e = Engine(model, make_plan("momentkv", budget=40, options={**W, "recent": 0.5}))
    out = e.generate(prompts, 25)
    for c in e.caches:
        for row, p in enumerate(prompts):
            newest = len(p) + len(out[row]) - 2  # the last sampled token is never written
            held = c.pos[row]
            for h in range(held.shape[0]):
                assert set(range(newest - 19, newest + 1)) <= set(held[h].tolist())


@pytest.mark.parametrize("options", [{}, {"base": "keys"}, SNAP, {"mi": "none"}])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_one_decision_per_layer_keeps_kv_heads_aligned(model, options, backend):
    """per_kv_head=False (docstring, 5c): every kv head holds the same positions in the same slots after
    the prefill and after every decode step, so the all-heads mean reads one token per slot; the
    default (per kv head) does not."""
    prompts = prompts_of([90, 61], seed=3)
    aligned = []
    for per_kv_head in (False, True):
        e = Engine(model, make_plan("momentkv", budget=40, options={**W, **options, "per_kv_head": per_kv_head}),
                   decode_backend=backend)
        e.generate(prompts, 1)
        same = [bool((c.pos == c.pos[:, :1]).all()) for c in e.caches]
        e.generate(prompts, 30)
        aligned.append(all(same) and all(bool((c.pos == c.pos[:, :1]).all()) for c in e.caches))
    assert aligned == [True, False]


def test_mi_changes_the_prompt_selection(model):
    """MI re-ranks: with the same base scorer, some kept entries differ from SnapKV's."""
    prompts = prompts_of([120])
    snap = Engine(model, make_plan("momentkv", budget=40, options={**SNAP, **ABLATION["evict-only"]}))
    mi = Engine(model, make_plan("momentkv", budget=40, options={**SNAP, "mi_weight": 5.0}))
    for e in (snap, mi):
        e.generate(prompts, 1)
    assert any(not torch.equal(a.pos.sort(-1).values, b.pos.sort(-1).values) for a, b in zip(snap.caches, mi.caches))


@given(seed=st.integers(0, 2**31), N=st.integers(1, 12), data=st.data())
def test_key_distinctness_is_one_minus_cosine_to_the_anchor(seed, N, data):
    """key_distinctness against its float64 definition: 1 - cos(k_i, a), with a the summary's key
    mean where the summary holds tokens, else the mean unit key of the valid slots (KeyDiff's)."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv, D = 2, 3, 8
    keys = torch.randn(B, Hkv, N, D, generator=g) * torch.rand(B, Hkv, N, 1, generator=g).mul(3).add(0.1)
    pos = torch.where(torch.rand(B, Hkv, N, generator=g) < 0.3, -1, torch.arange(N).expand(B, Hkv, N))
    pos[..., 0] = 0  # at least one valid slot
    mu_k, have = torch.randn(B, Hkv, D, generator=g), torch.rand(B, Hkv, generator=g) < data.draw(st.floats(0, 1))
    for anchor, where in ((None, None), (mu_k, have)):
        got = key_distinctness(keys, pos, anchor, where)
        for b in range(B):
            for h in range(Hkv):
                k = keys[b, h].double()
                unit = k[pos[b, h] >= 0] / k[pos[b, h] >= 0].norm(dim=-1, keepdim=True)
                a = mu_k[b, h].double() if where is not None and where[b, h] else unit.mean(0)
                want = 1 - (k @ a) / (k.norm(dim=-1) * a.norm())
                torch.testing.assert_close(got[b, h].double(), want, atol=1e-5, rtol=1e-5)


def test_key_base_without_mi_keeps_keydiffs_prompt(model):
    """base=keys without MI or NC, nothing protected (recent=0): KeyDiff's ranking, so KeyDiff's prompt
    set, in one pass and chunk by chunk (both anchor on the compressed cache plus the chunk; NC would
    change the later layers' keys after the first chunk's evictions)."""
    prompts = prompts_of([80, 50])
    for chunk in (None, 32):
        keydiff = Engine(model, make_plan("keydiff", budget=40), prefill_chunk=chunk)
        mkv = Engine(model, make_plan("momentkv", budget=40, options={"base": "keys", "recent": 0, **ABLATION["evict-only"]}),
                     prefill_chunk=chunk)
        for e in (keydiff, mkv):
            e.generate(prompts, 1)
        for a, b in zip(keydiff.caches, mkv.caches):
            assert torch.equal(a.pos.sort(-1).values, b.pos[..., : a.pos.shape[-1]].sort(-1).values)


def test_key_base_measures_against_the_summary(model):
    """base=keys with MI (default mi): at prefill the anchor is the key mean of the summary the
    eviction produces (it changes the set against KeyDiff's anchor on some layer); at decode each
    step's scores are 1 - cos(k_i, mu_k) with the moments of that step (the EMA of a constant, debiased:
    exactly it for tokens that entered at decode; the prompt's carry their prefill score through the EMA)."""
    prompts = prompts_of([120])
    plain = Engine(model, make_plan("momentkv", budget=40, options={"base": "keys", "mi": "none"}))
    mi = Engine(model, make_plan("momentkv", budget=40, options={"base": "keys"}))
    for e in (plain, mi):
        e.generate(prompts, 1)
    assert any(not torch.equal(a.pos.sort(-1).values, b.pos.sort(-1).values) for a, b in zip(plain.caches, mi.caches))
    e = Engine(model, make_plan("momentkv", budget=40, options={"base": "keys", "beta": 0.0}))  # beta 0: the step's own score
    seen = []
    score_step = e.plan.decode.score_step

    def spy(layer, pos, written, moments=None, observed=None):
        n, mu_k = moments.n.clone(), moments.mu_k.clone()  # before this step's eviction
        keys = torch.stack([c.k for c in e.caches])
        scores = score_step(layer, pos, written, moments, observed)
        seen.append((scores.clone(), pos.clone(), keys, n, mu_k))
        return scores

    e.plan.decode.score_step = spy
    e.generate(prompts, 6)
    assert len(seen) == 5
    for scores, pos, keys, n, mu_k in seen:
        want = key_distinctness(keys, pos, mu_k, n > 0)
        free = (pos >= 0) & (scores < 1e6)  # not in the protected recent window
        assert free.any() and (n > 0).all()
        torch.testing.assert_close(scores[free], want[free], atol=1e-5, rtol=1e-5)


def test_counting_moments_in_the_budget(model):
    a = model.args
    plan = make_plan("momentkv", budget=48, options={**W, "count_moments_in_budget": "1"})
    e = Engine(model, plan)
    slots = math.ceil(moment_floats(a.head_dim) * 4 / (2 * a.head_dim * 4 + 8))
    assert plan.reserved == slots
    e.generate(prompts_of([90]), 20)
    assert all(((c.pos >= 0).sum(-1) <= 48 - slots).all() for c in e.caches)
    policy_bytes = sum(b.numel() * b.element_size() for p in plan.policies() for b in p.buffers())
    assert e.state_bytes() - policy_bytes == a.num_layers * a.num_kv_heads * moment_floats(a.head_dim) * 4
    with pytest.raises(TinyEngineError, match="moments take"):
        Engine(model, make_plan("momentkv", budget=24, options={**SNAP, "count_moments_in_budget": "1"}))  # 15 < window + 1


@pytest.mark.parametrize("spec,kw", [
    ("momentkv", dict(budget=40, options=W)),
    ("pyramidkv+momentkv", dict(budget=40, decode_budget=12)),  # per-layer caches of different sizes
])
def test_kept_value_norms_are_the_caches(model, spec, kw):
    """The squared value norms MomentKV's torch path keeps as tokens are written (value_distances'
    ||v_i||^2) are those of the cache. (Batched scoring = layer by layer: tests/test_policies.py.)"""
    e = Engine(model, make_plan(spec, **kw), decode_backend="reference")  # the fused kernel computes them itself
    e.generate(prompts_of([70, 45], seed=5), 30)
    for i, cache in enumerate(e.caches):
        valid = cache.pos >= 0
        norm2 = e.plan.decode.value_norm2[i, ..., : cache.capacity]
        torch.testing.assert_close(norm2[valid], torch.linalg.vecdot(cache.v, cache.v)[valid])


@pytest.mark.parametrize("backend,options", [  # the CPU's fused kernels as operators; the torch code (CUDA's)
    (None, W), ("reference", W), (None, {**W, "base": "keys"}), (None, {**W, "per_kv_head": False, "beta": 0.9})])
def test_compiled_momentkv_equals_eager_without_recompiles(backend, options):
    """MI + NC + momentum in the compiled decode step: equal to eager, and 100 decode steps with
    other prompts, lengths and evictions reuse the one graph."""
    import torch._dynamo

    _, model = tiny_pair(seed=3)
    compiled = Engine(model, make_plan("momentkv", budget=40, options=options), compile=True, decode_backend=backend)
    eager = Engine(model, make_plan("momentkv", budget=40, options=options), decode_backend=backend)
    for e in (compiled, eager):
        e.setup(2, 200)
    torch._dynamo.reset()
    warm = prompts_of([50, 20])
    assert compiled.generate(warm, 4) == eager.generate(warm, 4)
    batch = prompts_of([60, 33], seed=4)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled.generate(batch, 101)
    assert got == eager.generate(batch, 101)
    torch.testing.assert_close(compiled.plan.correction.C, eager.plan.correction.C, atol=1e-4, rtol=1e-3)


def test_compiled_snapkv_momentum_nc_equals_eager_without_recompiles():
    import torch._dynamo

    _, model = tiny_pair(seed=3)
    plan = dict(budget=40, decode_budget=16, correction="nc")
    compiled = Engine(model, make_plan("snapkv+momentum", **plan), compile=True)
    eager = Engine(model, make_plan("snapkv+momentum", **plan))
    for e in (compiled, eager):
        e.setup(2, 200)
    torch._dynamo.reset()
    warm = prompts_of([50, 20])
    assert compiled.generate(warm, 4) == eager.generate(warm, 4)
    batch = prompts_of([60, 33], seed=4)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = compiled.generate(batch, 101)
    assert got == eager.generate(batch, 101)


def test_end_to_end_within_budget(model):
    prompts = prompts_of([90, 41])
    for spec, kw, held in [("momentkv", dict(budget=40, options=W), 40), ("snapkv+momentum", dict(budget=40, decode_budget=12), 52)]:
        e = Engine(model, make_plan(spec, **kw), prefill_chunk=32)
        out = e.generate(prompts, 30)
        assert [len(o) for o in out] == [30, 30]
        for c in e.caches:
            assert ((c.pos >= 0).sum(-1) <= held).all()
