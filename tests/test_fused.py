"""The fused CPU kernels (tinyengine/fused.py, decode_kernel.c) against the torch code they replace,
on random inputs: attention (plain and NC), MomentKV's per-slot decode score, the momentum update,
the moments' update and the victim choice; then in the engine, eager and compiled."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from policies import make_plan
from policies.base import choose_victim, recent_mask
from policies.correction import Correction, batch_moments, nc_attention
from policies.momentkv import mi_cost_decode
from policies.momentum import STATIONARY, momentum_update
from tinyengine import fused
from tinyengine.attention import attention, reference_attention
from tinyengine.cache import KVCache
from tinyengine.engine import Engine

from test_engine import prompts_of, tiny_pair

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler: the fused kernels are not built")

shapes = st.fixed_dictionaries(dict(
    B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.integers(1, 4), S=st.integers(1, 40),
    D=st.sampled_from([4, 8, 16, 24, 64]),  # 8k: the vector path; others: the scalar one
    seed=st.integers(0, 2**31 - 1)))
# how many ranges the kernel splits each head's slots into (0: its own choice, 1 below 512 slots);
# ranges are cut on multiples of 8, so with few slots some are empty
parts = st.sampled_from([0, 1, 2, 3, 5])


def random_step(B, Hkv, G, S, D, seed):
    """A decode query per head over a cache with empty slots and slots holding later positions
    (not visible: the slot rule), and moments with some rows empty (nothing evicted yet)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, 1, D, generator=g) * 2
    k, v = torch.randn(B, Hkv, S, D, generator=g) * 2, torch.randn(B, Hkv, S, D, generator=g)
    q_pos = torch.randint(S // 2, 2 * S, (B,), generator=g)
    kv_pos = torch.randint(-S // 3 - 1, 2 * S, (B, Hkv, S), generator=g).clamp(min=-1)
    kv_pos[..., 0] = 0  # every row sees at least one slot, as at decode (the new token)
    evicted = torch.rand(B, Hkv, 12, generator=g) < 0.5
    evicted[0, 0] = False  # nothing evicted here: NC is a no-op
    moments = batch_moments(torch.randn(B, Hkv, 12, D, generator=g) * 2, torch.randn(B, Hkv, 12, D, generator=g), evicted)
    return q, k, v, q_pos, kv_pos, moments


def close(a, b, atol=2e-6, rtol=2e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@given(shape=shapes, parts=parts)
def test_plain_attention_equals_reference(shape, parts):
    q, k, v, q_pos, kv_pos, _ = random_step(**shape)
    out, probs, score = fused.decode_attention(q, k, v, q_pos, kv_pos, want_probs=True, parts=parts)
    ref_out, ref_probs = reference_attention(q, k, v, q_pos[:, None], kv_pos)
    close(out, ref_out)
    close(attention(q, k, v, q_pos[:, None], kv_pos, backend="fused"), ref_out)  # the backend's name
    close(probs, ref_probs)
    assert score is None and torch.equal(probs == 0, ref_probs == 0)  # invisible slots get exactly 0


@given(shape=shapes, parts=parts)
def test_nc_attention_equals_torch(shape, parts):
    q, k, v, q_pos, kv_pos, moments = random_step(**shape)
    out, probs, _ = fused.decode_attention(q, k, v, q_pos, kv_pos, moments, want_probs=True, parts=parts)
    close(fused.decode_attention(q, k, v, q_pos, kv_pos, moments, parts=parts)[0], out)  # the output alone (no rescaling pass)
    ref_out, ref_probs, _, _ = nc_attention(q, k, v, q_pos[:, None], kv_pos, moments)
    close(out, ref_out, atol=1e-5)  # (outputs are sums of ~S terms of |v| ~ 1 plus NC's term: 2.1e-6 seen, float32 rounding)
    close(probs, ref_probs)


@given(shape=shapes, parts=parts, strided=st.booleans())
def test_kernel_writes_the_token_as_kvcache_write(shape, parts, strided):
    """write=(k, v, slot): the step's token goes into the cache first, as KVCache.write puts it,
    also into a layer's view of a wider position buffer (strided: pyramidkv's smaller layers); the
    probabilities likewise into a view of a wider buffer (probs_out), in its columns only."""
    q, k, v, q_pos, kv_pos, moments = random_step(**shape)
    B, Hkv, S, D = k.shape
    g = torch.Generator().manual_seed(shape["seed"] + 1)
    k_new, v_new = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    slot = torch.randint(0, S, (B, Hkv), generator=g)
    wide = torch.full((B, Hkv, S + 5 if strided else S), -7, dtype=torch.long)
    pos = wide[..., :S].copy_(kv_pos)
    ref = KVCache(B, Hkv, S, D, torch.float32, "cpu")
    ref.k.copy_(k), ref.v.copy_(v), ref.pos.copy_(kv_pos)
    ref.write(slot, k_new[:, :, 0], v_new[:, :, 0], q_pos)
    wide_probs = torch.full((B, q.shape[1], S + 3 if strided else S), float("nan"))
    out, probs, _ = fused.decode_attention(q, k, v, q_pos, pos, moments, want_probs=True, parts=parts, write=(k_new, v_new, slot),
                                           probs_out=wide_probs[..., :S])
    assert torch.equal(k, ref.k) and torch.equal(v, ref.v) and torch.equal(pos, ref.pos) and (wide[..., S:] == -7).all()
    assert probs.data_ptr() == wide_probs.data_ptr() and wide_probs[..., S:].isnan().all()
    ref_out, ref_probs, _, _ = nc_attention(q, ref.k, ref.v, q_pos[:, None], ref.pos, moments)
    close(out, ref_out, atol=1e-5)  # (as test_nc_attention_equals_torch)
    close(probs, ref_probs)
    if B * Hkv > 1:  # rows that share memory cannot take a write
        with pytest.raises(ValueError, match="evenly spaced"):
            fused.decode_attention(q, k, v, q_pos, kv_pos[:1, :1].expand(B, Hkv, S), write=(k_new, v_new, slot))


@given(shape=shapes, mi_weight=st.sampled_from([0.0, 1.0, 2.5]), parts=parts)
def test_momentkv_score_equals_torch(shape, mi_weight, parts):
    """The kernel's per-slot score: head_mean(p) + mi_weight head_mean(c), c MomentKV's MI cost as
    mi_cost_decode computes it from nc_attention's scores (policies/momentkv.py, MomentKV.score_step)."""
    q, k, v, _, _, moments = random_step(**shape)
    B, Hkv, S, D = k.shape
    g = torch.Generator().manual_seed(shape["seed"])
    kv_pos = torch.randint(-1, S, (B, Hkv, S), generator=g)  # at decode every held slot is visible
    kv_pos[..., 0] = 0
    q_pos = torch.full((B,), S)
    wide = torch.full((B, Hkv, S + 3), float("nan"))  # a smaller layer's view of the engine's step buffer
    out, _, score = fused.decode_attention(q, k, v, q_pos, kv_pos, moments, mi_weight=mi_weight, score_out=wide[..., :S],
                                           parts=parts)
    assert score.data_ptr() == wide.data_ptr() and wide[..., S:].isnan().all()  # written in place, in its columns only
    _, _, _, (logits, probs) = nc_attention(q, k, v, q_pos[:, None], kv_pos, moments)
    o = out.view(B, Hkv, -1, D)
    # ||v_i - o||^2 directly (as the kernel), not expanded as value_distances does for the torch path: the
    # expansion rounds to ~sqrt(D u)(|v| + |o|) where v ~ o, and the cost divides it by its mean over the slots
    d2 = (v.double().unsqueeze(2) - o.double().unsqueeze(3)).square().sum(-1).float()
    cost = mi_cost_decode(probs[..., :S], probs[..., S], logits[..., :S], logits[..., S], d2, moments[0], kv_pos >= 0)
    expected = probs[..., :S].mean(-2) + mi_weight * cost.mean(-2)
    close(score, expected, atol=2e-5, rtol=1e-4)


@given(L=st.integers(1, 3), B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 30), debias=st.booleans(),
       recent=st.booleans(), shared=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_momentum_scores_equal_torch(L, B, H, S, debias, recent, shared, seed):
    """shared: one attention row for all kv heads, an expanded view (momentum's mean over all heads)."""
    g = torch.Generator().manual_seed(seed)
    s, a = torch.rand(L, B, H, S, generator=g), torch.rand(L, B, H, S, generator=g)
    if shared:
        a = a[..., :1, :].expand(L, B, H, S)
    written = torch.randint(0, S, (L, B, H), generator=g)
    age = torch.where(torch.rand(L, B, H, S, generator=g) < 0.3, STATIONARY, torch.randint(1, 50, (L, B, H, S), generator=g).float())
    pos = torch.stack([torch.randperm(S, generator=g) for _ in range(L * B * H)]).view(L, B, H, S)
    pos = pos.masked_fill(torch.rand(L, B, H, S, generator=g) < 0.2, -1)
    window = torch.randint(0, S + 1, (B,), generator=g) if recent else None
    s1, age1 = s.clone(), age.clone()
    expected = momentum_update(s1, a, written, 0.97, True, age1 if debias else None)
    if recent:
        expected = expected.masked_fill(recent_mask(pos, window), 1e30)
    s2, age2 = s.clone(), age.clone()
    got = fused.momentum_scores(s2, a, written, 0.97, age2 if debias else None, pos, window, 1e30)
    close(s2, s1)
    assert torch.equal(age2, age1)
    close(got, expected)


@given(B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 12), D=st.sampled_from([4, 8, 16]),
       steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_absorb_slots_equals_torch(B, H, S, D, steps, seed):
    """The C pass and the torch code: the same moments after any sequence of evictions, empty slots
    (no change, exactly) among them, layers of different capacities."""
    L = 2
    g = torch.Generator().manual_seed(seed)
    c_kernel, c_torch = Correction(), Correction()
    for c in (c_kernel, c_torch):
        c.allocate(L, B, H, D, "cpu")
    for _ in range(steps):
        caps = (S, max(1, S - 3))
        keys = [torch.randn(B, H, cap, D, generator=g) * 3 + 1 for cap in caps]
        values = [torch.randn(B, H, cap, D, generator=g) for cap in caps]
        pos = torch.randint(-1, 50, (L, B, H, S), generator=g)
        slots = torch.stack([torch.randint(0, cap, (B, H), generator=g) for cap in caps])
        c_kernel.absorb_slots(slots, keys, values, pos)
        c_torch.absorb_slots(slots, keys, values, pos, kernel=False)
    assert torch.equal(c_kernel.n, c_torch.n)
    for a, b in zip((c_kernel.mu_k, c_kernel.mu_v, c_kernel.C), (c_torch.mu_k, c_torch.mu_v, c_torch.C)):
        close(a, b, atol=1e-5, rtol=1e-5)


@given(L=st.integers(1, 3), B=st.integers(1, 3), H=st.integers(1, 3), S=st.integers(1, 20), ties=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_choose_victim_equals_torch(L, B, H, S, ties, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (L, B, H, S), generator=g).float() if ties else torch.rand(L, B, H, S, generator=g)
    scores = scores.masked_fill(torch.rand(L, B, H, S, generator=g) < 0.1, float("inf"))
    pos = torch.stack([torch.randperm(2 * S, generator=g)[:S] for _ in range(L * B * H)]).view(L, B, H, S)
    pos = pos.masked_fill(torch.rand(L, B, H, S, generator=g) < 0.3, -1)
    pool_from = torch.randint(0, S, (B,), generator=g)
    budget = torch.randint(0, S + 1, (B,), generator=g)
    expected = choose_victim(scores, pos, pos >= pool_from[:, None, None], budget)
    assert torch.equal(fused.choose_victim(scores, pos, pool_from, budget), expected)


@given(L=st.integers(1, 3), B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 20), D=st.sampled_from([4, 8]),
       debias=st.booleans(), recent=st.booleans(), moments=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_momentum_step_end_equals_its_steps(L, B, H, S, D, debias, recent, moments, seed):
    """MomentKV's one-pass step end against momentum_scores, choose_victim, absorb_slots and the
    freeing in sequence: the same victims and positions exactly (the same float operations), the
    same state; layers of different capacities (a smaller layer's tail is empty), empty slots, a pool
    that starts after the prompt and budgets under and over the pool."""
    g = torch.Generator().manual_seed(seed)
    caps = [max(1, S - 2 * i) for i in range(L)]
    s, a = torch.rand(L, B, H, S, generator=g), torch.rand(L, B, H, S, generator=g)
    age = torch.where(torch.rand(L, B, H, S, generator=g) < 0.3, STATIONARY, torch.randint(1, 50, (L, B, H, S), generator=g).float())
    pos = torch.stack([torch.randperm(2 * S, generator=g)[:S] for _ in range(L * B * H)]).view(L, B, H, S)
    pos = pos.masked_fill(torch.rand(L, B, H, S, generator=g) < 0.2, -1)
    for i, cap in enumerate(caps):
        pos[i, ..., cap:] = -1
    written = torch.stack([torch.randint(0, cap, (B, H), generator=g) for cap in caps])
    window = torch.randint(0, S + 1, (B,), generator=g) if recent else None
    pool_from, budget = torch.randint(0, S, (B,), generator=g), torch.randint(0, S + 1, (B,), generator=g)
    keys = [torch.randn(B, H, cap, D, generator=g) for cap in caps]
    values = [torch.randn(B, H, cap, D, generator=g) for cap in caps]
    corrections = [Correction(), Correction()]
    for c in corrections:
        c.allocate(L, B, H, D, "cpu")
        c.absorb_slots(torch.zeros(L, B, H, dtype=torch.long), keys, values, pos, kernel=False)  # some rows start non-empty

    s1, age1, pos1, c1 = s.clone(), age.clone(), pos.clone(), corrections[0]
    rank = fused.momentum_scores(s1, a, written, 0.97, age1 if debias else None, pos1, window, 1e30)
    victim = fused.choose_victim(rank, pos1, pool_from, budget)
    if moments:
        c1.absorb_slots(victim, keys, values, pos1)
    pos1.scatter_(-1, victim.unsqueeze(-1), -1)

    s2, age2, pos2, c2, slot = s.clone(), age.clone(), pos.clone(), corrections[1], written.clone()
    assert fused.momentum_step_end(s2, a, age2 if debias else None, pos2, window, 0.97, 1e30, pool_from, budget, slot,
                                   keys, values, (c2.n, c2.mu_k, c2.mu_v, c2.C) if moments else None)
    assert torch.equal(slot, victim) and torch.equal(pos2, pos1)
    assert torch.equal(s2, s1) and torch.equal(age2, age1)
    for x, y in zip((c1.n, c1.mu_k, c1.mu_v, c1.C), (c2.n, c2.mu_k, c2.mu_v, c2.C)):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def tiny():
    return tiny_pair(layers=2, seed=5)[1]


@pytest.mark.parametrize("spec, options", [("full", {}), ("h2o", {"budget": 24}), ("tova", {"budget": 24}),
                                           ("momentkv", {"budget": 24}), ("momentkv", {"budget": 24, "options": {"base": "keys"}}),
                                           ("snapkv+momentum", {"budget": 34, "decode_budget": 8}),
                                           ("h2o", {"budget": 24, "correction": "nc"}),
                                           ("pyramidkv+momentkv", {"budget": 24, "decode_budget": 8, "options": {"pyramidkv.window": 4}}),
                                           ("pyramidkv+momentum", {"budget": 24, "decode_budget": 8, "options": {"pyramidkv.window": 4}}),
                                           ("snapkv+momentum", {"budget": 34, "decode_budget": 8, "one_prompt": True})])
def test_engine_fused_equals_reference(tiny, spec, options):
    """The engine with the kernels (default on a CPU) against the torch path: the same tokens over
    a generation that evicts at every step, and logits to float rounding. one_prompt: both rows hold
    one prompt, so the eager engine attends to its frozen slots once for both (shared_slots), on the
    torch path, whose probabilities then go where the kernel would have written them."""
    options = dict(options)
    prompts = prompts_of([40, 33], seed=7)
    if options.pop("one_prompt", False):
        prompts = [prompts[0], prompts[0]]
    fast = Engine(tiny, make_plan(spec, **options))
    ref = Engine(tiny, make_plan(spec, **options), decode_backend="reference")
    assert fast.decode_backend == "fused"
    if spec.startswith("pyramidkv"):  # per-layer budgets: a smaller layer's positions and scores are strided views
        fast.setup(2, [max(fast.plan.capacity(n, 30, i, 2) for n in (40, 33)) for i in range(2)])
        assert len({c.capacity for c in fast.caches}) == 2
    assert fast.generate(prompts, 30) == ref.generate(prompts, 30)
    assert (min(fast.shared_slots) > 0) == (prompts[0] == prompts[1])
    with torch.inference_mode():
        step = torch.tensor([[5], [6]]), torch.tensor([[80], [80]])
        close(fast.decode_step(*step), ref.decode_step(*step), atol=1e-4, rtol=1e-4)
    assert torch.equal(fast.pos, ref.pos)  # the same victims
    state = dict(fast.plan.decode.named_buffers())  # the scores the step's attention went into, so equal attention
    for name, buffer in ref.plan.decode.named_buffers():
        if name in ("scores", "age"):
            close(state[name], buffer, atol=1e-5, rtol=1e-4)


def run_python(code: str, **env):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    return done


def test_disabled_or_unbuildable_falls_back_to_torch(tmp_path):
    """TINYENGINE_FUSED=0, or no working C compiler: the engine decodes with the reference path
    (with a warning naming why, when the build fails)."""
    code = ("import torch; from tinyengine import fused; from tinyengine.engine import default_backends; "
            "print(fused.available(), default_backends(torch.device('cpu'))[1])")
    assert run_python(code, TINYENGINE_FUSED="0").stdout.split() == ["False", "reference"]
    broken = run_python(code, CC="false", TINYENGINE_CACHE=str(tmp_path))
    assert broken.stdout.split() == ["False", "reference"]
    assert "fused CPU decode kernels are unavailable" in broken.stderr and "false failed" in broken.stderr


def test_fused_backend_refuses_what_it_cannot_run(tiny):
    """bf16 (or a GPU): the torch path; asked for explicitly, a clear error."""
    from tinyengine.errors import TinyEngineError

    assert Engine(tiny, compile=True).decode_backend == "fused"  # compiled: as operators (tests/test_engine.py)
    model = tiny_pair(layers=1, seed=5)[1].to(torch.bfloat16)
    assert Engine(model).decode_backend == "reference"  # bf16 on a CPU: the default falls back
    with pytest.raises(TinyEngineError, match="float32 on the CPU"):
        Engine(model, decode_backend="fused")
