"""Moment-KV momentum (policies/momentum.py): the recursion, Algorithm 1's evictions, the engine."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from policies import make_plan
from policies.base import choose_victim
from policies.momentum import Momentum
from tinyengine.engine import Engine

from test_engine import prompts_of, tiny_pair


@pytest.fixture(scope="module")
def model():
    return tiny_pair()[1]


@given(seed=st.integers(0, 10**6), budget=st.integers(1, 6), beta=st.floats(0.0, 0.99),
       one_minus_beta=st.booleans(), steps=st.integers(1, 14))
def test_policy_follows_algorithm1(seed, budget, beta, one_minus_beta, steps):
    """Random attention sequences through the policy and choose_victim against Algorithm 1 written
    with a Python dict (one kv head, a frozen prompt of P tokens): same scores, same evictions."""
    g = torch.Generator().manual_seed(seed)
    P, S, Hq = 3, 3 + budget + 1, 4  # capacity: prompt + budget + 1 spare, as CachePlan.capacity
    policy = Momentum()
    policy.beta, policy.one_minus_beta = beta, one_minus_beta
    policy.allocate(1, 1, 1, S, "cpu")
    policy.on_prefill(0, None, P)
    pos = torch.full((1, 1, S), -1)
    pos[..., :P] = torch.arange(P)
    nxt = torch.tensor([[P]])
    s = {}  # Algorithm 1's importance per generated position
    for t in range(steps):
        new = P + t
        pos.scatter_(2, nxt.unsqueeze(-1), new)
        probs = torch.softmax((torch.randn(1, Hq, S, generator=g) * 3).masked_fill((pos < 0).expand(1, Hq, S), float("-inf")), -1)
        scores = policy.decode_scores(0, probs, pos, nxt)
        victim = choose_victim(scores, pos, pos >= P, torch.tensor([budget]))
        s[new] = 0.0  # Eq. 6: enters at 0 and gets this step's update before the check
        for j, p in enumerate(pos[0, 0].tolist()):
            if p >= P:
                a = sum(probs[0, h, j].item() for h in range(Hq)) / Hq  # Eq. 4
                s[p] = beta * s[p] + ((1 - beta) if one_minus_beta else 1.0) * a  # Eq. 5
                assert scores[0, 0, j].item() == pytest.approx(s[p], rel=1e-5, abs=1e-7)
        lowest = min(s, key=s.get) if len(s) > budget else None  # Eq. 7-9
        gone = pos[0, 0, victim[0, 0]].item()
        assert (gone if gone >= 0 else None) == lowest
        if lowest is not None:
            del s[lowest]
        pos.scatter_(2, victim.unsqueeze(-1), -1)
        nxt = victim


@given(seed=st.integers(0, 10**6), beta=st.floats(0.0, 0.99), per_kv_head=st.booleans())
def test_recursion_and_head_averages(seed, beta, per_kv_head):
    """s <- beta s + (1 - beta) a with a the mean over all heads (or over each GQA group); the
    written slot restarts at 0; the appendix variant is the same scores times 1/(1 - beta)."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G, S = 2, 2, 3, 6
    main, appendix = Momentum(), Momentum()
    appendix.one_minus_beta = False
    for p in (main, appendix):
        p.beta, p.per_kv_head = beta, per_kv_head
        p.allocate(1, B, Hkv, S, "cpu")
    ref = torch.zeros(B, Hkv, S, dtype=torch.float64)
    pos = torch.arange(S).expand(B, Hkv, S)
    for _ in range(8):
        probs = torch.rand(B, Hkv * G, S, generator=g)
        written = torch.randint(0, S, (B, Hkv), generator=g)
        for b in range(B):
            for h in range(Hkv):
                ref[b, h, written[b, h]] = 0.0
                heads = range(h * G, (h + 1) * G) if per_kv_head else range(Hkv * G)
                for j in range(S):
                    a = sum(probs[b, i, j].item() for i in heads) / len(heads)
                    ref[b, h, j] = beta * ref[b, h, j] + (1 - beta) * a
        got = main.decode_scores(0, probs, pos, written)
        undamped = appendix.decode_scores(0, probs, pos, written)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(undamped * (1 - beta), got, rtol=1e-4, atol=1e-7)


@given(seed=st.integers(0, 10**6), beta=st.floats(0.0, 0.99))
def test_debiased_scores_estimate_mean_attention(seed, beta):
    """debias=True: s / (1 - beta^age); a token attended with a constant a scores exactly a from its
    first step, and the raw recursion underneath is unchanged."""
    g = torch.Generator().manual_seed(seed)
    S = 5
    plain, debiased = Momentum(), Momentum()
    debiased.debias = True
    for p in (plain, debiased):
        p.beta = beta
        p.allocate(1, 1, 1, S, "cpu")
        p.on_prefill(0, None, 0)
    pos = torch.arange(S).view(1, 1, S)
    a = torch.rand(1, 1, S, generator=g)
    ages = torch.full((S,), 1e6, dtype=torch.float64)  # what prefill left is stationary
    for t in range(7):
        written = torch.tensor([[t % S]])
        ages[t % S] = 0
        ages += 1
        raw = plain.decode_scores(0, a, pos, written).clone()
        got = debiased.decode_scores(0, a, pos, written)
        torch.testing.assert_close(debiased.scores[0], raw)
        torch.testing.assert_close(got, raw / (1 - beta ** ages.view(1, 1, S)).float())
        seen = slice(0, min(t + 1, S))  # written slots: constant attention a scores exactly a
        torch.testing.assert_close(got[..., seen], a[..., seen], rtol=1e-4, atol=1e-6)


@given(seed=st.integers(0, 10**6), budget=st.integers(1, 5))
def test_new_token_evicted_only_when_lowest(seed, budget):
    g = torch.Generator().manual_seed(seed)
    S, Hq = budget + 2, 2
    policy = Momentum()
    policy.allocate(1, 1, 1, S, "cpu")
    pos = torch.full((1, 1, S), -1)
    nxt = torch.tensor([[0]])
    for t in range(12):
        pos.scatter_(2, nxt.unsqueeze(-1), t)
        probs = torch.softmax((torch.randn(1, Hq, S, generator=g) * 4).masked_fill((pos < 0).expand(1, Hq, S), float("-inf")), -1)
        scores = policy.decode_scores(0, probs, pos, nxt)
        victim = choose_victim(scores, pos, pos >= 0, torch.tensor([budget]))
        pool = pos[0, 0] >= 0
        others = pool.clone()
        others[nxt[0, 0]] = False
        new_is_lowest = bool((scores[0, 0, nxt[0, 0]] < scores[0, 0][others]).all())  # ties go to the oldest
        full = pool.sum() > budget
        assert (victim[0, 0] == nxt[0, 0]).item() == bool(full and new_is_lowest)
        pos.scatter_(2, victim.unsqueeze(-1), -1)
        nxt = victim


def test_prompt_frozen_and_decode_pool_within_budget(model):
    prompts = prompts_of([40, 17])
    e = Engine(model, make_plan("momentum", decode_budget=6))
    out = e.generate(prompts, 30)
    assert all(len(o) == 30 for o in out)
    for cache in e.caches:
        for b, n in enumerate((40, 17)):
            for h in range(cache.pos.shape[1]):
                held = set(cache.pos[b, h][cache.pos[b, h] >= 0].tolist())
                assert set(range(n)) <= held  # every prompt token is still there
                assert len(held - set(range(n))) <= 6


def test_budget_covering_the_generation_equals_full(model):
    prompts = prompts_of([12, 30])
    assert Engine(model, make_plan("momentum", decode_budget=40)).generate(prompts, 25) == Engine(model).generate(prompts, 25)


def test_options_and_errors():
    plan = make_plan("moment-kv", decode_budget=8, options={"beta": "0.5", "one_minus_beta": "false", "per_kv_head": "1"})
    assert (plan.decode.beta, plan.decode.one_minus_beta, plan.decode.per_kv_head) == (0.5, False, True)
    with pytest.raises(ValueError, match="beta"):
        make_plan("momentum", decode_budget=8, options={"beta": "1.0"})
    with pytest.raises(ValueError, match="decode-budget"):
        make_plan("momentum", budget=8)
    with pytest.raises(ValueError, match="boolean"):
        make_plan("momentum", decode_budget=8, options={"per_kv_head": "maybe"})
