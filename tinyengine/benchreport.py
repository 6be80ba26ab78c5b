"""BENCHMARKS.md and its plots, regenerated from the JSON results bench.py wrote (never typed by hand).

For each suite the newest result of the largest size present is used (large > default > quick >
smoke); each section names its command, machine, torch version and date. Plots go to docs/bench/.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

SIZE_RANK = {"large": 3, "default": 2, "quick": 1, "smoke": 0}
SUITES = ("fidelity", "ruler", "longgen", "speed", "flatcost", "memory", "attention", "tp")


def _read_all(folder: Path):
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("suite") in SUITES:
            yield dict(data, _file=path.name)


def _seed(d: dict) -> int:
    return (d.get("config") or {}).get("seed", 0)


def load_results(folder: Path) -> dict:
    """suite -> the chosen result (dict), from every *.json in `folder`: the largest size, then the
    default seed (0: the commands this file names), then the newest."""
    best = {}
    for data in _read_all(folder):
        key = (SIZE_RANK.get(data.get("size"), -1), _seed(data) == 0, data.get("date", ""))
        if data["suite"] not in best or key > best[data["suite"]][0]:
            best[data["suite"]] = (key, data)
    return {s: d for s, (_, d) in best.items()}


SAME_RUN = ("policies", "ratios", "kvpress", "question_aware", "budgets")  # config keys that make runs comparable


def other_seeds(folder: Path, chosen: dict) -> list:
    """The newest run per other seed of the chosen result's suite, size and rows (config but the seed)."""
    same = lambda d: d["suite"] == chosen["suite"] and d.get("size") == chosen.get("size") and all(  # noqa: E731
        (d.get("config") or {}).get(k) == (chosen.get("config") or {}).get(k) for k in SAME_RUN)
    newest = {}
    for d in _read_all(folder):
        if same(d) and _seed(d) != _seed(chosen) and d.get("date", "") > newest.get(_seed(d), {}).get("date", ""):
            newest[_seed(d)] = d
    return [newest[k] for k in sorted(newest)]


# ----------------------------------------------------------------------------- formatting


def f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        if x != 0 and abs(x) < 10 ** -(digits - 1):
            return f"{x:.1e}"
        return f"{x:.{digits}f}"
    return str(x)


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def provenance(d: dict) -> str:
    m = d.get("machine", {})
    size = "" if d.get("size") == "default" else f" · size **{d.get('size')}** (not the default run)"
    return (f"`{d.get('command')}` · {m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('threads', '?')} torch threads)"
            + (f", {m['gpu']}" if m.get("gpu") else "") + f" · torch {m.get('torch')}, transformers {m.get('transformers')}, "
            f"kvpress {m.get('kvpress')} · {d.get('date')} · {d.get('elapsed_s', 0) / 60:.1f} min · `{d.get('_file')}`{size}")


def notes(d: dict) -> str:
    n = d.get("notes") or []
    return "" if not n else "\n\nNotes from the run:\n" + "\n".join(f"- {x}" for x in n)


def bold_best(cells: list[str], values: list, higher: bool) -> list[str]:
    ok = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if len(set(ok)) < 2:  # nothing to single out
        return cells
    best = max(ok) if higher else min(ok)
    return [f"**{c}**" if v == best else c for c, v in zip(cells, values)]


def standing(by: dict, methods: list, ratios: list, metric: str, higher: bool) -> list:
    """Per column: (column, (value, momentkv's best row: any of its variants), (value, the best other
    method's, ours or kvpress's), verdict), where both exist (issue 6 asks momentkv to lead every row)."""
    ours = [m for m in methods if m.split("{")[0] == "momentkv"]
    others = [m for m in methods if m not in ours and not m.startswith("full")]

    def best(ms, r):
        got = [(by[(m, r)][metric], m) for m in ms if (m, r) in by and not math.isnan(by[(m, r)][metric])]
        return (max if higher else min)(got, key=lambda x: x[0]) if got else None

    out = []
    for r in ratios:
        a, b = best(ours, r), best(others, r)
        if a and b:
            out.append((r, a, b, "tied" if a[0] == b[0] else "leads" if (a[0] > b[0]) == higher else "behind"))
    return out


def samples_of(row: dict, metric: str):
    """The (roughly) independent samples behind a row's `metric`, or None: the fidelity suite's block
    means (each the mean over NOISE_BLOCK consecutive positions of one passage, bench.block_means,
    so the correlation between neighbouring tokens stays inside a block) or RULER's answers (one
    score per sample, for "score"). Runs made before bench.py stored them have neither."""
    if metric in row.get("blocks", {}):
        return row["blocks"][metric]
    return row.get("answers") if metric == "score" else None


def paired_noise(a: dict, b: dict, metric: str):
    """The standard error of row a's `metric` minus row b's on the same samples (samples_of), or None;
    SE = sd(per-sample differences) / sqrt(samples)."""
    xa, xb = samples_of(a, metric), samples_of(b, metric)
    if not xa or not xb or len(xa) != len(xb) or len(xa) < 2:
        return None
    d = [p - q for p, q in zip(xa, xb)]
    mean = sum(d) / len(d)
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def z_score(diff: float, se: float) -> float:
    """|diff| in standard errors, rounded to the one decimal the report shows (and judges by)."""
    return round(abs(diff) / se, 1) if se > 0 else (0.0 if diff == 0 else math.inf)


def noise_note(by: dict, a: tuple, b: tuple, r, metric: str, fmt) -> tuple:
    """(' (difference ± SE, z SE)' for a standing line, whether the difference is within 2 SE), or
    ('', None) where the rows carry no samples to pair (samples_of)."""
    se = paired_noise(by[(a[1], r)], by[(b[1], r)], metric) if (a[1], r) in by and (b[1], r) in by else None
    if se is None:
        return "", None
    z = z_score(a[0] - b[0], se)
    return f" (by {fmt(abs(a[0] - b[0]))} ± {fmt(se)} SE, {z:.1f} SE{': within noise' if z < 2 else ''})", z < 2


def momentkv_standing(by: dict, methods: list, ratios: list, metric: str, higher: bool, fmt, what: str,
                      column: str = "ratio") -> str:
    """`standing` as a line read off a table, with the difference's standard error where the rows
    carry their samples (a difference within 2 SE is noise, whatever the verdict says)."""
    parts = [f"{column} {r}: {a[1]} {fmt(a[0])} against {b[1]} {fmt(b[0])}, {verdict}"
             + (noise_note(by, a, b, r, metric, fmt)[0] if verdict != "tied" else "")
             for r, a, b, verdict in standing(by, methods, ratios, metric, higher)]
    return f"MomentKV's best row against the best other method ({what}): " + "; ".join(parts) + "." if parts else ""


def label(row: dict) -> str:
    return f"{row['method']} (kvpress)" if row.get("source") == "kvpress" else row["method"]


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(path: Path, series: dict, xlabel: str, ylabel: str, title: str, logy=False, logx=False) -> str:
    """series: label -> (xs, ys, dashed). Returns the markdown image line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    palette = plt.get_cmap("tab20").colors
    bases = list(dict.fromkeys(name.split(" (")[0] for name in series))  # one color per method, ours and kvpress's
    for name, (xs, ys, dashed) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and not (isinstance(y, float) and math.isnan(y)) and (y > 0 or not logy)]
        if pts:
            color = palette[bases.index(name.split(" (")[0]) % len(palette)]
            ax.plot(*zip(*pts), marker="s" if dashed else "o", ms=4, ls="--" if dashed else "-", color=color, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"![{title}]({path.as_posix()})"


# ----------------------------------------------------------------------------- sections


def fidelity_rows(d: dict):
    """(ratios, methods in table order, (method, ratio) -> row) of a fidelity run."""
    rows = [r for r in d["rows"] if r.get("table") == "fidelity"]
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    methods = list(dict.fromkeys(label(r) for r in rows if r["ratio"] is not None))
    return ratios, methods, {(label(r), r["ratio"]): r for r in rows}


def section_fidelity(d: dict, img: Path, root: Path, seeds: list = ()) -> str:
    ratios, methods, by = fidelity_rows(d)
    blocks = next((r["blocks"]["kl"] for r in by.values() if r.get("blocks")), None)
    block = round(d["config"].get("fid_n", 1) * d["config"].get("fid_cont", 0) / len(blocks)) if blocks else 0
    out = ["### Fidelity: teacher-forced on prose, against the full cache", "",
           provenance(d), "",
           f"Context {d['config'].get('fid_ctx')} tokens compressed at prefill, then {d['config'].get('fid_cont')} reference "
           f"tokens fed through decode steps; {d['config'].get('fid_n')} passages of Python's documentation "
           "(`pydoc_data.topics`). KL(full ‖ policy) of the next-token distribution averaged over positions "
           "(lower is better), top-1 agreement with full, NLL of the reference text (full's is the floor). "
           "kvpress rows: the same token ids through kvpress's presses on transformers (its pipeline's prefill "
           "compression, then the continuation on its cache), KL against transformers' own full cache. "
           "Parity: kvpress's presses, and our prefill-only policies (snapkv, pyramidkv, knorm, keydiff), compress the "
           "prompt and keep every generated token; our unified ones (h2o, tova, streamingllm, momentkv) hold the budget "
           "in total while the reference tokens are fed, so they keep fewer tokens by the end; `{prefill_only=1}` rows "
           "run a unified policy's prefill part alone, at kvpress's parity. Best per column in bold."
           + (" Noise: a difference between two rows is given with its standard error, paired over the same tokens and "
              f"estimated from blocks of {block} consecutive positions of a passage (batch means, since neighbouring "
              "tokens' errors are correlated); within 2 SE it is noise, whichever row is ahead." if blocks else ""), ""]
    for metric, name, higher, fmt in FIDELITY_METRICS:
        header = ["method"] + [f"ratio {r} (keep {1 - r:.1%})" for r in ratios]
        cells = {m: [fmt(by[(m, r)][metric]) if (m, r) in by else "–" for r in ratios] for m in methods}
        for j, r in enumerate(ratios):  # bold the best per column
            vals = [by[(m, r)][metric] if (m, r) in by else None for m in methods]
            col = bold_best([cells[m][j] for m in methods], vals, higher)
            for m, c in zip(methods, col):
                cells[m][j] = c
        out += [f"**{name}**" + (f" (full: {fmt(by[('full', None)][metric])})" if ("full", None) in by else ""), "",
                table(header, [[m] + cells[m] for m in methods]), ""]
        line = momentkv_standing(by, methods, ratios, metric, higher, fmt, name)
        out += [line, ""] if line else []
    check = [r for r in d["rows"] if r.get("table") == "check"]
    out += fidelity_parity(by, ratios, rounding=check[0]["kl"] if check else 0.0)
    if check:
        out.append(f"Check: transformers' full cache against ours, KL {f(check[0]['kl'])}, top-1 {pct(check[0]['top1'])}.")
        out.append("")
    series = {}
    for m in methods:
        pts = sorted((by[(m, r)]["kept"], by[(m, r)]["kl"]) for r in ratios if (m, r) in by)
        series[m] = ([p[0] for p in pts], [p[1] for p in pts], "(kvpress)" in m)
    out.append(plot_lines(img / "fidelity_kl.png", series, "fraction of the prompt kept", "KL(full || policy)",
                          "Fidelity: KL to full vs budget (kvpress dashed)", logy=True))
    if seeds:
        out += ["", section_seeds(d, seeds, fidelity_rows, FIDELITY_METRICS, "passages")]
    out.append(section_ablation(d, img))
    return "\n".join(out) + notes(d)


FIDELITY_METRICS = (("kl", "KL to full", False, f), ("top1", "top-1 agreement", True, pct), ("nll", "NLL", False, f))
RULER_METRICS = (("score", "score", True, pct),)
LONGGEN_METRICS = (("kl", "KL", False, f), ("score", "score", True, pct))


def section_seeds(d: dict, others: list, rows_of, metrics: tuple, samples: str, column: str = "ratio") -> str:
    """A quality table's rows on other seeds (other samples, the same command with --seed): which
    standings hold. The first metric per method as seed a / seed b / ... and pooled (the seeds' mean),
    momentkv's standing pooled and per seed, and a count over every seed and ratio."""
    runs = [d] + list(others)
    seeds = [_seed(r) for r in runs]
    tables = [rows_of(r) for r in runs]
    ratios = tables[0][0]
    methods = [m for m in tables[0][1] if all((m, r) in t[2] for t in tables for r in ratios)]
    pooled = {(m, r): {k: sum(t[2][(m, r)][k] for t in tables) / len(tables) for k, *_ in metrics}
              for m in methods for r in ratios}
    for (m, r), row in pooled.items():  # the seeds' samples together (equal counts: their mean is the pooled value)
        blocks, answers = ([t[2][(m, r)].get(k) for t in tables] for k in ("blocks", "answers"))
        if all(blocks):
            row["blocks"] = {k: sum((b[k] for b in blocks), []) for k, *_ in metrics}
        if all(answers) and len({len(a) for a in answers}) == 1:
            row["answers"] = sum(answers, [])
    key, name0, _, fmt0 = metrics[0]
    out = ["#### Other seeds", "",
           f"The same rows on other {samples} (seed{'s' if len(seeds) > 2 else ''} {', '.join(map(str, seeds[1:]))}; "
           f"seed {seeds[0]} is the table "
           "above), to show which standings hold; pooled: the seeds' mean. Each run:", ""]
    out += [f"- seed {sd}: {provenance(r)}" for sd, r in zip(seeds[1:], runs[1:])]
    header = ["method"] + [f"{name0}, {column} {r}: seed {' / '.join(map(str, seeds))}" for r in ratios] + \
             [f"pooled, {column} {r}" for r in ratios]
    cells = [[m] + [" / ".join(fmt0(t[2][(m, r)][key]) for t in tables) for r in ratios]
             + [fmt0(pooled[(m, r)][key]) for r in ratios] for m in methods]
    out += ["", table(header, cells), ""]
    counts = []
    for metric, name, higher, fmt in metrics:
        cells = [(v, noise_note(by, a, b, r, metric, fmt)[1]) for rs, ms, by in tables
                 for r, a, b, v in standing(by, ms, rs, metric, higher)]
        count = f"{name} in {sum(v == 'leads' for v, _ in cells)} of {len(cells)}"
        if any(noisy is not None for _, noisy in cells):  # samples present: which differences are beyond noise
            beyond = lambda verdict: sum(v == verdict and noisy is False for v, noisy in cells)  # noqa: E731
            count += f" ({beyond('leads')} by more than 2 SE; behind by more than 2 SE in {beyond('behind')})"
        counts.append(count)
    out += [f"MomentKV's best row leads the best other method, over every seed and {column}: {', '.join(counts)}.", ""]
    for metric, name, higher, fmt in metrics:
        out.append(f"- {momentkv_standing(pooled, methods, ratios, metric, higher, fmt, f'{name}, pooled', column)}")
        for sd, (rs, ms, by) in zip(seeds, tables):
            line = momentkv_standing(by, ms, rs, metric, higher, fmt, f"{name}, seed {sd}", column)
            out += [f"- {line}"] if line else []
    return "\n".join(out)


def longgen_rows(d: dict):
    """(decode budgets, methods in table order, (method, decode budget) -> row) of a long-generation run."""
    rows = d["rows"]
    return (sorted({r["decode_budget"] for r in rows if r["decode_budget"] is not None}),
            list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full")),
            {(r["method"], r["decode_budget"]): r for r in rows})


def ruler_rows(d: dict):
    """(ratios, methods in table order, (method, ratio) -> row) of a RULER run."""
    rows = d["rows"]
    return (sorted({r["ratio"] for r in rows if r["ratio"] is not None}), list(dict.fromkeys(label(r) for r in rows)),
            {(label(r), r["ratio"]): r for r in rows})


def section_ablation(d: dict, img: Path) -> str:
    rows = [r for r in d["rows"] if r.get("table") == "ablation"]
    if not rows:
        return ""
    ratios = sorted({r["ratio"] for r in rows})
    variants = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["ratio"]): r for r in rows}
    out = ["", "### MomentKV ablation (issue 5, part C)", "",
           "Same samples and protocol as the fidelity table; `momentkv` with moment-informed eviction (MI) and "
           "normalization-corrected attention (NC) switched on and off, same base scorer (policies/momentkv.py, "
           "`ABLATION`). Attention-output relative error: ‖o − o_full‖ / ‖o_full‖ of each layer's attention block at "
           "every teacher-forced decode step (upstream errors included), averaged over steps, samples and layers; "
           "next-token KL as above.", ""]
    header = ["variant"] + [f"budget {1 - r:.1%}: rel. error" for r in ratios] + [f"budget {1 - r:.1%}: KL" for r in ratios]
    body = []
    for v in variants:
        body.append([v] + [f(by[(v, r)].get("rel_err")) if (v, r) in by else "–" for r in ratios]
                    + [f(by[(v, r)]["kl"]) if (v, r) in by else "–" for r in ratios])
    for j in range(1, len(header)):
        r = ratios[(j - 1) % len(ratios)]
        key = "rel_err" if j <= len(ratios) else "kl"
        vals = [by[(v, r)].get(key) if (v, r) in by else None for v in variants]
        col = bold_best([row[j] for row in body], vals, False)
        for row, c in zip(body, col):
            row[j] = c
    out += [table(header, body), ""]
    r_mid = ratios[len(ratios) // 2]
    series = {v: (list(range(len(by[(v, r_mid)]["rel_err_by_layer"]))), by[(v, r_mid)]["rel_err_by_layer"], False)
              for v in variants if (v, r_mid) in by and by[(v, r_mid)].get("rel_err_by_layer")}
    if series:
        out.append(plot_lines(img / "ablation_layers.png", series, "layer", "attention-output relative error",
                              f"MomentKV ablation: error per layer at budget {1 - r_mid:.1%}"))
    return "\n".join(out)


def section_ruler(d: dict, img: Path, seeds: list = ()) -> str:
    rows = d["rows"]
    ratios, methods, by = ruler_rows(d)
    lengths = sorted({int(L) for r in rows for L in r["by_length"]})
    tasks = list(dict.fromkeys(t for r in rows for t in r["by_task"]))
    setting = "question-aware (the question is compressed with the context)" if d["config"].get("question_aware") else \
        "query-agnostic: the context is compressed before the question is seen (kvpress's setting)"
    out = ["### RULER-style retrieval", "", provenance(d), "",
           f"Tasks {', '.join(tasks)} at {', '.join(map(str, lengths))} tokens, {d['config'].get('ruler_n')} seeded samples "
           f"per task and length; {setting}; then the question through decode steps and greedy answer. Score: RULER's "
           "string_match_all (fraction of the references in the answer), in %. Best per column in bold (full excluded)."
           + (" Noise: a difference between two rows is given with its standard error, paired over the same answers "
              "(each sample's score one observation); within 2 SE it is noise, whichever row is ahead."
              if any(r.get("answers") for r in rows) else ""), ""]
    header = ["method", "full cache"] + [f"ratio {r}" for r in ratios] + [f"ratio {r} @ {L}" for r in ratios[:1] for L in lengths]
    body, vals = [], []
    for m in methods:
        full = by.get((m, None))
        cells = [m, pct(full["score"]) if full else ""]
        v = [None, None]
        for r in ratios:
            x = by.get((m, r))
            cells.append(pct(x["score"]) if x else "–")
            v.append(x["score"] if x else None)
        for r in ratios[:1]:
            for L in lengths:
                x = by.get((m, r))
                s = x["by_length"].get(str(L)) if x else None
                cells.append(pct(s) if x else "–")
                v.append(s)
        body.append(cells)
        vals.append(v)
    for j in range(2, len(header)):
        col = bold_best([row[j] for row in body], [v[j] for v in vals], True)
        for row, c in zip(body, col):
            row[j] = c
    out += [table(header, body), ""]
    line = momentkv_standing(by, methods, ratios, "score", True, pct, "all lengths")
    out += [line, ""] if line else []
    out += ruler_parity(by, ratios, by.get(("full", None), {}).get("n"))
    th = ["method"] + [f"{t} @ ratio {ratios[0]}" for t in tasks] if ratios else []
    if ratios:
        out += ["Per task (all lengths):", "",
                table(th, [[m] + [pct(by[(m, ratios[0])]["by_task"].get(t)) if (m, ratios[0]) in by else "–" for t in tasks]
                           for m in methods if (m, ratios[0]) in by]), ""]
    series = {m: ([1 - r for r in ratios if (m, r) in by], [by[(m, r)]["score"] for r in ratios if (m, r) in by], "(kvpress)" in m)
              for m in methods if any((m, r) in by for r in ratios)}
    out.append(plot_lines(img / "ruler.png", series, "fraction of the prompt kept", "RULER score",
                          "RULER-style retrieval vs budget (kvpress dashed)"))
    if seeds:
        out += ["", section_seeds(d, seeds, ruler_rows, RULER_METRICS, "samples")]
    return "\n".join(out) + notes(d)


# Where our policy differs from kvpress's press of the same name on purpose (each policy's docstring says why).
BY_DESIGN = {"snapkv": "the paper's max pooling, window 32, kernel 7; kvpress's average pooling, window 64, kernel 5",
             "pyramidkv": "SnapKV's scoring as above",
             "tova": "ours is unified: it also evicts while the question and answer are decoded; kvpress compresses the prompt only"}


# The fidelity suite's reason for a difference: as RULER's, with the reference tokens in the question's place.
FIDELITY_BY_DESIGN = {**BY_DESIGN, **{m: "ours is unified: it also evicts while the reference tokens are fed; kvpress "
                                        "compresses the prompt only" for m in ("tova", "streamingllm", "h2o")},
                      "knorm": "ties: a repeated token's layer-0 keys have equal norms (RoPE keeps the norm) and the two "
                               "top-k's break such ties differently; tests/test_kvpress_equality.py allows only ties"}


# A same-method KL difference under this many times the two engines' full-cache KL is their rounding.
ROUNDING_FACTOR = 10


def fidelity_parity(by: dict, ratios: list, rounding: float = 0.0) -> list[str]:
    """Ours against kvpress for each method both have, on KL to full: the difference per ratio against its
    paired standard error (paired_noise); within 2 SE at every ratio is "within noise" (issue 6: our
    implementation of a method kvpress has must score within noise of kvpress's). `rounding` is the two
    engines' full caches' own KL (the check row): a difference under ROUNDING_FACTOR times it is the two
    engines' rounding, not the method's (the same kept set gives KLs equal to ~1e-7, with a paired SE as small)."""
    shared = sorted({m for (m, r) in by if r is not None and (f"{m} (kvpress)", r) in by})
    same, other = [], []
    for m in shared:
        cells = []
        for r in ratios:
            a, b = by.get((m, r)), by.get((f"{m} (kvpress)", r))
            if a and b:
                se = paired_noise(a, b, "kl")
                if se is None:
                    return []  # a run without block means: no noise to compare against
                cells.append((r, a["kl"] - b["kl"], se, z_score(a["kl"] - b["kl"], se)))
        far = [c for c in cells if c[3] >= 2 and abs(c[1]) >= ROUNDING_FACTOR * rounding]
        if not far:
            same.append(m)
        else:
            other.append(f"{m} at " + ", ".join(f"ratio {r} ({'+' if d > 0 else '-'}{f(abs(d))} ± {f(se)}, {z:.1f} SE)"
                                                for r, d, se, z in far) + f" ({FIDELITY_BY_DESIGN.get(m, 'not by design: investigate')})")
    if not shared:
        return []
    line = ("Same method, ours against kvpress's (KL to full, ours minus kvpress's, paired over the same tokens): within "
            f"2 SE at every ratio: {', '.join(same) or 'none'}"
            + (f" (a difference under {ROUNDING_FACTOR}x the full caches' own KL, {f(ROUNDING_FACTOR * rounding)}, "
               "counts as rounding)" if rounding else "")
            + ".")
    if other:
        line += " Beyond: " + "; ".join(other) + "."
    return [line, ""]


def ruler_parity(by: dict, ratios: list, n: int) -> list[str]:
    """Ours against kvpress for each method both have: equal at every ratio, within 2 paired SE of it
    (the rows' answers, paired_noise), or neither (and why)."""
    shared = sorted({m for (m, r) in by if r is not None and (f"{m} (kvpress)", r) in by})
    if not shared:
        return []
    pairs = {m: [(r, by[(m, r)], by[(f"{m} (kvpress)", r)]) for r in ratios if (m, r) in by and (f"{m} (kvpress)", r) in by]
             for m in shared}
    same = [m for m in shared if all(a["score"] == b["score"] for _, a, b in pairs[m])]
    close, other = [], []
    for m in shared:
        if m in same:
            continue
        cells = [(r, a["score"] - b["score"], paired_noise(a, b, "score")) for r, a, b in pairs[m]]
        if all(se is not None for *_, se in cells) and all(z_score(d, se) < 2 for _, d, se in cells):
            close.append(m)
        else:
            far = ", ".join(f"ratio {r} ({'+' if d > 0 else '-'}{100 * abs(d):.1f} points"
                            + (f" ± {100 * se:.1f}, {z_score(d, se):.1f} SE" if se is not None else "") + ")"
                            for r, d, se in cells if d != 0 and (se is None or z_score(d, se) >= 2))
            other.append(f"{m} at {far} ({BY_DESIGN.get(m, 'not by design: investigate')})")
    line = f"Same method, ours against kvpress's: equal at every ratio: {', '.join(same) or 'none'}."
    if close:
        line += f" Within 2 SE at every ratio (paired over the same answers): {', '.join(close)}."
    if other:
        line += " Different: " + "; ".join(other) + "."
    if n:
        line += f" Each score averages {n} answers, so one answer moves it by {100 / n:.1f} points."
    return [line, ""]


def longgen_findings(by: dict, methods: list, budgets: list) -> list[str]:
    """Sentences read off the table: the best policy per parity and budget, and momentum with and without debias."""
    out = []
    for parity in ("decode pool", "total capacity"):
        best = []
        for db in budgets:
            xs = [(by[(m, db)]["kl"], m) for m in methods if (m, db) in by and by[(m, db)]["parity"] == parity]
            if xs:
                best.append(f"{min(xs)[1]} at {db}")
        if best:
            out.append(f"Lowest KL with the {parity} parity: {', '.join(best)}.")
    if "momentum" in methods and "momentum{debias=1}" in methods:
        ratios = [f"{by[('momentum', db)]['kl'] / by[('momentum{debias=1}', db)]['kl']:.1f}x at {db}"
                  for db in budgets if ("momentum", db) in by and ("momentum{debias=1}", db) in by
                  and by[("momentum{debias=1}", db)]["kl"] > 0]
        out.append("Why momentum as written loses: with Eq. 5-6 a new token enters with s = 0 and gets (1 - beta) times its "
                   "self-attention, 1/33 of what an older token receiving the same attention holds at beta 0.97, so a fresh "
                   "token loses the argmin unless its attention is ~33x an older token's: the newest generated tokens, "
                   "which generation leans on, are the first to go. `debias=1` (not in the paper) ranks by s / (1 - beta^age), the bias "
                   f"correction of an EMA started at 0; its KL is lower by {', '.join(ratios)}. The decode-pool policies "
                   "also cannot give up prompt entries, which the unified ones at total capacity do.")
    return out + [""] if out else []


def section_longgen(d: dict, img: Path, seeds: list = ()) -> str:
    rows = d["rows"]
    full = next((r for r in rows if r["method"] == "full"), None)
    budgets, methods, by = longgen_rows(d)
    c = d["config"]
    unified = [m for m in methods if any(by.get((m, db), {}).get("parity") == "total capacity" for db in budgets)]
    out = ["### Long generation (LongGenBench-style)", "", provenance(d), "",
           f"One prompt with {c.get('lg_questions')} numbered sub-questions about a catalogue, answered in one greedy output of "
           f"{c.get('lg_tokens')} tokens (prompt {full['prompt_tokens'] if full else '?'} tokens; stop tokens banned so every "
           "run writes the same length). Score: per sub-question, the answer's section names the record's item and code "
           f"(full scores {pct(full['score']) if full else '–'}). KL(full ‖ policy) and top-1 agreement along full's own "
           "output (teacher-forced). Decode-only and separate-pool policies keep the prompt and hold the decode budget of "
           f"generated tokens; unified ones ({', '.join(unified)}) hold prompt + decode budget in total (parity as in the "
           "Moment-KV paper). Best per column in bold.", ""]
    header = ["policy", "parity"] + [f"KL @ {db}" for db in budgets] + [f"top-1 @ {db}" for db in budgets] + [f"score @ {db}" for db in budgets]
    body, vals = [], []
    for m in methods:
        parity = next((by[(m, db)]["parity"] for db in budgets if (m, db) in by), "")
        cells, v = [m, parity or ""], [None, None]
        for key, fmt in (("kl", f), ("top1", pct), ("score", pct)):
            for db in budgets:
                x = by.get((m, db))
                cells.append(fmt(x[key]) if x else "–")
                v.append(x[key] if x else None)
        body.append(cells)
        vals.append(v)
    for j in range(2, len(header)):
        higher = j >= 2 + len(budgets)
        col = bold_best([row[j] for row in body], [v[j] for v in vals], higher)
        for row, c2 in zip(body, col):
            row[j] = c2
    out += [table(header, body), ""]
    for key, name, higher, fmt in LONGGEN_METRICS:
        line = momentkv_standing(by, methods, budgets, key, higher, fmt, name, column="decode budget")
        above = [f"{b[1]} at {db}" for db, _, b, _ in standing(by, methods, budgets, key, higher) if full and b[0] > full[key]]
        if key == "score" and above and c.get("lg_questions"):  # a policy cannot beat full but by chance
            line += f" Above full's own score: {', '.join(above)}; one sub-question is {100 / c['lg_questions']:.1f} points."
        out += [line, ""] if line else []
    out += longgen_findings(by, methods, budgets)
    series = {m: (budgets, [by[(m, db)]["kl"] if (m, db) in by else None for db in budgets], False) for m in methods}
    out.append(plot_lines(img / "longgen_kl.png", series, "decode budget (generated tokens kept)", "KL(full || policy)",
                          "Long generation: KL along full's trajectory vs decode budget", logy=True, logx=True))
    db = budgets[0] if budgets else None
    series = {}
    for m in methods:
        x = by.get((m, db))
        if x and x.get("kl_by_pos"):
            k = len(x["kl_by_pos"])
            n = c.get("lg_tokens") or k
            series[m] = ([(i + 0.5) * n / k for i in range(k)], x["kl_by_pos"], False)
    if series:
        out.append(plot_lines(img / "longgen_kl_position.png", series, "generated token", "KL(full || policy)",
                              f"Long generation: KL along the output at decode budget {db}", logy=True))
    if seeds:
        out += ["", section_seeds(d, seeds, longgen_rows, LONGGEN_METRICS, "prompts", "decode budget")]
    return "\n".join(out) + notes(d)


def section_speed(d: dict, img: Path) -> str:
    rows = d["rows"]
    bw = next((r for r in rows if r["table"] == "bandwidth"), None)
    out = ["### Prefill and decode speed against transformers", "", provenance(d), ""]
    if bw:
        out += [f"Memory bandwidth (copy of a {bw['mib']} MiB tensor, read + write): **{bw['copy_gbs']:.1f} GB/s** "
                f"(read-only reduction: {bw['read_gbs']:.1f} GB/s). Weights read per decode step: {bw['weight_bytes'] / 1e6:.0f} MB, "
                f"so the bandwidth limit at batch 1 is **{bw['limit_tok_s']:.1f} tok/s**.", ""]
    sp = [r for r in rows if r["table"] == "speed"]
    hf = {(r["prompt"], r["batch"]): r for r in sp if r["engine"] == "transformers"}
    body = []
    for r in sp:
        ref = hf.get((r["prompt"], r["batch"]))
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref and r["engine"] != "transformers" else ""
        pratio = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x" if ref and r["engine"] != "transformers" else ""
        body.append([r["engine"], r["mode"], str(r["prompt"]), str(r["batch"]), f"{r['prefill_tok_s']:.0f}", pratio,
                     f"{r['decode_tok_s']:.1f}", ratio, pct(r.get("bandwidth_fraction")) if r.get("bandwidth_fraction") else "",
                     mib(r.get("kv_bytes"))])
    out += [table(["engine", "mode", "prompt", "batch", "prefill tok/s", "vs transformers", "decode tok/s", "vs transformers",
                   "of bandwidth limit", "KV MiB"], body), ""]
    out += targets(rows, bw)
    st = [r for r in rows if r["table"] == "startup"]
    if st:
        out += ["Startup (subprocesses; warm = second run, OS file cache and inductor cache warm):", "",
                table(["what", "seconds"], [[r["what"], f(r["seconds"], 2)] for r in st]), ""]
    return "\n".join(out) + notes(d)


def section_flatcost(d: dict, img: Path) -> str:
    """The decode-vs-context rows (suite "flatcost": `bench.py speed --parts flat`)."""
    ctx = [r for r in d["rows"] if r["table"] == "context"]
    out = []
    if ctx:
        budget = next((r["budget"] for r in ctx if r.get("budget")), None)
        paired = next((r for r in ctx if r.get("paired_rounds") or r.get("paired_median_steps")), None)
        if paired and paired.get("paired_median_steps"):
            timing = (f"the two timed in alternation step by step ({paired['paired_median_steps']} steps each, the median "
                      "step of each) so that the machine's drift cancels")
        elif paired:
            timing = (f"the two timed in alternation ({paired['paired_rounds']} rounds of {paired['paired_steps']} steps each, "
                      "the fastest of each) so that the machine's drift cancels")
        elif any("full_same_tokens_tok_s" in r for r in ctx):
            timing = "timed right after the policy so that the machine's drift over the run cancels"
        else:
            timing = "timed once at the start of the run"
        out += [f"### Decode speed against context length (policies at budget {budget})", "", provenance(d), "",
                "The cost of a decode step follows the cache a policy holds, not the context: full holds the whole "
                f"context, every policy {budget} entries per kv head. `vs full` compares each policy with full holding "
                f"the same {budget} tokens (context {budget}), {timing}"
                + ": the policy's own overhead. Modes: eager is the engine's default CPU decode (in float32 its fused "
                "kernels, tinyengine/fused.py, when they build), compiled is `torch.compile` of the decode step (with those "
                "kernels as operators, inductor fusing the rest). "
                "transformers and kvpress (SnapKVPress at the ratio that keeps the same budget) decode on their "
                "DynamicCache in the same run.", ""]
        contexts = sorted({r["context"] for r in ctx})
        keys = list(dict.fromkeys((r["engine"], r["method"], r["mode"]) for r in ctx))
        by = {(r["engine"], r["method"], r["mode"], r["context"]): r for r in ctx}
        body = []
        for e, m, mode in keys:
            cells = [m if e == "tinyengine" else f"{m} ({e})", mode]
            for C in contexts:
                x = by.get((e, m, mode, C))
                cells.append(f"{x['decode_tok_s']:.1f}" if x else "–")
            last = next((by[(e, m, mode, C)] for C in reversed(contexts) if (e, m, mode, C) in by), {})
            cells.append(f"{last['vs_full_same_tokens']:.2f}x" if last.get("vs_full_same_tokens") else "")
            body.append(cells)
        out += [table(["method", "mode"] + [f"{C} tok/s" for C in contexts] + [f"at {contexts[-1]}: vs full holding {budget}"], body), ""]
        # Issue 4's targets: a policy's overhead at most 5%, i.e. at the longest context at least 0.95x full holding its budget.
        worst = {}
        for e, m, mode in keys:
            x = by.get((e, m, mode, contexts[-1]), {}).get("vs_full_same_tokens")
            if e == "tinyengine" and x is not None:
                worst.setdefault(mode, []).append((x, m))
        for mode, xs in worst.items():
            met = [m for x, m in xs if x >= 0.95]
            missed = [f"{m} {x:.3f}x" for x, m in sorted(xs) if x < 0.95]
            out += [f"Target (issue 4), {mode}: every policy at {contexts[-1]} tokens at least 0.95x full holding {budget} "
                    f"(overhead at most 5%): met by {len(met)} of {len(xs)}" + (f"; not by {', '.join(missed)}." if missed else "."), ""]
        series = {}
        for e, m, mode in keys:
            if mode != "eager" and e == "tinyengine" and m != "full":
                continue
            xs = [C for C in contexts if (e, m, mode, C) in by]
            series[(m if e == "tinyengine" else f"{m} ({e})") + (f" {mode}" if mode != "eager" else "")] = (
                xs, [by[(e, m, mode, C)]["decode_tok_s"] for C in xs], e != "tinyengine")
        out.append(plot_lines(img / "decode_vs_context.png", series, "context (tokens)", "decode tok/s (batch 1)",
                              "Decode speed vs context length", logx=True))
    return "\n".join(out) + notes(d)


def targets(rows: list, bw: dict | None) -> list[str]:
    """Issue 3's targets (2-core CPU, float32, batch 1) against what this run measured."""
    sp = {(r["engine"], r["mode"], r["prompt"], r["batch"]): r for r in rows if r["table"] == "speed"}
    st = {r["what"]: r["seconds"] for r in rows if r["table"] == "startup"}
    short = min((p for (_, _, p, b) in sp if b == 1), default=None)
    comp, hf = sp.get(("tinyengine", "compiled", short, 1)), sp.get(("transformers", "eager", short, 1))
    checks = []
    if comp and hf:
        x = comp["decode_tok_s"] / hf["decode_tok_s"]
        checks.append(["compiled decode vs transformers (batch 1, prompt %d)" % short, ">= 3x", f"{x:.2f}x", x >= 3])
    if comp and bw:
        x = comp["decode_tok_s"] / bw["limit_tok_s"]
        checks.append(["compiled decode, fraction of the bandwidth limit", ">= 70%", pct(x), x >= 0.7])
    first = st.get("warm start to first token, generate.py (eager)")
    if first is not None:
        checks.append(["warm start to first token (generate.py)", "<= 10 s", f"{first:.1f} s", first <= 10])
    cold = st.get("cold compile (first compiled decode step)")
    if cold is not None:
        checks.append(["cold compile of the decode step", "<= 60 s", f"{cold:.1f} s", cold <= 60])
    if not checks:
        return []
    return ["Targets (issue 3), as measured in this run:", "",
            table(["target", "goal", "measured", "met"], [c[:3] + ["yes" if c[3] else "**no**"] for c in checks]), ""]


def section_memory(d: dict, img: Path) -> str:
    rows = d["rows"]
    c = d["config"]
    out = ["### Memory", "", provenance(d), "",
           "Each measurement is a fresh subprocess. Run peak: the peak RSS while prefilling and generating 8 tokens, "
           "after loading (VmHWM reset after the model is loaded); over base: that peak minus the RSS after loading; "
           "KV MiB: the static cache allocated (K, V, slot positions).", ""]
    body = []
    for r in rows:
        what = r.get("policy") or r.get("press") or "full"
        if r.get("budget"):
            what += f" budget {r['budget']}"
        if r.get("ratio"):
            what += f" ratio {r['ratio']:.3f}"
        body.append([r["table"], r["engine"], what, str(r["prompt"]), str(r.get("chunk") or "–"), mib(r.get("run_peak_rss")),
                     mib(r.get("run_over_base")), mib(r.get("kv_bytes"))])
    out += [table(["table", "engine", "cache", "prompt", "prefill chunk", "run peak MiB", "over base MiB", "KV MiB"], body), ""]
    chunked = [r for r in rows if r["table"] == "chunked"]
    for P in dict.fromkeys(r["prompt"] for r in chunked):
        whole = next((r for r in chunked if r["prompt"] == P and not r.get("chunk")), None)
        parts = next((r for r in chunked if r["prompt"] == P and r.get("chunk")), None)
        if whole and parts:
            out += [f"Chunked prefill, {P}-token prompt, {parts['policy']} at budget {parts['budget']}: peak over base "
                    f"**{mib(parts['run_over_base'])} MiB** with chunks of {parts['chunk']} against "
                    f"{mib(whole['run_over_base'])} MiB prefilling the prompt at once "
                    f"({parts['run_over_base'] / max(whole['run_over_base'], 1):.2f}x).", ""]
    ctx = [r for r in rows if r["table"] == "context"]
    series = {}
    for r in ctx:
        name = f"{r.get('policy') or r.get('press') or 'full'} ({r['engine']})"
        xs, ys, dashed = series.setdefault(name, ([], [], r["engine"] != "tinyengine"))
        xs.append(r["prompt"])
        ys.append(r["run_over_base"] / 2**20)
    if series:
        out.append(plot_lines(img / "memory_vs_context.png", series, "prompt (tokens)", "peak RSS over base (MiB)",
                              f"Memory vs context length (budget {c.get('budget')})", logx=True))
    return "\n".join(out) + notes(d)


def section_attention(d: dict) -> str:
    rows = [r for r in d["rows"] if r["table"] == "attention"]
    out = ["### Attention backends on this device", "", provenance(d), "",
           "Milliseconds per call at the model's head shapes (random inputs; decode: one query against the slots). "
           "This is the measurement behind `tinyengine.engine.default_backends`. Fastest per case in bold.", ""]
    cases = list(dict.fromkeys((r["phase"], r["batch"], r["tokens"]) for r in rows))
    variants = list(dict.fromkeys((r["backend"], r["compiled"]) for r in rows))
    by = {(r["phase"], r["batch"], r["tokens"], r["backend"], r["compiled"]): r for r in rows}
    body = []
    for ph, B, T in cases:
        vals = [by[(ph, B, T, be, cp)]["ms"] if (ph, B, T, be, cp) in by else None for be, cp in variants]
        cells = bold_best(["–" if v is None else f"{v:.3f}" for v in vals], vals, False)
        body.append([ph, str(B), str(T)] + cells)
    out += [table(["phase", "batch", "tokens"] + [be + (" (compiled)" if cp else "") for be, cp in variants], body)]
    lin = [r for r in d["rows"] if r["table"] == "linear"]
    if lin:
        forms = list(dict.fromkeys(r["form"] for r in lin))
        by = {(r["rows"], r["form"]): r for r in lin}
        out += ["", "#### Weight products of a decode step", "",
                f"Every weight matrix of the model at its shape ({lin[0]['layers']} layers and the output layer, "
                f"{lin[0]['weight_mb']:.0f} MB, random float32) times a few rows, in each form of `models/linear_forms.py`: "
                "`F.linear` (x @ W^T), `W @ x^T` (the same product as MKL's gemm reading W along its rows) and packed "
                "(oneDNN's kernel on the weights in its blocked layout, a copy `Transformer.pack_weights` makes: opt-in, "
                "twice the weight memory). tinyengine: `linear` after `measure` timed the forms on these matrices and "
                "kept the fastest per shape (as the engine does for each batch size: `Engine.setup`); the forms it "
                "chose are listed. Milliseconds per pass (median) and weight bytes read per second; the speed-up is "
                "tinyengine's against `F.linear`, from one run.", ""]
        body = []
        for n in dict.fromkeys(r["rows"] for r in lin):
            cells = [f"{by[(n, f)]['ms']:.1f} ({by[(n, f)]['gb_s']:.1f} GB/s)" if (n, f) in by else "–" for f in forms]
            a, t = by.get((n, "F.linear")), by.get((n, "tinyengine"))
            chosen = ", ".join(f"{shape} {form}" for shape, form in (t or {}).get("chosen", {}).items())
            body.append([str(n)] + cells + [f"{a['ms'] / t['ms']:.2f}x" if a and t else "–", chosen or "–",
                         f"{max(r['max_abs_err'] for (m, _), r in by.items() if m == n):.1e}"])
        out += [table(["rows"] + [f + " ms" for f in forms] + ["speed-up", "forms chosen", "max abs diff"], body)]
    return "\n".join(out) + notes(d)


def section_tp(d: dict) -> str:
    rows = d["rows"]
    c = d["config"]
    out = ["### Tensor parallel (torchrun)", "", provenance(d), "",
           f"`torchrun --standalone --nproc-per-node N -m tinyengine.tp`: each rank loads only its slices of the "
           f"safetensors, attention and MLP sharded by heads / columns, an all-reduce after o_proj and down_proj "
           f"({'gloo' if c.get('device', 'cpu') == 'cpu' else 'nccl'}). Batch 1, prompt {c.get('prompt_tokens')} tokens, "
           f"{c.get('new_tokens')} new tokens, full cache; {c.get('cpu_count')} CPU cores on the machine.", ""]
    body = []
    for model, layout in dict.fromkeys((r.get("model", d["checkpoint"]), r["layout"]) for r in rows):
        group = [r for r in rows if r.get("model", d["checkpoint"]) == model and r["layout"] == layout]
        one = next((r["decode_tok_s"] for r in group if r["ranks"] == 1), None)
        for r in group:
            body.append([model, layout, str(r["ranks"]), str(r["threads_per_rank"]), f"{r['decode_tok_s']:.1f}",
                         f"{r['decode_tok_s'] / one:.2f}x" if one else "", f"{r['first_token_s']:.2f}",
                         mib(r.get("weight_bytes_per_rank")), mib(r.get("kv_bytes_per_rank"))])
    out += [table(["model", "layout", "ranks", "threads/rank", "decode tok/s", "vs 1 rank", "first token s",
                   "weights MiB/rank", "KV MiB/rank"], body)]
    return "\n".join(out) + notes(d)


def quality_time(results: dict) -> list[str]:
    """The default quality run's time against issue 6's target (45 minutes on 2 CPU cores), when
    the three suites' results come from one default-size `bench.py quality` command."""
    runs = [results.get(s) for s in ("fidelity", "ruler", "longgen")]
    if any(d is None or d.get("size") != "default" for d in runs):
        return []
    minutes = [d.get("elapsed_s", 0) / 60 for d in runs]
    command = runs[0].get("command", "")  # one command ran all three when it is the same and names no suites
    one_run = len({d.get("command") for d in runs}) == 1 and command.startswith("python bench.py quality") and "--suites" not in command
    total = sum(minutes)
    config = runs[2].get("config", {})
    how = "" if "workers" not in config else (f", {config['workers']} worker process{'es' if config['workers'] > 1 else ''}"
                                              f"{', packed weights' if config.get('pack') else ''}")
    line = (f"Default quality run time: fidelity + ablation {minutes[0]:.1f} min, RULER {minutes[1]:.1f} min, long generation "
            f"{minutes[2]:.1f} min, in all **{total:.1f} min**{how} (issue 6's target: under 45 min on 2 CPU cores: "
            f"{'met' if total < 45 else 'not met'})")
    return [line + ("." if one_run else "; the three come from separate commands, so the total is their sum."), ""] + longest_jobs(
        dict(zip(("fidelity + ablation", "RULER", "long generation"), runs)))


def longest_jobs(runs: dict, top: int = 3) -> list[str]:
    """What a run's time is made of: each suite's costliest jobs (bench.run_jobs records every job's
    wall time; the parent's own work, such as the full cache's recorded run, is the rest)."""
    parts = []
    for suite, d in runs.items():
        jobs = sorted(d.get("job_seconds") or [], key=lambda j: -j[1])
        if jobs:
            total = sum(s for _, s in jobs) / 60
            parts.append(f"{suite}: {len(jobs)} jobs, {total:.1f} worker-min; longest "
                         + ", ".join(f"{name} {s / 60:.1f}" for name, s in jobs[:top]))
    return ["Where the time goes (minutes per job, run by the worker processes side by side): " + "; ".join(parts) + ".", ""] if parts else []


def report(folder: Path, markdown: Path) -> str:
    results = load_results(folder)
    seeds = {s: other_seeds(folder, results[s]) for s in ("fidelity", "ruler", "longgen") if s in results}
    root = markdown.parent
    img = Path("docs") / "bench"
    (root / img).mkdir(parents=True, exist_ok=True)
    cwd_img = root / img

    def rel(fn, *a):  # plot into root/docs/bench, link relative to the markdown
        text = fn(*a)
        return text.replace(f"]({cwd_img.as_posix()}/", f"]({img.as_posix()}/")

    parts = ["# Benchmarks", "",
             "Generated by `python bench.py report` from the JSON results in `bench_results/` (one file per run, with its "
             "command line, machine, date and versions). Do not edit by hand: rerun the benchmark and the report.", "",
             "Reproduce (2 CPU cores; times measured on the machine named in each section):", "",
             "```", "python bench.py quality            # fidelity + MomentKV ablation, RULER, long generation, kvpress side by side",
             "python bench.py quality --suites fidelity --seed 1   # other samples (any suite; --seed 2 ...): 'Other seeds'",
             "python bench.py speed              # tok/s vs transformers, bandwidth limit, compile/startup, decode vs context",
             "python bench.py memory             # peak RSS and KV bytes (a subprocess per measurement)",
             "python bench.py attention          # attention backends and decode weight products on this device",
             "python bench.py tp                 # tensor parallel decode at 1, 2, 3 ranks (torchrun)",
             "python bench.py report             # this file and docs/bench/*.png", "```", ""]
    if not results:
        parts.append("No results yet: run the commands above.")
    if any(s in results for s in ("fidelity", "ruler", "longgen")):
        parts += ["## Quality", ""]
    parts += quality_time(results)
    if "fidelity" in results:
        parts += [rel(section_fidelity, results["fidelity"], cwd_img, root, seeds["fidelity"]), ""]
    if "ruler" in results:
        parts += [rel(section_ruler, results["ruler"], cwd_img, seeds["ruler"]), ""]
    if "longgen" in results:
        parts += [rel(section_longgen, results["longgen"], cwd_img, seeds["longgen"]), ""]
    if any(s in results for s in ("speed", "flatcost", "memory", "attention", "tp")):
        parts += ["## Speed and memory", ""]
    if "speed" in results:
        parts += [rel(section_speed, results["speed"], cwd_img), ""]
    if "flatcost" in results:
        parts += [rel(section_flatcost, results["flatcost"], cwd_img), ""]
    if "memory" in results:
        parts += [rel(section_memory, results["memory"], cwd_img), ""]
    if "attention" in results:
        parts += [section_attention(results["attention"]), ""]
    if "tp" in results:
        parts += [section_tp(results["tp"]), ""]
    text = "\n".join(parts).rstrip() + "\n"
    markdown.write_text(text)
    print(f"[report] {', '.join(sorted(results)) or 'no results'} -> {markdown}")
    return text
