"""x @ W^T for the few rows of a decode step, on CPU in whichever form is fastest on this machine.

A decode step multiplies every weight matrix by one row per sequence, so it is bound by reading the
weights, and how fast a product of a few rows reads them depends on the CPU and its BLAS build, not on
anything here. `bench.py attention`'s linear table (SmolLM2's matrices, 2 threads, weight GB/s):
  - AMD EPYC (2026-11-30, in git history): MKL's F.linear 12 / 7 GB/s for 1 / 2 rows, the same
    product written W @ x^T 25 / 26, oneDNN's kernel on packed weights 19 / 16;
  - Intel Xeon (2026-12-01, BENCHMARKS.md): F.linear 18 / 17, W @ x^T 8 / 8, packed 13 / 12; from 4
    rows on F.linear falls and packed leads for the larger matrices.
So the engine does not pick one: for each row count (up to TUNED_ROWS) it times every form on the
model's own matrices in decode order and keeps the fastest for each matrix shape (`measure`, called
by Transformer.measure_linear); a compiled step bakes in the choice for its rows (`compiled_form`).
Larger products (prefill) are compute-bound and keep F.linear. The forms round differently (1e-6
relative), so runs that chose differently agree to rounding, not bit for bit: set FIXED_FORM for
bitwise-repeatable runs.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.nn.functional as F

TUNED_ROWS = 64  # products of more rows keep F.linear (compute-bound)
# Another form replaces F.linear only when this much faster: a near-tie keeps the default, so the choice
# (and the last bits of the logits) does not flip from run to run on timing noise.
MARGIN = 1.1
FIXED_FORM: str | None = None  # a name of FORMS to use without measuring ("packed" only where packed)

FASTEST: dict[tuple, str] = {}  # (out, in, dtype, rows, threads, packed?) -> the form `measure` chose


def _w_xt(x2: torch.Tensor, weight: torch.Tensor, packed=None) -> torch.Tensor:
    """weight @ x2^T, transposed back: MKL runs a gemm reading W along its rows."""
    rows = x2.shape[0]
    if rows == 1:  # one column would run as a gemv (F.linear's kernel); a duplicate column costs nothing measurable
        x2 = torch.cat((x2, x2))
    return (weight @ x2.t()).t()[:rows].contiguous()


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) by oneDNN's kernel, with `packed` = pack(weight)."""
    rows = x.numel() // x.shape[-1]
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` reordered into oneDNN's blocked layout for `packed_linear` (a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)  # 8: the batch size it tunes the layout for


FORMS = {  # name -> fn(x [rows, in], weight, packed) = x @ weight^T
    "F.linear": lambda x2, weight, packed=None: F.linear(x2, weight),
    "W @ x^T": _w_xt,
    "packed": lambda x2, weight, packed: packed_linear(x2, packed),
}


def key(weight: torch.Tensor, rows: int, packed: torch.Tensor | None) -> tuple:
    return (*weight.shape, weight.dtype, rows, torch.get_num_threads(), packed is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on CPU for up to TUNED_ROWS rows in the form `measure` chose
    (F.linear where nothing was measured). `packed`: the weight in oneDNN's layout (pack), or None.
    Written for the ~200 calls of a decode step: F.linear's own overhead is ~5 us a call, this
    lookup adds ~1-2."""
    rows = x.numel() // x.shape[-1]
    if rows > TUNED_ROWS or not x.is_cpu:
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():  # the form measured for the step's rows, read once at trace time
        form = compiled_form(*weight.shape, str(weight.dtype), rows, packed is not None)
    else:
        form = FIXED_FORM or FASTEST.get(key(weight, rows, packed), "F.linear")
    if form == "packed" and packed is not None:
        return packed_linear(x, packed, bias)
    if form != "W @ x^T":
        return F.linear(x, weight, bias)
    y = _w_xt(x.reshape(rows, x.shape[-1]), weight)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


@torch._dynamo.assume_constant_result
def compiled_form(out: int, inp: int, dtype: str, rows: int, packed: bool) -> str:
    """The form a compiled graph bakes in: FASTEST's choice for the step's rows (Engine.setup measured
    them before the first compiled step), read once while tracing and kept as a constant. A lookup
    traced as code would guard on the table, which grows with every row count measured later, so
    each new entry would recompile the step. F.linear or W @ x^T: the packed kernel is eager only
    (a "packed" choice takes F.linear)."""
    k = (out, inp, getattr(torch, dtype.removeprefix("torch.")), rows, torch.get_num_threads(), packed)  # = key()
    form = FIXED_FORM or FASTEST.get(k, "F.linear")
    return form if form in ("F.linear", "W @ x^T") else "F.linear"


def measure(mats: list[tuple[torch.Tensor, torch.Tensor | None]], rows: int, reps: int = 3) -> dict[tuple, str]:
    """Time every form on `mats` ([(weight, packed or None)] in the order a forward reads them, so
    each is read at the cache state of a real step) times `rows` random rows; record in FASTEST, per
    matrix shape, the fastest (F.linear unless another is MARGIN faster; each form's time is its
    best of `reps` passes, after one pass to warm up). Returns the new entries."""
    shapes = {key(w, rows, p) for w, p in mats} - FASTEST.keys()
    if not shapes or FIXED_FORM:
        return {}
    with torch.no_grad():
        best = _times(mats, rows, reps, shapes)
    chosen = {}
    for k in shapes:
        times = {form: best[(k, form)] for form in FORMS if (k, form) in best}
        fastest = min(times, key=times.get)
        chosen[k] = fastest if times[fastest] * MARGIN < times["F.linear"] else "F.linear"
    FASTEST.update(chosen)
    return chosen


def _times(mats, rows: int, reps: int, shapes: set) -> dict:
    """(key, form) -> seconds for all of that key's matrices in `mats`, the best of `reps` passes.
    The forms take turns pass by pass, so a slow spell of a noisy machine hits them alike."""
    g = torch.Generator().manual_seed(0)
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=g, dtype=w.dtype) for w, _ in mats}
    best = defaultdict(lambda: float("inf"))
    for rep in range(reps + 1):
        for form, fn in FORMS.items():
            took = defaultdict(float)
            for w, p in mats:
                k = key(w, rows, p)
                if k not in shapes or (form == "packed" and p is None):
                    continue
                start = time.perf_counter()
                fn(xs[w.shape[1]], w, p)
                took[k] += time.perf_counter() - start
            if rep:  # the first pass warms up (oneDNN builds its primitive on first use)
                for k, s in took.items():
                    best[(k, form)] = min(best[(k, form)], s)
    return dict(best)
