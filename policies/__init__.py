"""KV-cache policies by name, and the `prefill+decode` composition rules.

    full                 keep everything
    h2o                  one name that defines prefill and decode: unified, `--budget` in total
    snapkv               prefill only: compresses the prompt; generated tokens are kept
    momentum             decode only: the prompt is frozen; generated tokens within --decode-budget
    snapkv+momentum      prefill part + decode part: prompt to --budget, generated within --decode-budget
    scope                one name with separate pools (`separate_pools = True`): built as the composed
                         plan scope+scope, prompt to --budget or --ratio (none: the whole prompt is kept),
                         generated within --decode-budget (default: the policy's default_decode_budget)

Budgets are checked against what each policy structurally needs (`check_budget` for --budget,
`check_decode_budget` for --decode-budget: e.g. streamingllm needs n_sink + 1, snapkv its window
+ 1, h2o one heavy hitter and one recent token), and options after --policy-arg by `check_options`.
"""
from __future__ import annotations

from policies.base import CachePlan, Policy


def describe() -> str:
    width = max(map(len, POLICIES))
    lines = []
    for name, cls in POLICIES.items():
        parts = [k for k, on in (("prefill", cls.has_prefill), ("decode", cls.has_decode)) if on]
        alias = [a for a, n in ALIASES.items() if n == name]
        lines.append(f"{name:<{width}}  [{'+'.join(parts)}] {cls.description}" + (f" (alias: {', '.join(alias)})" if alias else ""))
    return "\n".join(lines)


def _lookup(name: str) -> type[Policy]:
    name = ALIASES.get(name, name)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(sorted(POLICIES))} (see --list-policies)")
    return POLICIES[name]


def make_plan(spec: str = "full", budget: int | None = None, ratio: float | None = None,
              decode_budget: int | None = None, options: dict | None = None,
              correction: str | None = None) -> CachePlan:
    """Build a CachePlan from `name` or `prefill+decode`. Raises ValueError with a one-line fix.

    correction: "nc" attaches MomentKV's normalization correction (policies/correction.py) to
    any evicting plan; "none" turns it off (momentkv then runs MI alone); None is the policies'
    default (NC for momentkv). Option count_moments_in_budget=1 charges the moments' memory to
    the budget (the engine converts it to slots, CachePlan.reserve). Option prefill_only=1 runs
    a unified policy's prefill part alone: the prompt is compressed and the generated tokens are
    all kept, as kvpress's presses do (the parity rows of bench.py's fidelity suite).
    """
    if correction not in (None, "nc", "none"):
        raise ValueError(f"unknown correction {correction!r}; choose from: nc, none")
    options = dict(options or {})
    count = _convert(options.pop("count_moments_in_budget", False), False)
    prefill_only = _convert(options.pop("prefill_only", False), False)
    plan = _plan(spec, budget, ratio, decode_budget, options)
    if prefill_only:
        if not plan.compresses_prompt() or plan.decode is None:
            raise ValueError(f"prefill_only: {spec} is not a unified policy with a budget (it already keeps "
                             "every generated token, or has no prefill part); drop the option")
        plan = CachePlan(prefill=plan.prefill, budget=plan.budget, ratio=plan.ratio)
    policies = plan.policies()
    nc = correction == "nc" or (correction is None and any(getattr(p, "nc", False) for p in policies))
    moments = nc or any(p.needs_moments() for p in policies if hasattr(p, "needs_moments"))
    evicts = plan.compresses_prompt() or (plan.decode is not None and plan.pool_budget(1) < 2**62)
    if nc and not evicts:
        raise ValueError(f"--correction nc corrects for evicted tokens, but {spec} evicts none: "
                         "give it a budget or pick an evicting policy")
    if count and not moments:
        raise ValueError(f"count_moments_in_budget: {spec} keeps no moments (add --correction nc)")
    if moments:
        plan.correction = Correction(apply=nc, count_in_budget=count)
    return plan


def _convert(value, like):
    """An option value in the type of the default; "false", "0", "no", "off" are False."""
    if isinstance(like, bool) and isinstance(value, str):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"option value {value!r} is not a boolean; write true or false")
        return value.lower() in ("1", "true", "yes", "on")
    return type(like)(value)


def _plan(spec, budget, ratio, decode_budget, options) -> CachePlan:
    names = spec.split("+")
    if len(names) > 2 or not all(names):
        raise ValueError(f"policy {spec!r}: write one name or 'prefill+decode' (e.g. snapkv+momentum)")
    classes = [_lookup(n) for n in names]
    if budget is not None and ratio is not None:
        raise ValueError("give --budget or --ratio, not both")
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"--ratio must be in [0, 1) (got {ratio})")
    if decode_budget is not None and decode_budget < 1:
        raise ValueError(f"--decode-budget must be at least 1 (got {decode_budget})")

    options = dict(options or {})
    policies = [cls() for cls in classes]
    for key, value in options.items():
        target, _, name = key.rpartition(".")  # "pyramidkv.beta" sets one part's option
        # a policy's own options, not the base's fields
        owners = [p for p in policies if name in _options(p) and target in ("", p.name)]
        if not owners:
            known = sorted({k for p in policies for k in _options(p)})
            raise ValueError(f"unknown policy option {key!r} for {spec}; options: {', '.join(known) or 'none'}")
        if len({p.name for p in owners}) > 1:  # e.g. beta in pyramidkv+momentum: two meanings
            a, b = (p.name for p in owners)
            raise ValueError(f"option {name!r} belongs to both {a} and {b}: write {a}.{name}=... or {b}.{name}=...")
        for p in owners:
            setattr(p, name, _convert(value, getattr(p, name)))
    for p in policies:
        p.check_options()

    if len(policies) == 2:
        first, second = policies
        if not first.has_prefill:
            raise ValueError(f"{first.name} has no prefill part, so it cannot come first in {spec!r}")
        if not second.has_decode:
            raise ValueError(f"{spec!r} composes two prefill policies; the second must have a decode part (e.g. momentum)")
        if decode_budget is None:
            raise ValueError(f"{spec!r} needs --decode-budget (generated tokens kept per kv head)")
        if budget is None and ratio is None:
            raise ValueError(f"{spec!r} needs --budget or --ratio for its prefill part {first.name}")
        if budget is not None:
            first.check_budget(budget)
        second.check_decode_budget(decode_budget)
        return CachePlan(prefill=first, decode=second, budget=budget, ratio=ratio, decode_budget=decode_budget)

    (p,) = policies
    if p.name == "full":
        if budget is not None or ratio is not None or decode_budget is not None:
            raise ValueError("full keeps everything: drop --budget/--ratio/--decode-budget")
        return CachePlan(prefill=p, decode=p, unified=True)
    if p.separate_pools:  # one name, two pools: the composed plan p+p
        decode_budget = p.default_decode_budget if decode_budget is None else decode_budget
        if decode_budget is None:
            raise ValueError(f"{p.name} needs --decode-budget (generated tokens kept per kv head)")
        if budget is not None:
            p.check_budget(budget)
        p.check_decode_budget(decode_budget)
        return CachePlan(prefill=p, decode=p, budget=budget, ratio=ratio, decode_budget=decode_budget)
    if p.has_prefill and p.has_decode:
        if decode_budget is not None:
            raise ValueError(f"{p.name} is unified: --budget covers prompt and generated tokens; "
                             "--decode-budget is for decode-only or composed policies (e.g. snapkv+momentum)")
        if budget is None and ratio is None:
            raise ValueError(f"{p.name} needs --budget (or --ratio)")
        if budget is not None:
            p.check_budget(budget)
        return CachePlan(prefill=p, decode=p, budget=budget, ratio=ratio, unified=True)
    if p.has_prefill:
        if decode_budget is not None:
            raise ValueError(f"{p.name} has no decode part, so --decode-budget does not apply; compose it, e.g. {p.name}+momentum")
        if budget is None and ratio is None:
            raise ValueError(f"{p.name} needs --budget (or --ratio)")
        if budget is not None:
            p.check_budget(budget)
        return CachePlan(prefill=p, budget=budget, ratio=ratio)
    if budget is not None or ratio is not None:
        raise ValueError(f"{p.name} evicts only generated tokens (the prompt is frozen): use --decode-budget, "
                         f"or compose a prefill policy, e.g. snapkv+{p.name}")
    if decode_budget is None:
        raise ValueError(f"{p.name} needs --decode-budget")
    p.check_decode_budget(decode_budget)
    return CachePlan(decode=p, decode_budget=decode_budget)


def _options(p: Policy) -> list[str]:
    found = {}
    for klass in type(p).__mro__[:type(p).__mro__.index(Policy)]:  # inherited options too (scope: snapkv's)
        for k, v in vars(klass).items():
            found.setdefault(k, v)
    return [k for k, v in found.items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))
            and k not in ("name", "description", "has_prefill", "has_decode", "needs_probs", "needs_query", "aliases",
                          "separate_pools", "default_decode_budget", "scores_at_step_end")]


# The registry comes last: policy modules import tinyengine, whose __init__ imports make_plan
# from here, so make_plan must exist before they load (`import policies` first works too).
from policies.correction import Correction  # noqa: E402
from policies.h2o import H2O  # noqa: E402
from policies.keydiff import KeyDiff  # noqa: E402
from policies.knorm import KNorm  # noqa: E402
from policies.momentkv import MomentKV  # noqa: E402
from policies.momentum import Momentum  # noqa: E402
from policies.pyramidkv import PyramidKV  # noqa: E402
from policies.scope import Scope  # noqa: E402
from policies.snapkv import SnapKV  # noqa: E402
from policies.streamingllm import StreamingLLM  # noqa: E402
from policies.tova import TOVA  # noqa: E402

# A new policy: one file with a Policy subclass, plus its name in this tuple.
POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    Policy, StreamingLLM, H2O, TOVA, SnapKV, PyramidKV, KNorm, KeyDiff, Scope, Momentum, MomentKV)}
ALIASES: dict[str, str] = {alias: cls.name for cls in POLICIES.values() for alias in cls.aliases}
