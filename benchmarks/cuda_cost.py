"""Static cost model of the CUDA C++ kernels on an H100 SXM, from their sm_90a SASS.

An *estimate*, never a measurement: the same model as ``static_cost`` (tile
bounds of ``sm90_rates``, programs dealt to SM slots, DRAM floor per launch),
fed by ``nvcc -cubin -arch=sm_90a`` of ``csrc/cuda/contrastive_kernels.cu``
(``cuda_compile``) and the launches of ``cuda_launches.launch_plan``.

A CTA of these kernels owns ``BM`` rows and sweeps every column tile of ``BN``;
the column loop is the hot loop (the top-level loop holding the tensor-core
work). Its inner loops run as many times as the source says, found from the
work each one does per iteration in the SASS (:func:`profile`): the score GEMM's
D chunks and the gradient GEMM by their MACs, the staging copies by their global
bytes, the per-element passes by their stores or exponentials.

The fragment kernels (16-bit inputs on the fast path) choose their per-element pass
with a per-tile branch inside the column loop (interior or masked tile; the backward's
one-exponential form or the exact one), which a static count cannot tell apart. The
model compiles the source twice with ``MIMAC_COST_FORM`` (``cuda_compile.compile_cubin``):
form 1 keeps the interior tiles' pass in the one-exponential form, form 2 the exact
two-exponential pass; every forward and every backward in the one-exponential form
is counted from form 1, a backward in the exact form from form 2 (the other kernels
read the same SASS in both). Masked tiles (the diagonal's) are counted as interior
ones. Generic ``LD``/``ST``
(float32's WMMA fragments loaded through a generic pointer) are charged as shared
memory: every generic access of these kernels points at it; ``LDSM`` (the 16-bit
kernels' ldmatrix fragments) is counted as 512 shared bytes per x4, as for Triton. Programs do not share work
(no triangle of S is skipped), and nothing depends on the data: no re-sweep.

    python -m benchmarks.cuda_cost --out DIR   # estimate-cuda-<nvcc>.json / .md
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import cuda_compile, sass_counts
from benchmarks.cuda_launches import (
    ELEMENT,
    CudaLaunch,
    launch_plan,
    one_exp_eligible,
    tiles_per_program,
    x_cols,
)
from benchmarks.cuda_window import one_exp_share
from benchmarks.sm90_rates import (
    H100,
    Profile,
    Rates,
    ctas_per_sm,
    floor,
    launch_estimate,
    operand_rereads,
)
from benchmarks.static_cases import resweep_fraction, resweep_lines


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: The fragment backward's ``half`` loop: a column tile in two halves of ``BN / 2``
#: columns (scores of a half, then its V into dX). Checked against the SASS: the loop's
#: gradient MACs per iteration must be the tile's over this.
FRAG_HALVES = 2


def cross_shift(bound, consts: dict):
    """cross's one-pass shift from the bound B of S, as ``binding.cpp``'s
    ``cross_shift`` takes it: min(B, max(B - headroom, level)) with ``consts``'
    ``shift_rule`` (a 0-dim tensor or a float)."""
    headroom, level = consts["shift_rule"]
    return min(bound, max(bound - headroom, level))


def gemm_macs(launch: CudaLaunch) -> list[int]:
    """MACs of one column tile, per GEMM in source order: the score GEMM over D in
    ``KC`` chunks (padded), and in ``bwd`` the gradient GEMM of one ``DO`` slice.
    float32 inputs run each as 3xTF32 (three MMAs per product); the bf16 fast path's
    gradient GEMM (the fragment backward's too) is two bf16 products (V split as
    hi + lo), every other one TF32."""
    c = launch.consts
    split = 3 if ELEMENT[launch.dtype] == 4 else 1
    out = [c["BM"] * c["BN"] * c["KC"] * _cdiv(launch.d, c["KC"]) * split]
    if launch.wide:  # every D slice's gradient in the one launch
        return out + [c["BM"] * c["BN"] * c["DO"] * c["WS"] * 2]
    if launch.kind == "bwd":
        passes = 3 if launch.split else 2 if bf16_gradient(launch) else 1
        out.append(c["BM"] * c["BN"] * c["DO"] * passes)
    return out


def bf16_gradient(launch: CudaLaunch) -> bool:
    """Whether the backward's gradient GEMM runs in bf16 (``bf16_vy`` in the source)."""
    return launch.fast and launch.dtype == "bf16"


def cost_form(launch: CudaLaunch) -> int:
    """The ``MIMAC_COST_FORM`` compile that holds the pass ``launch`` runs: 2 (exact,
    two exponentials) for a backward outside the one-exponential form, else 1."""
    return 2 if launch.kind == "bwd" and not launch.one_exp else 1


def exps_per_element(launch: CudaLaunch) -> int:
    """exp2 per score element in the per-element pass the launch runs: the forward's sum;
    the backward's row and column probabilities (two), or one in its one-exponential
    form (``launch.one_exp``)."""
    return 1 if launch.kind != "bwd" or launch.one_exp else 2


def v_stores_per_element(launch: CudaLaunch) -> float:
    """Shared stores of V per element in the backward's per-element pass: bf16 hi and lo
    as one bf16x2 store each per pair of columns, else one float2 per pair."""
    return 1.0 if bf16_gradient(launch) else 0.5


class _Trips:
    """Trip counts of the hot loop's inner loops, from the work of one iteration.

    - a loop with tensor work: the GEMM's MACs per tile (:func:`gemm_macs`, in address
      order) over its MACs per iteration;
    - a loop with global loads and no tensor work: a staging copy of 64 rows of the
      operand, ``KC`` wide inside the score GEMM's chunk loop and ``DO`` wide (the Y
      slab of the gradient) directly in the column loop, over its bytes per iteration;
    - any other loop directly in the column loop: a per-element pass, ``BM * BN / NT``
      source iterations per thread over the source iterations one SASS iteration holds.
      The backward has two (the same V for every element, in two forms, chosen per
      tile): its elements per iteration are its shared stores of V
      (:func:`v_stores_per_element`), its form its exp2 per element (one or two); the
      form the launch runs (:func:`exps_per_element`) takes its trips, the other none.
      The forward's: its exp2 per element (one), else its shared stores, one per
      element.

    The fragment kernels (``launch.frag``) have no per-element loops (their passes are
    unrolled on the accumulators) and stage whole Y tiles:

    - the staging copy (``issue_rows``; global loads, no tensor work, in the column
      loop): ``BN`` rows of Y, all ``x_cols(D)`` columns, over its bytes per iteration
      (``KC`` wide);
    - the forward's score chunk loop (tensor work, in the column loop): the tile's
      ``BM x BN x x_cols(D)`` MACs over its MACs per iteration;
    - the backward's ``half`` loop (tensor work, in the column loop): the tile's
      gradient MACs (``BM x BN x DO x 2``) over the gradient MACs of one iteration
      (its MACs less its chunk loop's), which must be :data:`FRAG_HALVES`; its score
      chunk loop (tensor work, in the half loop): the half's ``BM x BN / 2 x x_cols(D)``
      MACs over its MACs per iteration.

    Every division must be exact (ValueError otherwise: the kernel changed shape).
    The rules follow today's kernels (mma.sync / WMMA, shared-memory staging); a redesign with
    wgmma or TMA copies re-points them with :func:`gemm_macs` and the launch plan.
    """

    def __init__(self, launch: CudaLaunch, hot: sass_counts.Loop) -> None:
        self.launch, self.hot = launch, hot
        self.gemms = list(gemm_macs(launch))
        self.given: dict[str, int] = {}
        #: exp2 per element of each backward per-element pass found, in address order.
        self.forms: list[int] = []
        #: MACs of the chunk loops nested in a loop (one iteration of it), by its start.
        self._nested_macs: dict[int, int] = {}

    def __call__(self, loop: sass_counts.Loop, body: sass_counts.Counts,
                 parent: sass_counts.Loop) -> int:  # fmt: skip
        if self.launch.frag:
            trips = self._frag(loop, body, parent)
            self.given[f"{loop.start:#x}-{loop.end:#x}"] = trips
            return trips
        lc, c = self.launch, self.launch.consts
        warps = lc.num_warps
        macs = body.macs_per_cta(warps)
        if macs:
            if parent is not self.hot or not self.gemms:
                raise ValueError(f"{lc.name}: unexpected tensor-core loop at {loop.start:#x}")
            trips = self._exact(self.gemms.pop(0), macs, loop, "MACs")
        elif body.global_bytes:
            width = c["DO"] if parent is self.hot else c["KC"]
            total = 64 * width * ELEMENT[lc.dtype]
            trips = self._exact(total, body.global_bytes * warps, loop, "staged bytes")
        elif parent is self.hot and lc.kind == "bwd":
            per_thread = c["BM"] * c["BN"] // c["NT"]
            elements = body.opcodes.get("STS", 0) / v_stores_per_element(lc)
            if elements != int(elements) or elements <= 0 or body.ex2 % elements:
                raise ValueError(f"{lc.name}: the loop at {loop.start:#x} does {body.ex2} exp2 "
                                 f"per {elements} elements, not a whole number each")  # fmt: skip
            exps = body.ex2 // int(elements)
            if exps not in (1, 2):
                raise ValueError(f"{lc.name}: the loop at {loop.start:#x} takes {exps} exp2 "
                                 "per element, neither form of the pass")  # fmt: skip
            self.forms.append(exps)
            ran = exps == exps_per_element(lc)
            trips = self._exact(per_thread, int(elements), loop, "elements") if ran else 0
        elif parent is self.hot:
            per_thread = c["BM"] * c["BN"] // c["NT"]
            exps = body.ex2 // exps_per_element(lc)
            per_iter = exps if exps else body.opcodes.get("STS", 0)
            trips = self._exact(per_thread, per_iter, loop, "elements")
        else:
            raise ValueError(f"{lc.name}: cannot tell what the loop at {loop.start:#x} does")
        self.given[f"{loop.start:#x}-{loop.end:#x}"] = trips
        return trips

    def _frag(self, loop: sass_counts.Loop, body: sass_counts.Counts,
              parent: sass_counts.Loop) -> int:  # fmt: skip
        lc, c = self.launch, self.launch.consts
        macs = body.macs_per_cta(lc.num_warps)
        cols = x_cols(lc.d, c)
        in_hot = parent is self.hot
        if lc.wide and not body.global_bytes:
            return self._wide(loop, body, parent, macs)
        if body.global_bytes and not macs and in_hot:
            total = c["BN"] * cols * ELEMENT[lc.dtype]
            return self._exact(total, body.global_bytes * lc.num_warps, loop, "staged bytes")
        if macs and lc.kind != "bwd" and in_hot and self.gemms:
            return self._exact(self.gemms.pop(0), macs, loop, "MACs")
        if macs and lc.kind == "bwd" and not in_hot and parent in self.hot.inner:
            total = c["BM"] * (c["BN"] // FRAG_HALVES) * cols
            trips = self._exact(total, macs, loop, "score MACs of half a tile")
            self._nested_macs[parent.start] = self._nested_macs.get(parent.start, 0) + total
            return trips
        if macs and lc.kind == "bwd" and in_hot and len(self.gemms) == 2:
            score = self._nested_macs.get(loop.start, 0)
            if not score:
                raise ValueError(f"{lc.name}: the loop at {loop.start:#x} holds no score "
                                 "chunk loop")  # fmt: skip
            trips = self._exact(self.gemms[1], macs - score, loop, "gradient MACs")
            if trips != FRAG_HALVES or self._exact(sum(self.gemms), macs, loop, "MACs") != trips:
                raise ValueError(f"{lc.name}: the loop at {loop.start:#x} runs {trips} halves of "
                                 f"a tile, not {FRAG_HALVES}")  # fmt: skip
            self.gemms.clear()
            return trips
        raise ValueError(f"{lc.name}: cannot tell what the loop at {loop.start:#x} does")

    def _wide(self, loop: sass_counts.Loop, body: sass_counts.Counts,
              parent: sass_counts.Loop, macs: int) -> int:  # fmt: skip
        """The wide backward's loops: the quarter loop (tensor work, in the column loop:
        the tile's MACs over one quarter's, which must be ``BN / WQ``) and, in it, the V
        pass over a lane's ``WQ / WS`` columns in pairs (its exp2 over the form's per
        element give the elements per trip)."""
        lc, c = self.launch, self.launch.consts
        if macs and parent is self.hot and len(self.gemms) == 2:
            trips = self._exact(sum(self.gemms), macs, loop, "MACs")
            if trips != c["BN"] // c["WQ"]:
                raise ValueError(f"{lc.name}: the loop at {loop.start:#x} runs {trips} quarters "
                                 f"of a tile, not {c['BN'] // c['WQ']}")  # fmt: skip
            self.gemms.clear()
            return trips
        if not macs and parent in self.hot.inner and body.ex2:
            per_elem = exps_per_element(lc)
            elements = self._exact(body.ex2, per_elem, loop, "exp2 per element")
            return self._exact(c["WQ"] // c["WS"], elements, loop, "columns of a lane")
        raise ValueError(f"{lc.name}: cannot tell what the loop at {loop.start:#x} does")

    def _exact(self, total: int, per_iter: int, loop: sass_counts.Loop, what: str) -> int:
        if per_iter <= 0 or total % per_iter:
            raise ValueError(f"{self.launch.name}: the loop at {loop.start:#x} does {per_iter} "
                             f"{what} per iteration, not a divisor of {total}")  # fmt: skip
        return total // per_iter


def profile(launch: CudaLaunch, sass: str, resources: dict) -> Profile:
    """Counts of one column tile of ``launch``'s kernel (its ``cuobjdump -sass`` text
    and ``cuda_compile.resource_usage`` entry): the hot loop's iteration with every
    inner loop run its trip count (:class:`_Trips`), per warp; generic accesses added
    to the shared bytes. Raises RuntimeError when no loop does tensor work or the
    iteration holds less than one tile's MACs."""
    instrs = sass_counts.parse(sass)
    loops = sass_counts.find_loops(instrs)
    warps = launch.num_warps
    static = {id(lp): sass_counts.count_range(instrs, lp.start, lp.end).macs_per_cta(warps)
              for lp in loops}  # fmt: skip
    hot = max(loops, key=lambda lp: static[id(lp)], default=None)
    if hot is None or static[id(hot)] == 0:
        raise RuntimeError(f"{launch.name}: no loop with tensor-core work in its SASS")
    trips = _Trips(launch, hot)
    counts = sass_counts.nested_counts(instrs, hot, trips)
    old_bwd = launch.kind == "bwd" and not launch.frag
    if old_bwd and trips.forms.count(exps_per_element(launch)) != 1:
        raise RuntimeError(f"{launch.name}: per-element passes of {trips.forms} exp2 per "
                           f"element, not one of {exps_per_element(launch)}")  # fmt: skip
    tile = sum(gemm_macs(launch))
    unroll = counts.macs_per_cta(warps) // tile
    if unroll < 1 or trips.gemms:
        raise RuntimeError(f"{launch.name}: the column loop does {counts.macs_per_cta(warps)} "
                           f"MACs, not whole {tile}-MAC tiles")  # fmt: skip
    if launch.frag:
        # The pass is unrolled in the column loop: its exp2 per element (the tile's less
        # fewer than one per element: the forward's rescales, the column factors).
        elements = launch.consts["BM"] * launch.consts["BN"] * unroll
        exps = counts.ex2 * warps * sass_counts.LANES // elements
        if exps != exps_per_element(launch):
            raise RuntimeError(f"{launch.name}: {exps} exp2 per element in the column loop "
                               f"of form {cost_form(launch)}, not "
                               f"{exps_per_element(launch)}")  # fmt: skip
    per = counts.to_dict(warps)
    per["shared_bytes"] += per["generic_bytes"]
    per_tile = {k: (v / unroll if isinstance(v, int) else {s: n / unroll for s, n in v.items()})
                for k, v in per.items()}  # fmt: skip
    # cuobjdump's SHARED on sm_90 includes the 1 KiB the system reserves per block (a
    # kernel with only dynamic shared memory reads 1024); ctas_per_sm adds that itself.
    static = max(resources["static_shared"] - H100.shared_reserved_per_block, 0)
    res = {**resources, "dynamic_shared": launch.smem, "shared": launch.smem + static}
    outside = sass_counts.outside_counts(instrs, [hot]).issue
    return Profile(launch.name, res, [[warps, 1]],
                   ctas_per_sm(res["registers"], res["shared"], warps), unroll,
                   counts.macs_per_cta(warps) / (unroll * tile), per_tile, outside,
                   trips.given)  # fmt: skip


def compulsory_bytes(launch: CudaLaunch) -> int:
    """DRAM bytes a launch cannot avoid: its inputs read once, its outputs written once
    (forward: the row log-sum-exps; backward: the float32 gradient rows, reading the six
    per-row statistics of both sides)."""
    size = ELEMENT[launch.dtype]
    r, c, d = launch.rows, launch.cols, launch.d
    inputs = (r + (0 if launch.all_pairs else c)) * d * size
    if launch.kind == "bwd":
        return inputs + r * d * 4 + 3 * 4 * (r + c)
    if launch.kind == "cross":  # both sides' sums
        return inputs + 4 * (r + c)
    if launch.kind == "finish":  # its sums read, the log-sum-exps written; inputs if re-swept
        return 8 * r + (inputs if launch.resweep_blocks else 0)
    return inputs + 4 * r


def working_set_bytes(launch: CudaLaunch, slots: int) -> int:
    """Bytes the ``slots`` resident programs keep touching: their row panels
    (``BM x D`` inputs each) and the ``BN x D`` column panel they sweep in step (as
    ``static_cost.working_set_bytes``; no float32 atomics here)."""
    size, c = ELEMENT[launch.dtype], launch.consts
    return (slots * c["BM"] + c["BN"]) * launch.d * size


def estimate_launch(launch: CudaLaunch, prof: Profile, rates: Rates = H100) -> dict:
    """Seconds of one launch and what bounds it (``sm90_rates.launch_estimate``);
    ``per_element`` is per element of a program's tile, as for Triton (the backward's
    ``d_slices`` programs each cover every element of their row block)."""
    tiles = tiles_per_program(launch)
    slots = rates.sms * max(prof.ctas_per_sm, 1)
    ws = working_set_bytes(launch, slots)
    size, c = ELEMENT[launch.dtype], launch.consts
    operand = launch.cols * launch.d * size
    dram = compulsory_bytes(launch) + operand_rereads(
        operand, ws - c["BN"] * launch.d * size, len(tiles), slots, rates
    )
    est = launch_estimate(prof, launch.num_warps, tiles, ws, dram, c["BM"] * c["BN"], rates)
    return {"kernel": launch.name, "kind": launch.kind, "side": launch.side, "one_exp": launch.one_exp,
            "grid": list(launch.grid), "d_slices": launch.d_slices,
            "dynamic_shared": launch.smem, **est}  # fmt: skip


class Compiled:
    """The kernels of the two cost-model compiles of ``contrastive_kernels.cu``
    (``MIMAC_COST_FORM`` 1 and 2, :func:`cost_form`): SASS and resources per form, and
    the constants, each read once."""

    FORMS = (1, 2)

    def __init__(self, source: Path = cuda_compile.KERNELS) -> None:
        with ThreadPoolExecutor(len(self.FORMS)) as pool:  # nvcc runs single-threaded
            cubins = dict(zip(self.FORMS, pool.map(
                lambda f: cuda_compile.compile_cubin(source, form=f), self.FORMS)))  # fmt: skip
        #: Each form's SASS and resources, by mangled name.
        self.sass = {f: cuda_compile.sass_functions(c) for f, c in cubins.items()}
        self.resources = {f: cuda_compile.resource_usage(c) for f, c in cubins.items()}
        self.consts = cuda_compile.kernel_constants(source)
        self._profiles: dict[tuple, Profile] = {}

    def symbol(self, launch: CudaLaunch) -> str:
        """The mangled name of ``launch``'s kernel."""
        return cuda_compile.kernel_symbol(
            list(self.sass[cost_form(launch)]), launch.kernel, launch.dtype, launch.critic,
            None if launch.frag else launch.split, launch.fast,
            launch.tau if launch.frag and launch.kind == "bwd" else None)  # fmt: skip

    def profile(self, launch: CudaLaunch) -> Profile:
        key = (launch.name, launch.d, cost_form(launch), launch.one_exp)
        if key not in self._profiles:
            form, name = cost_form(launch), self.symbol(launch)
            self._profiles[key] = profile(launch, self.sass[form][name],
                                          self.resources[form][name])  # fmt: skip
        return self._profiles[key]


def estimate_case(case, compiled: Compiled, rates: Rates = H100) -> dict:
    """Forward + backward estimate of a ``static_cost.StaticCase`` on the CUDA backend
    (dot critic, one head): per launch and in total, with the floor. ``profiles``: one
    per distinct kernel of the plan, by its name (``launches[i]["kernel"]``)."""
    plan = launch_plan(case.pairing, case.n, case.d, compiled.consts, case.dtype,
                       cols=case.cols, columns_grad=case.columns_grad,
                       smem_optin=rates.shared_optin_per_block)  # fmt: skip
    # The backward's one-exponential form where the case's data keep every sampled tile
    # in its window (else the two-exponential pass throughout).
    share = one_exp_share(case, compiled.consts)
    plan = [replace(lc, one_exp=one_exp_eligible(lc) and share == 1.0) for lc in plan]
    # cross's one-pass forward: each finishing launch re-sweeps the share of its row
    # blocks whose shifted sum leaves the window, estimated on the case's synthetic data
    # by the rule Triton's finalize shares (same shift, window and 64-row blocks).
    frac = None
    if any(lc.kind == "finish" for lc in plan):
        window = tuple(compiled.consts["sum_window"])
        shift = functools.partial(cross_shift, consts=compiled.consts)
        frac = resweep_fraction(case, compiled.consts["BM"], shift, window)
        side = {"a": "rows", "b": "cols"}
        plan = [replace(lc, resweep_blocks=round(frac[side[lc.side]]["blocks"] * lc.grid[0]))
                if lc.kind == "finish" else lc for lc in plan]  # fmt: skip
    launches, profiles = [], {}
    for lc in plan:
        prof = compiled.profile(lc)
        profiles[lc.name] = {**asdict(prof), "num_warps": lc.num_warps, "kind": lc.kind,
                             "form": cost_form(lc)}  # fmt: skip
        launches.append(estimate_launch(lc, prof, rates))
    total = sum(e["seconds"] for e in launches)
    top = max(launches, key=lambda e: e["seconds"])
    fl = floor(case.pairing, case.rows, case.d, rates, cols=case.cols,
               columns_grad=case.columns_grad)
    return {
        "case": asdict(case), "backend": "cuda", "estimate_ms": total * 1e3,
        "floor_ms": fl["seconds"] * 1e3, "floor": fl, "share_of_floor": fl["seconds"] / total,
        "binding": f"{top['binding']} ({top['kind']})", "launches": launches,
        "one_exp_share": share, "one_exp": any(lc.one_exp for lc in plan),
        "resweep_fraction_estimated": frac,
        "profiles": profiles,
    }  # fmt: skip


def nvcc_version() -> str:
    """``13.0`` etc. from ``nvcc --version`` (``unknown`` when it cannot be read)."""
    nvcc = cuda_compile.find_nvcc()
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "unknown"


def markdown(results: list[dict], meta: dict) -> str:
    """The CUDA estimates as Markdown tables, labelled as a static estimate."""
    lines = [
        (
            "# Static estimate (not a measurement): CUDA C++ backend, sm_90a SASS from nvcc "
            f"{meta['nvcc']}"
        ),
        "",
        f"`python -m benchmarks.cuda_cost` ({meta['date']}), the model and H100 SXM rates of",
        "`benchmarks/static_cost.py`. Forward + backward, bf16, one head, dot critic (cosine",
        "runs the same kernel on unit rows). The model sees no latency, stalls or barriers:",
        "real kernels will be slower. The fragment kernels' per-tile pass is read from the",
        "`MIMAC_COST_FORM` compiles: form 1 (interior tiles, the backward's one-exponential",
        "form) for the forward and a backward in that form, form 2 (exact, two exponentials)",
        "for a backward outside it.",
        "",
        "| case | estimated ms | floor ms | share of floor | binding bound (launch) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(f"| {r['case']['name']} | {r['estimate_ms']:.2f} | {r['floor_ms']:.2f} | "
                     f"{100 * r['share_of_floor']:.0f} % | {r['binding']} |")  # fmt: skip
    lines += [
        "",
        "Per launch: tile bounds in microseconds per column tile on one SM (as for Triton).",
        "",
        (
            "| case | kernel | rows | grid | tiles | issue | SFU | tensor | shared | L2 | DRAM "
            "| binding | balance | ms |"
        ),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        for e in r["launches"]:
            t = e["tile_us"]
            lines.append(
                f"| {r['case']['name']} | {e['kind']} | {e['side']} | "
                f"{'x'.join(map(str, e['grid']))} | {e['tiles']} | {t['issue']:.3f} | "
                f"{t['sfu']:.3f} | {t['tensor']:.3f} | {t['shared']:.3f} | {t['l2']:.3f} | "
                f"{t['dram']:.3f} | {e['binding']} | {100 * e['balance']:.0f} % | "
                f"{1e3 * e['seconds']:.3f} |"
            )
    lines += [
        "",
        "Hot loop per element of a program's 64 x 64 tile (whole CTA; the narrow",
        "backward's D slices each recompute the whole score tile, the wide one forms it",
        "once for all of D), and resources:",
        "",
        (
            "| case | kernel | D slices | issue slots | EX2 | MACs (of them TF32) | "
            "tensor instructions per warp | shared B | global B | regs | spill B | "
            "shared B (dynamic + static, less 1 KiB reserved) | CTAs/SM | inner trips |"
        ),
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for name, p in r["profiles"].items():
            e = next(x for x in r["launches"] if x["kernel"] == name)
            pe, t, res = e["per_element"], p["per_tile"], p["resources"]
            tf32 = t["tensor_tf32_macs_per_cta"] / (t["tensor_macs_per_cta"] or 1)
            shapes = ", ".join(f"{v:g} x {k}" for k, v in t["hmma"].items()) or "-"
            lines.append(
                f"| {r['case']['name']} | `{name}` (form {p['form']}) | {e['d_slices']} | "
                f"{pe['issue_slots']:.2f} | "
                f"{pe['mufu_ex2']:.3f} | {pe['tensor_macs']:.0f} ({100 * tf32:.0f} %) | "
                f"{shapes} HMMA | {pe['shared_bytes']:.1f} | {pe['global_bytes']:.2f} | "
                f"{res['registers']} | {res['local']} | {res['shared']} | {p['ctas_per_sm']} | "
                f"{', '.join(f'{v}' for v in p['inner_trips'].values())} |"
            )
    lines += ["", "Where the issue slots of a tile go (per element, top 8 opcode families):", ""]
    for r in results:
        for name, p in r["profiles"].items():
            top = list(p["per_tile"]["opcodes"].items())[:8]
            lines.append(f"- {r['case']['name']}, `{name}`: " + ", ".join(
                f"{op} {v * p['num_warps'] / 4096:.3f}" for op, v in top))  # fmt: skip
    lines += resweep_lines(results, "cross's finishing launches")
    return "\n".join(lines) + "\n"


def summary_line(r: dict) -> str:
    """One printed line of a case's CUDA estimate."""
    return (f"cuda {r['case']['name']}: estimated {r['estimate_ms']:.2f} ms, floor "
            f"{r['floor_ms']:.2f} ms ({100 * r['share_of_floor']:.0f} %), "
            f"binding {r['binding']}")  # fmt: skip


def run(cases, out: Path | None = None, rates: Rates = H100) -> list[dict]:
    """Estimate ``cases`` (``static_cost.StaticCase``); with ``out``, write
    ``estimate-cuda<nvcc>.json`` and ``.md`` there."""
    compiled = Compiled()
    # Label-masked problems: the cuda backend refuses them (contract.LABEL_MASK_REFUSAL).
    results = [estimate_case(c, compiled, rates) for c in cases if not c.labels]
    if out is not None:
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "nvcc": nvcc_version(), "arch": cuda_compile.ARCH,
                "python": platform.python_version(), "kind": "static estimate, not a measurement",
                "constants": compiled.consts, "rates": asdict(rates)}  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        tag = f"cuda-nvcc{meta['nvcc']}"
        (out / f"estimate-{tag}.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=1) + "\n"
        )
        (out / f"estimate-{tag}.md").write_text(markdown(results, meta))
    return results


def main(argv: list[str] | None = None) -> int:
    from benchmarks.static_cases import CASES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_cost",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for estimate-cuda-*.json and .md")
    parser.add_argument("--cases", help="comma-separated indices into CASES (default: all)")
    args = parser.parse_args(argv)
    picks = range(len(CASES)) if not args.cases else [int(x) for x in args.cases.split(",")]
    for r in run([CASES[i] for i in picks], args.out):
        print(summary_line(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
