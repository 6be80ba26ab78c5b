"""KV-cache policies by name, and the `prefill+decode` composition rules.

    full                 keep everything
    h2o                  one name that defines prefill and decode: unified, `--budget` in total
    snapkv               prefill only: compresses the prompt; generated tokens are kept
    momentum             decode only: the prompt is frozen; generated tokens within --decode-budget
    snapkv+momentum      prefill part + decode part: prompt to --budget, generated within --decode-budget
"""
from __future__ import annotations

from policies.base import CachePlan, Policy

# A new policy: one file with a Policy subclass, plus its name in this tuple.
POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (Policy,)}
ALIASES: dict[str, str] = {alias: cls.name for cls in POLICIES.values() for alias in cls.aliases}


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
              decode_budget: int | None = None, options: dict | None = None) -> CachePlan:
    """Build a CachePlan from `name` or `prefill+decode`. Raises ValueError with a one-line fix."""
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
        owners = [p for p in policies if hasattr(p, key) and not callable(getattr(p, key)) and not key.startswith("_")]
        if not owners:
            known = sorted({k for p in policies for k in _options(p)})
            raise ValueError(f"unknown policy option {key!r} for {spec}; options: {', '.join(known) or 'none'}")
        for p in owners:
            setattr(p, key, type(getattr(p, key))(value))

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
        second.check_budget(decode_budget)
        return CachePlan(prefill=first, decode=second, budget=budget, ratio=ratio, decode_budget=decode_budget)

    (p,) = policies
    if p.name == "full":
        if budget is not None or ratio is not None or decode_budget is not None:
            raise ValueError("full keeps everything: drop --budget/--ratio/--decode-budget")
        return CachePlan(prefill=p, decode=p, unified=True)
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
    p.check_budget(decode_budget)
    return CachePlan(decode=p, decode_budget=decode_budget)


def _options(p: Policy) -> list[str]:
    return [k for k, v in vars(type(p)).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))
            and k not in ("name", "description", "has_prefill", "has_decode", "needs_probs", "aliases")]
