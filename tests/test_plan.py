"""make_plan: the composition rules and the one-line errors for bad budgets, names and options."""
import pytest

from policies import POLICIES, _options, describe, make_plan

BASELINES = ("streamingllm", "h2o", "tova", "snapkv", "pyramidkv", "knorm", "keydiff", "scope")


@pytest.mark.parametrize("spec, kwargs, message", [
    ("nope", dict(budget=8), "unknown policy 'nope'; choose from:"),
    ("snapkv+knorm", dict(budget=64, decode_budget=8), "composes two prefill policies"),
    ("h2o", dict(budget=8, ratio=0.5), "not both"),
    ("knorm", dict(ratio=1.0), r"--ratio must be in \[0, 1\)"),
    ("knorm", dict(ratio=-0.1), r"--ratio must be in \[0, 1\)"),
    ("knorm", dict(budget=0), "budget must be at least 1"),
    ("streamingllm", dict(budget=4), "at least n_sink \\+ 1 = 5"),
    ("streamingllm", dict(budget=8, options=dict(n_sink=8)), "at least n_sink \\+ 1 = 9"),
    ("h2o", dict(budget=1), "h2o needs a budget of at least 2"),
    ("h2o", dict(budget=4, options=dict(recent_ratio=0.2)), "h2o needs a budget of at least 5"),
    ("h2o", dict(budget=8, options=dict(recent_ratio=1.0)), r"recent_ratio must be in \[0, 1\)"),
    ("snapkv", dict(budget=32), "at least window \\+ 1 = 33"),
    ("pyramidkv", dict(budget=8, options=dict(window=8)), "at least window \\+ 1 = 9"),
    ("snapkv", dict(budget=64, options=dict(kernel=4)), "kernel must be odd"),
    ("snapkv", dict(budget=64, options=dict(pooling="median")), "pooling must be max or avg"),
    ("pyramidkv", dict(budget=64, options=dict(beta=0)), "beta must be at least 1"),
    ("scope", dict(budget=64, decode_budget=256), "at least recent \\+ 1 = 257"),
    ("scope", dict(budget=16, decode_budget=300), "at least window \\+ 1 = 33"),
    ("snapkv+scope", dict(budget=64, decode_budget=8), "at least recent \\+ 1 = 257"),
    ("snapkv+h2o", dict(budget=64, decode_budget=1), "h2o needs a budget of at least 2"),
    ("h2o", dict(budget=64, decode_budget=8), "h2o is unified"),
    ("tova", {}, "tova needs --budget"),
    ("snapkv", {}, "snapkv needs --budget"),
    ("snapkv", dict(budget=64, decode_budget=8), "snapkv has no decode part"),
    ("snapkv+h2o", dict(budget=64), "needs --decode-budget"),
    ("snapkv+h2o", dict(decode_budget=8), "needs --budget or --ratio"),
    ("knorm", dict(budget=8, options=dict(window=4)), "unknown policy option 'window' for knorm"),
    ("scope", dict(budget=64, options=dict(beta=2)), "unknown policy option 'beta' for scope; options: kernel, pooling, recent, window"),
    ("full", dict(budget=8), "full keeps everything"),
    ("pyramidkv+momentum", dict(budget=64, decode_budget=8, options=dict(beta=2)),
     "option 'beta' belongs to both pyramidkv and momentum: write pyramidkv.beta=... or momentum.beta=..."),
    ("snapkv+h2o", dict(budget=64, decode_budget=8, options={"h2o.window": 4}), "unknown policy option 'h2o.window'"),
])
def test_bad_plans_raise_one_line(spec, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        make_plan(spec, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec, kwargs", [
    ("streamingllm", dict(budget=5)), ("h2o", dict(budget=2)), ("snapkv", dict(budget=33)),
    ("snapkv", dict(budget=5, options=dict(window=4))), ("scope", dict(budget=33, decode_budget=257)),
    ("h2o", dict(budget=1, options=dict(recent_ratio=0.0))),
])
def test_smallest_budgets_are_accepted(spec, kwargs):
    make_plan(spec, **kwargs)


def test_unified_prefill_only_and_composed_plans():
    h2o = make_plan("h2o", budget=64)
    assert h2o.unified and h2o.prefill is h2o.decode and h2o.name == "h2o"
    assert h2o.pool_budget(1000) == 64 and h2o.capacity(1000, 100) == 65
    snap = make_plan("snapkv", ratio=0.5)
    assert snap.decode is None and snap.prefill_keep(100) == 50 and snap.capacity(100, 10) == 60
    composed = make_plan("snapkv+h2o", budget=64, decode_budget=16)
    assert not composed.unified and composed.name == "snapkv+h2o" and composed.capacity(1000, 100) == 64 + 16 + 1


def test_scope_alone_is_a_composed_plan_with_separate_pools():
    plan = make_plan("scope", budget=64, decode_budget=300)
    assert plan.prefill is plan.decode and not plan.unified and plan.name == "scope"
    assert plan.pool_budget(1000) == 300 and plan.capacity(1000, 1000) == 64 + 300 + 1
    default = make_plan("scope", budget=64)
    assert default.decode_budget == POLICIES["scope"].default_decode_budget == 512
    whole = make_plan("scope", decode_budget=300)  # no --budget: the prompt is kept whole (SCOPE's main setting)
    assert not whole.compresses_prompt() and whole.prefill_keep(1000) == 1000 and whole.capacity(1000, 10) == 1000 + 10 + 1


def test_pyramidkv_budgets_per_layer_keep_the_total():
    plan = make_plan("pyramidkv", budget=64, options=dict(window=8))  # beta 20: 64/20 < 8, so uniform
    assert [plan.prefill_keep(1000, i, 4) for i in range(4)] == [64] * 4
    plan = make_plan("pyramidkv", budget=64, options=dict(window=8, beta=4))
    keeps = [plan.prefill_keep(1000, i, 4) for i in range(4)]
    assert keeps == [112, 80, 48, 16] and sum(keeps) == 4 * 64
    assert [plan.capacity(1000, 10, i, 4) for i in range(4)] == [k + 10 for k in keeps]
    assert plan.prefill_keep(30, 0, 4) == 30  # never more than the prompt


def test_a_qualified_option_sets_one_part():
    plan = make_plan("pyramidkv+momentum", budget=64, decode_budget=8,
                     options={"pyramidkv.beta": "4", "momentum.beta": "0.5", "window": "8"})
    assert plan.prefill.beta == 4 and plan.decode.beta == 0.5 and plan.prefill.window == 8


def test_options_are_typed_and_listed():
    plan = make_plan("snapkv", budget=64, options=dict(window="16", pooling="avg"))
    assert plan.prefill.window == 16 and plan.prefill.pooling == "avg"
    assert set(_options(POLICIES["scope"]())) == {"window", "kernel", "pooling", "recent"}


def test_every_baseline_is_listed_with_a_cited_docstring():
    text = describe()
    for name in BASELINES:
        assert name in POLICIES and name in text
        doc = __import__(POLICIES[name].__module__, fromlist=["_"]).__doc__
        assert doc and "et al." in doc, name
