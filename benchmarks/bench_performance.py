"""The performance benchmark of issue #8: engine vs numpy vs research-code loop, one process.

    python benchmarks/bench_performance.py            # default run (~30-40 min on 2 busy cores)
    python benchmarks/bench_performance.py --quick    # CI-sized subset (~6 min on 2 busy cores)
    python benchmarks/bench_performance.py --full     # larger sweeps, numpy limit at 10^7
    python benchmarks/bench_performance.py --cases 'grid/ols/*/fresh/*' --json out.json

Sections, in this order, all in one process (memory probes excepted):

1. **ceilings**: this machine's bulk rates: normal draws per second (numpy
   PCG64 ziggurat; JAX's and the engine's generators with philox4x32 and
   threefry2x32 keys; float64 and float32) and
   large square matmul FLOP/s (numpy and JAX; float64 and float32).
2. **grid**: for model {ols, logistic} x workflow {discard, augment,
   subsample} x design {fresh, fixed} x (n, d) in {(100, 10), (1000, 10),
   (100, 50)}, G = 50: the engine (`collapse_jax.simulate`), the vectorized
   numpy baseline and the per-trajectory loop (`numpy_baselines`), timed by
   `bench_engine.measure_calls`.  Per row: fits/s, ratios to both baselines
   (by wall time and by process CPU time), compile time, peak memory, and
   the share of the machine's normal-draw and matmul ceilings the engine's
   rate amounts to.
3. **sweep-R / sweep-n**: OLS discard and augment, fresh design: fits/s vs
   trajectories (n = 100) and vs n (R fixed), engine and numpy.
4. **limit**: `limit_monte_carlo` (four workflows on common random numbers,
   G = 100, d = 1) at 10^6 and 10^7 draws vs `bench_limit.numpy_limit`.
5. **memory**: in a fresh subprocess, peak RSS after every block while one
   `simulate` call streams OLS augment (fresh) trajectories with the block
   size of a 10^8 run, and its extrapolation to 10^8 trajectories
   (``--huge`` streams 10^8: about a day on this machine).
6. **targets**: each issue #8 target with the measured value and "met?".

Timing: wall time (`time.perf_counter`) and process CPU time
(`time.process_time`, all threads) per call; rates use wall time, compile
excluded; ``cpu/wall`` shows how much of the cores a call got (the machine
is shared).  Peak memory: the kernel's per-process peak RSS (VmHWM) reset
before each call by writing 5 to /proc/self/clear_refs, after a
`gc.collect()` and `malloc_trim(0)`; the figure is peak minus RSS at the
reset.  See docs/performance.md for every column and method.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))  # bench_engine, numpy_baselines, bench_limit, _openblas_env
sys.path.insert(0, str(_HERE.parent))  # this checkout's collapse_jax

from _openblas_env import (  # noqa: E402
    OPENBLAS_VARS,
    reexec_without_openblas_env,
    removed_openblas_env,
)

if __name__ == "__main__":
    reexec_without_openblas_env()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import fnmatch  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from bench_engine import (  # noqa: E402
    REPEAT_BELOW_S,
    _max_z,
    _summary,
    environment,
    measure_calls,
    time_engine,
)
from numpy_baselines import simulate_loop, simulate_vectorized  # noqa: E402

import collapse_jax  # noqa: E402
from collapse_jax import _random  # noqa: E402

G = 50
SHAPES = ((100, 10), (1000, 10), (100, 50))
MODELS = ("ols", "logistic")
WORKFLOWS = ("discard", "augment", "subsample")
DESIGNS = ("fresh", "fixed")
LIMIT_G = 100
LIMIT_WORKFLOWS = ("discard", "augment", "subsample", "subsample-replace")
MB = 2**20
LOOP_MIN_S = 1.0  # a loop-baseline call shorter than this is redone on more trajectories
LOOP_MAX_TRAJECTORIES = 500

# Share of --trajectories per (model, workflow, design) at (n, d) = (100, 10):
# rows of very different cost each take seconds.  Rates are per fit, so rows
# with different trajectory counts compare; engine, numpy and their ratio in
# one row always use the same count.
SHARE = {
    ("ols", "discard"): 1.0,
    ("ols", "augment"): 1.0,
    ("ols", "subsample"): 0.02,
    ("logistic", "discard"): 0.02,
    ("logistic", "augment", "fresh"): 0.005,
    ("logistic", "augment", "fixed"): 0.02,
    ("logistic", "subsample"): 0.01,
}

QUICK_GRID = ("grid/ols/discard/fresh/n100/d10", "grid/ols/augment/fresh/n100/d10",
              "grid/ols/subsample/fresh/n100/d10", "grid/logistic/augment/fresh/n100/d10")

MODES = {
    # trajectories: base count; sweep_r / sweep_n: sweep points; limit: engine draws;
    # numpy_limit: numpy draws (rate compared with each engine row); memory: trajectories
    # streamed by the memory probe.
    "quick": dict(trajectories=10_000, repeats=1, loop=2, sweep_r=(1_000, 10_000),
                  sweep_n=(100, 10_000), limit=(1_000_000,), numpy_limit=100_000,
                  memory=20_000, normal_size=2**21, matmul_size=512,
                  grid=QUICK_GRID),
    "default": dict(trajectories=10_000, repeats=3, loop=5, sweep_r=(1_000, 10_000, 100_000),
                    sweep_n=(100, 1_000, 10_000), limit=(1_000_000, 10_000_000),
                    numpy_limit=1_000_000, memory=500_000,
                    normal_size=2**23, matmul_size=1024, grid=("grid/*",)),
    "full": dict(trajectories=10_000, repeats=3, loop=10,
                 sweep_r=(1_000, 10_000, 100_000, 1_000_000), sweep_n=(100, 1_000, 10_000),
                 limit=(1_000_000, 10_000_000), numpy_limit=10_000_000,
                 memory=1_000_000, normal_size=2**24,
                 matmul_size=2048, grid=("grid/*",)),
}

# --------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------


def _proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes ({} where /proc is unavailable)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _malloc_trim() -> None:
    # Freed heap pages stay resident in glibc's arenas; returning them first makes
    # "peak minus RSS at reset" count what a call needs, not what it found free.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_rss():
    """Context manager yielding a dict filled on exit with the peak RSS of the block.

    Keys: ``rss_before`` (bytes, after gc + malloc_trim), ``peak`` (VmHWM at
    exit), ``delta`` (peak - rss_before, or None when the peak could not be
    reset, in which case ``peak`` is the process's lifetime peak).
    """
    gc.collect()
    _malloc_trim()
    rec: dict = {"reset": reset_peak_rss()}
    rec["rss_before"] = _proc_status().get("VmRSS")
    try:
        yield rec
    finally:
        st = _proc_status()
        rec["peak"], rec["rss_after"] = st.get("VmHWM"), st.get("VmRSS")
        ok = rec["reset"] and rec["peak"] is not None and rec["rss_before"] is not None
        rec["delta"] = rec["peak"] - rec["rss_before"] if ok else None


def _max_delta(probes: list, skip_first: bool = False) -> float | None:
    vals = [p["delta"] for p in (probes[1:] if skip_first and len(probes) > 1 else probes)
            if p and p.get("delta") is not None]
    return max(vals) if vals else None


# --------------------------------------------------------------------------
# Ceilings
# --------------------------------------------------------------------------


def _best_of(fn, repeats: int) -> dict:
    """Best (smallest) wall time of `fn()` over `repeats` calls, with that call's CPU time."""
    best = None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    return {"wall_s": best[0], "cpu_s": best[1]}


def measure_ceilings(normal_size: int, matmul_size: int, repeats: int = 3) -> list[dict]:
    """This machine's bulk rates, measured now in this process.

    Normal draws: `normal_size` standard normals in one call (numpy
    ``Generator(PCG64).standard_normal(out=...)``; JAX ``jax.random.normal``
    and the engine's ``collapse_jax._random.normal`` (impl ``<key>-ndtri``),
    jitted, with philox4x32 and threefry2x32 typed keys, compile excluded).
    Matmul: an m x m by m x m product, m = `matmul_size`, counted as 2 m^3
    FLOPs (numpy ``np.matmul(out=...)``; JAX jitted ``jnp.matmul``).  Best of
    `repeats` calls (a ceiling is what the machine can do, so the fastest
    call is the estimate).

    **Returns:** a list of dicts: ``kind`` ("normal" or "matmul"), ``library``,
    ``impl``, ``dtype``, ``size``, ``wall_s``, ``cpu_s``, ``rate`` (normals/s
    or FLOP/s).
    """
    import jax
    import jax.numpy as jnp

    out = []
    for dtype in ("float64", "float32"):
        rng = np.random.default_rng(0)
        buf = np.empty(normal_size, dtype)
        t = _best_of(lambda rng=rng, buf=buf: rng.standard_normal(out=buf, dtype=buf.dtype),
                     repeats)
        out.append({"kind": "normal", "library": "numpy", "impl": "pcg64-ziggurat",
                    "dtype": dtype, "size": normal_size, **t, "rate": normal_size / t["wall_s"]})
        generators = {"jax": jax.random.normal, "collapse_jax": _random.normal}
        for (library, draw), impl in itertools.product(generators.items(),
                                                        ("philox4x32", "threefry2x32")):
            key = jax.random.key(0, impl=impl)
            f = jax.jit(lambda k, dt=dtype, draw=draw: draw(k, (normal_size,), jnp.dtype(dt)))
            f(key).block_until_ready()  # compile
            t = _best_of(lambda f=f, key=key: f(key).block_until_ready(), repeats)
            name = impl if library == "jax" else f"{impl}-ndtri"
            out.append({"kind": "normal", "library": library, "impl": name, "dtype": dtype,
                        "size": normal_size, **t, "rate": normal_size / t["wall_s"]})
    m = matmul_size
    flops = 2.0 * m**3
    for dtype in ("float64", "float32"):
        a = np.random.default_rng(1).standard_normal((m, m)).astype(dtype)
        b = np.random.default_rng(2).standard_normal((m, m)).astype(dtype)
        c = np.empty_like(a)
        t = _best_of(lambda a=a, b=b, c=c: np.matmul(a, b, out=c), repeats)
        out.append({"kind": "matmul", "library": "numpy", "impl": "openblas", "dtype": dtype,
                    "size": m, **t, "rate": flops / t["wall_s"]})
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        f = jax.jit(jnp.matmul)
        f(ja, jb).block_until_ready()
        t = _best_of(lambda f=f, ja=ja, jb=jb: f(ja, jb).block_until_ready(), repeats)
        out.append({"kind": "matmul", "library": "jax", "impl": "xla", "dtype": dtype,
                    "size": m, **t, "rate": flops / t["wall_s"]})
    return out


def ceiling(ceilings: list[dict], kind: str, dtype: str, impl: str | None = None) -> float:
    """The largest measured rate of `kind` in `dtype` (only `impl` if given); nan if none."""
    rates = [c["rate"] for c in ceilings
             if c["kind"] == kind and c["dtype"] == dtype and (impl is None or c["impl"] == impl)]
    return max(rates) if rates else float("nan")


# --------------------------------------------------------------------------
# Work per fit (for the ceiling fractions)
# --------------------------------------------------------------------------


def work_per_fit(cfg: collapse_jax.SimulationConfig, newton_steps: float = 0.0) -> dict:
    """Nominal standard normals and FLOPs of one fit of the engine's algorithm for `cfg`.

    Counts what the algorithm must do, not what XLA executes (a lower bound
    on real work); uniform draws (logistic labels, subsample keys) are not
    counted as normals.  A chi-square draw counts as one normal (one
    Marsaglia-Tsang attempt).  FLOPs: a multiply-add is 2; Cholesky d^3/3;
    triangular solve d^2 each; a Gram X^T X of m rows 2 m d^2.

    - OLS sufficient statistics, discard: fresh d + 1 normals (z and one
      chi-square), 2d FLOPs; fixed d normals, 2 d^2 FLOPs (C^{-T} z).
    - OLS sufficient statistics, augment: fresh d(d-1)/2 + 2d normals
      (Bartlett below-diagonal, d chi-squares, z), d^3 + 6 d^2 FLOPs
      (C C^T, A theta, C z, Cholesky, two solves); fixed d normals, 2 d^2.
    - OLS data (subsample): n (d + 1) normals fresh, n fixed; 2 n d^2 + 6 n d
      + d^3/3 + 2 d^2 FLOPs.
    - logistic: n d normals fresh, 0 fixed; per Newton step on m points
      2 m d^2 + 4 m d + d^3/3 + 2 d^2 FLOPs, m = n except fresh augment
      (m = n (G + 1) / 2, the mean pool size), times `newton_steps`, plus 2 n d
      for the labels.
    """
    n, d, fresh = cfg.n, cfg.d, cfg.design == "fresh"
    chol_solve = d**3 / 3 + 2 * d * d
    if cfg.uses_sufficient_statistics:
        if cfg.workflow == "discard":
            normals, flops = (d + 1, 2 * d) if fresh else (d, 2 * d * d)
        elif fresh:
            normals, flops = d * (d - 1) / 2 + 2 * d, d**3 + 6 * d * d
        else:
            normals, flops = d, 2 * d * d + d
    elif cfg.model == "ols":
        normals = n * (d + 1) if fresh else n
        flops = 2 * n * d * d + 6 * n * d + chol_solve
    else:
        normals = n * d if fresh else 0
        m = n * (cfg.generations + 1) / 2 if (cfg.workflow == "augment" and fresh) else n
        flops = 2 * n * d + newton_steps * (2 * m * d * d + 4 * m * d + chol_solve)
    return {"normals": float(normals), "flops": float(flops)}


# --------------------------------------------------------------------------
# Grid rows
# --------------------------------------------------------------------------


def case_name(model: str, workflow: str, design: str, n: int, d: int) -> str:
    return f"grid/{model}/{workflow}/{design}/n{n}/d{d}"


# The fewest trajectories of a grid row.  Rows of 4-8 trajectories (the d = 50 and
# n = 1,000 rows of data-drawing workflows, until 2026-11-23) ran calls of 30-110 ms whose
# fixed costs (dispatch, the host-side summary of (G, 4d, 4d) moment sums: ~7 ms at
# d = 50) were most of what they timed, for numpy's fixed costs as for the engine's.
MIN_GRID_TRAJECTORIES = 32
# A grid row whose engine call runs under ROW_MIN_S is measured again on k times its
# trajectories (k <= ROW_MAX_GROWTH), in blocks of the size it ran with, so the kernel
# is the same one (no new compile) and each timed call lasts about ROW_MIN_S.  At 32
# trajectories (~0.07-0.12 s calls) OLS subsample at d = 50 measured 0.86-1.45x numpy
# call by call, and 1.18-1.55x (median of 5) at 128 and 512 (2026-11-23).
ROW_MIN_S = 0.3
ROW_MAX_GROWTH = 16


def trajectories_for(model: str, workflow: str, design: str, n: int, d: int, base: int) -> int:
    """Trajectories of a grid row: `base` times its share, scaled down for costlier shapes,
    and at least `MIN_GRID_TRAJECTORIES`."""
    share = SHARE.get((model, workflow, design), SHARE.get((model, workflow)))
    cfg = collapse_jax.SimulationConfig(model=model, workflow=workflow, design=design, n=n, d=d)
    if cfg.uses_sufficient_statistics:
        scale = (d / 10) ** 2 if (workflow == "augment" and design == "fresh") else 1.0
    else:
        scale = (n / 100) * (d / 10) ** 2
    return max(MIN_GRID_TRAJECTORIES, round(base * share / scale))


class Runner:
    """Measures engine / numpy / loop for configs, caching by config."""

    def __init__(self, repeats: int, loop_trajectories: int, ceilings: list[dict]):
        self.repeats, self.loop_r, self.ceilings = repeats, loop_trajectories, ceilings
        self.rows: dict = {}
        self.loops: dict = {}

    def loop(self, cfg: collapse_jax.SimulationConfig) -> dict:
        """The loop baseline's rate for cfg's (model, workflow, design, n, d, dtype).

        One call on `loop_trajectories` trajectories; when that takes under
        LOOP_MIN_S (fast cases, where a 0.05 s timing is mostly noise), one
        more call on enough trajectories (at most LOOP_MAX_TRAJECTORIES) to
        take about LOOP_MIN_S, and that call is the measurement.
        """
        key = (cfg.model, cfg.workflow, cfg.design, cfg.n, cfg.d, cfg.dtype)
        if key not in self.loops:
            r = self.loop_r
            while True:
                lcfg = cfg.replace(trajectories=r, draw="data", block_size=None)
                c0, t0 = time.process_time(), time.perf_counter()
                res = simulate_loop(lcfg)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                more = min(LOOP_MAX_TRAJECTORIES, math.ceil(1.2 * r * LOOP_MIN_S / wall))
                if wall >= LOOP_MIN_S or more <= r or r > self.loop_r:
                    break
                r = more
            self.loops[key] = {"trajectories": r, "wall_s": wall, "cpu_s": cpu,
                               "fits_per_s": r * cfg.generations / wall,
                               "alive": float(res.ok[:, -1].mean())}
        return self.loops[key]

    def measure(self, cfg: collapse_jax.SimulationConfig, name: str, loop: bool = True,
                grow: bool = False) -> dict:
        """One row: engine and numpy (and the loop) on `cfg`, cached by `cfg`.

        With `grow`, a row whose engine call runs under ROW_MIN_S is measured
        again on more trajectories (see ROW_MIN_S); compile time and the first
        call come from the first measurement, everything else from the second.
        """
        asked, row = cfg, self.rows.get(cfg)
        if row is not None and (grow or row["trajectories"] == cfg.trajectories):
            return row  # a grown row stands only for rows that may grow (not a sweep point)
        eng = first = time_engine(cfg, self.repeats, min_calls=2, probe=peak_rss)
        grow_by = min(ROW_MAX_GROWTH, math.ceil(1.2 * ROW_MIN_S / max(eng["run_s"], 1e-9)))
        if grow and eng["run_s"] < ROW_MIN_S and grow_by > 1:
            cfg = cfg.replace(trajectories=grow_by * cfg.trajectories,
                              block_size=eng["result"].block_size)
            eng = time_engine(cfg, self.repeats, min_calls=1, probe=peak_rss)
        R, fits = cfg.trajectories, cfg.trajectories * cfg.generations
        nmp = measure_calls(lambda: simulate_vectorized(cfg), self.repeats, probe=peak_rss)
        res, base = eng["result"], nmp["result"]
        eng_rate, np_rate = fits / eng["run_s"], fits / nmp["run_s"]
        compiled = first["compile_s"] > 0
        clean_cpu = [c for c, k in zip(first["cpu"], first["compile"], strict=True) if k == 0.0]
        with np.errstate(invalid="ignore"):
            steps = float(np.nanmean(np.where(res.summary.count > 0, res.newton_iterations,
                                              np.nan))) if cfg.model == "logistic" else 0.0
        work = work_per_fit(cfg, steps if math.isfinite(steps) else 0.0)
        nrm_ceiling = ceiling(self.ceilings, "normal", cfg.dtype)
        own_ceiling = ceiling(self.ceilings, "normal", cfg.dtype, impl=f"{cfg.prng}-ndtri")
        flop_ceiling = ceiling(self.ceilings, "matmul", cfg.dtype)
        row = {
            "name": name, "model": cfg.model, "workflow": cfg.workflow, "design": cfg.design,
            "n": cfg.n, "d": cfg.d, "generations": cfg.generations, "dtype": cfg.dtype,
            "prng": cfg.prng, "draw": "stats" if cfg.uses_sufficient_statistics else "data",
            "trajectories": R, "fits": fits,
            "trajectories_planned": asked.trajectories,
            "engine_block_size": res.block_size,
            "engine_calls": eng["calls"],
            "engine_compile_s": first["compile_s"] if compiled else None,
            "engine_compile_cpu_s_est": (max(first["cpu"][0] - statistics.median(clean_cpu), 0.0)
                                         if compiled and clean_cpu else None),
            "engine_first_call_s": first["first_call_s"],
            "engine_run_s": eng["run_s"],
            "engine_run_cpu_s": eng["run_cpu_s"],
            "engine_workers": eng["result"].workers,
            "engine_fits_per_s": eng_rate,
            "engine_fits_per_cpu_s": fits / eng["run_cpu_s"] if eng["run_cpu_s"] > 0 else None,
            "engine_peak_delta_bytes": _max_delta(eng["probe"], skip_first=eng is first and compiled),
            "engine_peak_delta_first_call_bytes": _max_delta(first["probe"][:1]),
            "engine_newton_steps_mean": steps,
            "numpy_calls": nmp["calls"],
            "numpy_run_s": nmp["run_s"],
            "numpy_run_cpu_s": nmp["run_cpu_s"],
            "numpy_fits_per_s": np_rate,
            "numpy_peak_delta_bytes": _max_delta(nmp["probe"]),
            "engine_over_numpy": eng_rate / np_rate,
            "engine_over_numpy_cpu": (nmp["run_cpu_s"] / eng["run_cpu_s"]
                                      if eng["run_cpu_s"] > 0 else None),
            "normals_per_fit": work["normals"],
            "flops_per_fit": work["flops"],
            "normal_ceiling_fraction": eng_rate * work["normals"] / nrm_ceiling,
            "normal_ceiling_fraction_own_prng": eng_rate * work["normals"] / own_ceiling,
            "flop_ceiling_fraction": eng_rate * work["flops"] / flop_ceiling,
            "alive_engine": float(res.summary.count[-1] / R),
            "alive_numpy": float(base.ok[:, -1].mean()),
            "max_z_engine_vs_numpy": _max_z(res.summary, _summary(cfg, base)),
            "loop_trajectories": None, "loop_fits_per_s": None, "engine_over_loop": None,
        }
        key = (cfg.model, cfg.workflow, cfg.design, cfg.n, cfg.d, cfg.dtype)
        if loop or key in self.loops:  # a loop rate measured before is reused (no R dependence)
            lp = self.loop(cfg)
            row.update(loop_trajectories=lp["trajectories"], loop_run_s=lp["wall_s"],
                       loop_run_cpu_s=lp["cpu_s"], loop_fits_per_s=lp["fits_per_s"],
                       engine_over_loop=eng_rate / lp["fits_per_s"], alive_loop=lp["alive"])
        self.rows[asked] = row
        return row


def _f(x, fmt: str, width: int) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return f"{'-':>{width}}"
    return f"{x:{fmt}}".rjust(width)


def _rate(x) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _ratio(x) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x"


def _pct(x) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%"


def _mb(x) -> str:
    return "-" if x is None else f"{x / MB:,.0f}"


ROW_HEADER = (
    f"{'case':36} {'R':>7} | {'engine f/s':>11} {'c/w':>4} {'w':>1} {'comp s':>6} {'MB':>5} | "
    f"{'numpy f/s':>10} {'c/w':>4} {'MB':>5} | {'eng/np':>7} {'(cpu)':>7} | "
    f"{'loop f/s':>9} {'eng/loop':>8} | {'%nrm':>5} {'%flop':>6} | {'alive e/n':>9} {'|z|':>5}"
)


def row_line(r: dict) -> str:
    cw_e = r["engine_run_cpu_s"] / r["engine_run_s"] if r["engine_run_s"] > 0 else None
    cw_n = r["numpy_run_cpu_s"] / r["numpy_run_s"] if r["numpy_run_s"] > 0 else None
    comp = r["engine_compile_s"]
    return (
        f"{r['name'].removeprefix('grid/'):36} {r['trajectories']:>7} | "
        f"{_rate(r['engine_fits_per_s']):>11} {_f(cw_e, '.1f', 4)} {r.get('engine_workers', '-')} "
        f"{('cached' if comp is None else f'{comp:.2f}'):>6} "
        f"{_mb(r['engine_peak_delta_bytes']):>5} | "
        f"{_rate(r['numpy_fits_per_s']):>10} {_f(cw_n, '.1f', 4)} "
        f"{_mb(r['numpy_peak_delta_bytes']):>5} | {_ratio(r['engine_over_numpy']):>7} "
        f"{_ratio(r['engine_over_numpy_cpu']):>7} | {_rate(r['loop_fits_per_s']):>9} "
        f"{_ratio(r['engine_over_loop']):>8} | {_pct(r['normal_ceiling_fraction']):>5} "
        f"{_pct(r['flop_ceiling_fraction']):>6} | "
        f"{r['alive_engine']:.2f}/{r['alive_numpy']:.2f} {_f(r['max_z_engine_vs_numpy'], '.2f', 5)}"
    )


# --------------------------------------------------------------------------
# Limit process
# --------------------------------------------------------------------------


def measure_limit(engine_draws: tuple[int, ...], numpy_draws: int, ceilings: list[dict]) -> dict:
    """`limit_monte_carlo` (all four workflows, G = 100, d = 1, one process) vs numpy.

    A warm-up call of one block compiles the kernel (its compile time is
    reported); the timed calls then compile nothing, so their wall and CPU
    times are run times.  numpy: `bench_limit.numpy_limit` on `numpy_draws`
    draws, one call; every engine row's ratio uses that numpy rate.
    Trajectory-steps = draws x G x workflows.
    """
    from bench_limit import numpy_limit, zmax

    from collapse_jax import LimitConfig, limit_monte_carlo

    W = len(LIMIT_WORKFLOWS)
    base = LimitConfig(workflows=LIMIT_WORKFLOWS, generations=LIMIT_G, draws=1)
    warm = limit_monte_carlo(base.replace(draws=base.block_size))
    compile_s = warm.compile_time
    normals_per_draw = LIMIT_G * 2  # Z_g and C_g (d = 1, V = I^{-1}: no R_g)
    nrm = ceiling(ceilings, "normal", "float64", impl="threefry2x32-ndtri")
    nrm_best = ceiling(ceilings, "normal", "float64")

    with peak_rss() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        s_np = numpy_limit(LIMIT_WORKFLOWS, LIMIT_G, numpy_draws)
        np_wall, np_cpu = time.perf_counter() - t0, time.process_time() - c0
    np_steps = numpy_draws * LIMIT_G * W / np_wall
    numpy_row = {"draws": numpy_draws, "run_s": np_wall, "run_cpu_s": np_cpu,
                 "draws_per_s": numpy_draws / np_wall, "steps_per_s": np_steps,
                 "steps_per_cpu_s": numpy_draws * LIMIT_G * W / np_cpu,
                 "peak_delta_bytes": mem["delta"], "zmax": zmax(s_np, LIMIT_G)}
    rows = []
    for draws in engine_draws:
        with peak_rss() as mem:
            c0 = time.process_time()
            res = limit_monte_carlo(base.replace(draws=draws))
            cpu = time.process_time() - c0
        run = res.wall_time - res.compile_time
        steps = draws * LIMIT_G * W / run
        rows.append({
            "name": f"limit/{draws:.0e}".replace("+0", ""), "draws": draws,
            "engine_compile_s": compile_s, "engine_wall_s": res.wall_time, "engine_run_s": run,
            "engine_run_cpu_s": cpu, "engine_draws_per_s": draws / run,
            "engine_workers": res.workers,
            "engine_steps_per_s": steps,
            "engine_steps_per_cpu_s": draws * LIMIT_G * W / cpu,
            "engine_peak_delta_bytes": mem["delta"],
            "engine_over_numpy": steps / np_steps,
            "engine_over_numpy_cpu": (draws * LIMIT_G * W / cpu) / numpy_row["steps_per_cpu_s"],
            "normal_ceiling_fraction": draws / run * normals_per_draw / nrm_best,
            "normal_ceiling_fraction_own_prng": draws / run * normals_per_draw / nrm,
            "zmax": zmax(res.summaries, LIMIT_G),
        })
    return {"generations": LIMIT_G, "workflows": list(LIMIT_WORKFLOWS), "d": 1,
            "normals_per_draw": normals_per_draw, "numpy": numpy_row, "engine": rows}


# --------------------------------------------------------------------------
# Memory vs trajectories (subprocess)
# --------------------------------------------------------------------------

MEMORY_MIN_BLOCKS = 32  # shorter probe runs are too short to tell growth from allocator steps
MEMORY_CONFIG = dict(model="ols", workflow="augment", design="fresh", n=100, d=10, generations=G)


def memory_probe_child(spec: dict) -> dict:
    """Run in a fresh process: peak RSS while `simulate` streams trajectories.

    The block size is the driver's default for 10^8 trajectories, so that
    this run has the block of a 10^8 run.  A warm-up call of one block
    compiles the kernel (its peak includes compilation); then one `simulate`
    call streams `spec["trajectories"]` trajectories, and after every block
    (the driver's progress callback) VmHWM and VmRSS are read and the peak is
    reset: ``samples`` holds each block's peak RSS and the RSS after it.
    """
    from collapse_jax._driver import bytes_per_trajectory, default_block_size

    cfg = collapse_jax.SimulationConfig(**spec["config"])
    block = default_block_size(cfg.replace(trajectories=10**8))
    R = int(spec["trajectories"])
    cfg = cfg.replace(block_size=block, trajectories=R)
    import jax

    jax.devices()  # start the runtime before the baseline
    st0 = _proc_status()
    with peak_rss() as warm:
        t0 = time.perf_counter()
        res = collapse_jax.simulate(cfg.replace(trajectories=block))
        warm["wall_s"], warm["compile_s"] = time.perf_counter() - t0, res.compile_time
    samples: list[dict] = []

    run_peak = 0

    def on_block(_line: str) -> None:
        # The peak since the previous block, then reset: a series of per-block
        # peaks (a running maximum would creep up with every new extreme of
        # the allocator's transient peaks even with no growth at all).
        nonlocal run_peak
        st = _proc_status()
        samples.append({"trajectories": min((len(samples) + 1) * block, R),
                        "peak": st.get("VmHWM"), "rss": st.get("VmRSS"),
                        "wall_s": time.perf_counter() - t0})
        run_peak = max(run_peak, st.get("VmHWM") or 0)
        reset_peak_rss()

    with peak_rss() as run:
        c0, t0 = time.process_time(), time.perf_counter()
        collapse_jax.simulate(cfg, progress=on_block)
        run["wall_s"], run["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    run["peak"] = max(run_peak, run["peak"] or 0)  # over the whole call
    if run["delta"] is not None:
        run["delta"] = run["peak"] - run["rss_before"]
    run["trajectories"] = R
    run["fits_per_s"] = R * cfg.generations / run["wall_s"]
    return {"config": cfg.to_dict(), "block_size": block,
            "driver_block_bytes_estimate": bytes_per_trajectory(cfg) * block,
            "rss_after_import": st0.get("VmRSS"), "peak_after_import": st0.get("VmHWM"),
            "warmup": warm, "run": run, "samples": samples}


def _thin(samples: list[dict], keep: int = 200) -> list[dict]:
    """At most ~`keep` evenly spaced samples, plus the last and the one with the largest peak."""
    step = max(1, len(samples) // keep)
    top = max(range(len(samples)), key=lambda i: samples[i]["peak"] or 0) if samples else -1
    return [x for i, x in enumerate(samples)
            if i % step == 0 or i == len(samples) - 1 or i == top]


def measure_memory(trajectories: int, timeout: float | None = None) -> dict:
    """Run `memory_probe_child` in a subprocess; extrapolate its peak to 10^8 trajectories.

    Growth is the least-squares slope of the per-block peak RSS against
    trajectories over the second half of the run, with its standard error.
    If the slope exceeds two standard errors, growth is taken as real and
    the peak at 10^8 is the largest block peak plus slope x (10^8 - R);
    otherwise no growth is detectable and the estimate is the largest block
    peak, with ``undetectable_growth_at_1e8_bytes`` (2 SE x (10^8 - R)) saying
    how large a leak this run could have missed.  The figure for the 2 GB
    target is the larger of the estimate and the warm-up peak (which includes
    compilation); the target is decided only for runs of at least
    MEMORY_MIN_BLOCKS blocks.  The time at 10^8 uses the run's rate.
    """
    spec = {"config": MEMORY_CONFIG, "trajectories": int(trajectories)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "wall_s": wall}
    out = analyse_memory(json.loads(proc.stdout.strip().splitlines()[-1]))
    out.update(subprocess_wall_s=wall,
               extrapolated_hours_at_1e8=10**8 * G / out["run"]["fits_per_s"] / 3600)
    return out


def analyse_memory(out: dict) -> dict:
    """Growth test and 10^8 extrapolation of a `memory_probe_child` record.

    See `measure_memory`; growth counts as detected when the slope exceeds
    two standard errors and would add at least 1 MB at 10^8 trajectories.
    """
    samples = out["samples"]
    R = int(out["run"]["trajectories"])
    half = [x for x in samples if x["trajectories"] >= R / 2]
    rs = np.array([x["trajectories"] for x in half], float)
    peaks = np.array([x["peak"] for x in half], float)
    slope, se = 0.0, float("inf")
    if len(half) >= 4 and np.ptp(rs) > 0:
        (slope, _), cov = np.polyfit(rs, peaks, 1, cov=True)
        slope, se = float(slope), float(np.sqrt(cov[0, 0]))
    at = 10**8
    growing = slope > 2 * se and slope * max(at - R, 0) >= MB
    top = float(max(x["peak"] for x in samples))
    extrapolated = top + (slope * max(at - R, 0) if growing else 0.0)
    out.update(blocks=len(samples), decided=len(samples) >= MEMORY_MIN_BLOCKS,
               slope_bytes_per_trajectory=slope, slope_se_bytes_per_trajectory=se,
               growth_detected=bool(growing),
               undetectable_growth_at_1e8_bytes=2 * se * max(at - R, 0),
               extrapolated_peak_at_1e8_bytes=extrapolated,
               peak_bound_at_1e8_bytes=max(extrapolated, float(out["warmup"]["peak"] or 0)))
    out["samples"] = _thin(samples)
    return out


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------


def _largest(rows: list[dict], **match) -> dict | None:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(hits, key=lambda r: r["trajectories"]) if hits else None


def targets(rows: list[dict], limit: dict | None, memory: dict | None) -> list[dict]:
    """Each issue #8 target: measured value (wall-time based; CPU-time based alongside) and met?"""
    out = []

    def add(name, target, value, met, cpu_value=None, note=""):
        out.append({"target_name": name, "target": target, "measured": value,
                    "measured_cpu": cpu_value, "met": met, "note": note})

    for wf in ("discard", "augment"):
        r = _largest(rows, model="ols", workflow=wf, design="fresh", n=100, d=10)
        if r is None:
            continue
        tag = f"OLS fresh {wf} n=100 d=10 (R={r['trajectories']:,})"
        add(f"{tag} vs numpy", ">= 3x", r["engine_over_numpy"], r["engine_over_numpy"] >= 3,
            r["engine_over_numpy_cpu"])
        if r["engine_over_loop"] is not None:
            add(f"{tag} vs loop", ">= 100x", r["engine_over_loop"], r["engine_over_loop"] >= 100)
        big = _largest(rows, model="ols", workflow=wf, design="fresh", n=10_000, d=10)
        small = big and _largest([x for x in rows if x["trajectories"] == big["trajectories"]],
                                 model="ols", workflow=wf, design="fresh", n=100, d=10)
        if big and small:
            v = big["engine_fits_per_s"] / small["engine_fits_per_s"]
            add(f"OLS fresh {wf} n=10,000 rate / n=100 rate (R={big['trajectories']:,})",
                ">= 0.8 (same rate)", v, v >= 0.8,
                big["engine_fits_per_cpu_s"] / small["engine_fits_per_cpu_s"],
                note=f"n=10,000: {big['engine_fits_per_s']:,.0f} fits/s, "
                     f"{big['engine_over_numpy']:.2f}x numpy")
    r = _largest(rows, model="logistic", workflow="augment", design="fresh", n=100, d=10)
    if r is not None:
        add(f"logistic fresh augment n=100 d=10 vs numpy (R={r['trajectories']:,})", ">= 2x",
            r["engine_over_numpy"], r["engine_over_numpy"] >= 2, r["engine_over_numpy_cpu"],
            note="same Newton stopping rule in both (equal accuracy)")
    for r in rows:
        if r["workflow"] == "subsample" and r["name"].startswith("grid/"):
            add(f"{r['name'].removeprefix('grid/')} vs numpy", ">= 1x", r["engine_over_numpy"],
                r["engine_over_numpy"] >= 1, r["engine_over_numpy_cpu"])
    if limit:
        for r in limit["engine"]:
            add(f"limit {r['draws']:,} draws vs numpy", ">= 1.5x", r["engine_over_numpy"],
                r["engine_over_numpy"] >= 1.5, r["engine_over_numpy_cpu"])
            add(f"limit {r['draws']:,} draws trajectory-steps/s", ">= 1.5e8",
                r["engine_steps_per_s"], r["engine_steps_per_s"] >= 1.5e8,
                r["engine_steps_per_cpu_s"])
    kernels = {}  # one entry per compiled kernel (sweep rows repeat grid rows)
    for r in rows:
        if r["engine_compile_s"] is not None:
            key = tuple(r.get(k) for k in ("model", "workflow", "design", "n", "d", "dtype",
                                           "engine_block_size", "draw"))
            kernels[key] = r
    comps = [r["engine_compile_s"] for r in kernels.values()]
    cpus = [r["engine_compile_cpu_s_est"] for r in kernels.values()
            if r["engine_compile_cpu_s_est"] is not None]
    if comps:
        add(f"compile time per kernel shape, median of {len(comps)}", "<= 1.5 s",
            statistics.median(comps), statistics.median(comps) <= 1.5,
            statistics.median(cpus) if cpus else None)
        add(f"compile time per kernel shape, max of {len(comps)}", "<= 1.5 s", max(comps),
            max(comps) <= 1.5)
    if memory and "error" not in memory:
        run = memory["run"]
        if run["trajectories"] >= 10**8:
            v = max(memory["warmup"]["peak"], run["peak"])
            add("OLS augment 10^8 trajectories peak RSS (measured)", "< 2 GB", v, v < 2 * 1024**3)
        else:
            v = memory["peak_bound_at_1e8_bytes"]
            decided = memory["decided"]
            add("OLS augment 10^8 trajectories peak RSS (extrapolated)", "< 2 GB", v,
                (v < 2 * 1024**3) if decided else None,
                note=f"streamed {run['trajectories']:,} in {memory['blocks']} blocks; growth "
                     + ("detected" if memory["growth_detected"] else
                        "not detected; growth this run cannot exclude would add <= "
                        f"{memory['undetectable_growth_at_1e8_bytes'] / MB:,.0f} MB at 10^8")
                     + ("" if decided else f"; under {MEMORY_MIN_BLOCKS} blocks: not decided"))
    return out


def _fmt_target(t: dict, key: str) -> str:
    """A target's `key` ("measured" or "measured_cpu") in the unit its name implies."""
    v = t[key]
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if "RSS" in t["target_name"]:
        return f"{v / MB:,.0f} MB"
    if "compile" in t["target_name"]:
        return f"{v:.2f} s"
    if "steps/s" in t["target_name"]:
        return f"{v:.3g}"
    return _ratio(v) if "vs" in t["target_name"] else f"{v:.2f}"


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------


def plot(record: dict, path: Path) -> None:
    """Two panels: fits/s vs trajectories (n = 100) and vs n, OLS fresh discard/augment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"discard": ("o", "C0"), "augment": ("s", "C1")}
    for ax, key, xlab in ((axes[0], "sweep_r", "trajectories R"), (axes[1], "sweep_n", "n")):
        rows = record["sweeps"][key]
        for wf in ("discard", "augment"):
            pts = sorted((r["x"], r["engine_fits_per_s"], r["numpy_fits_per_s"])
                         for r in rows if r["workflow"] == wf)
            if not pts:
                continue
            x, e, p = zip(*pts, strict=True)
            marker, color = styles[wf]
            ax.plot(x, e, "-", marker=marker, color=color, label=f"engine {wf}")
            ax.plot(x, p, "--", marker=marker, color=color, mfc="none", label=f"numpy {wf}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlab)
        ax.set_ylabel("fits / s (wall)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
    env = record["environment"]
    axes[0].set_title(f"OLS fresh, n=100 d=10 G={G}")
    axes[1].set_title(f"OLS fresh, d=10 G={G}, R={record['settings']['sweep_n_trajectories']:,}")
    fig.suptitle(f"collapse_jax vs numpy ({env['cpu']}, load {env['loadavg_start']})",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _wanted(patterns: list[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def plan(mode: dict, patterns: list[str], base: int, dtype: str) -> dict:
    """Names and configs of everything this run measures (before filtering by --cases)."""
    grid = []
    for n, d in SHAPES:
        for model in MODELS:
            for wf in WORKFLOWS:
                for design in DESIGNS:
                    name = case_name(model, wf, design, n, d)
                    if not _wanted(list(mode["grid"]), name) or not _wanted(patterns, name):
                        continue
                    R = trajectories_for(model, wf, design, n, d, base)
                    cfg = collapse_jax.SimulationConfig(
                        model=model, workflow=wf, design=design, n=n, d=d, generations=G,
                        trajectories=R, seed=0, dtype=dtype)
                    grid.append((name, cfg))
    sweep_r, sweep_n = [], []
    for wf in ("discard", "augment"):
        for R in mode["sweep_r"]:
            name = f"sweep-R/ols/{wf}/R{R}"
            if _wanted(patterns, name):
                sweep_r.append((name, R, collapse_jax.SimulationConfig(
                    model="ols", workflow=wf, n=100, d=10, generations=G, trajectories=R,
                    seed=0, dtype=dtype)))
        for n in mode["sweep_n"]:
            name = f"sweep-n/ols/{wf}/n{n}"
            if _wanted(patterns, name):
                sweep_n.append((name, n, collapse_jax.SimulationConfig(
                    model="ols", workflow=wf, n=n, d=10, generations=G, trajectories=base,
                    seed=0, dtype=dtype)))
    limit = [f"limit/{x:.0e}".replace("+0", "") for x in mode["limit"]]
    return {"grid": grid, "sweep_r": sweep_r, "sweep_n": sweep_n,
            "limit": [x for x in limit if _wanted(patterns, x)],
            "memory": _wanted(patterns, "memory/ols/augment/fresh")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="CI-sized subset (fresh design, n=100, d=10)")
    g.add_argument("--full", action="store_true", help="bigger sweeps; numpy limit at 10^7 draws")
    p.add_argument("--huge", action="store_true",
                   help="also stream 10^8 OLS augment trajectories in the memory probe (hours)")
    p.add_argument("--cases", default="*",
                   help="comma list of fnmatch patterns over measurement names (see --list), "
                        "e.g. 'grid/ols/*/fresh/*,limit/*'; ceilings always run")
    p.add_argument("--list", action="store_true", help="print the measurement names and exit")
    p.add_argument("--trajectories", type=int, default=None,
                   help="base trajectory count (default 10000); grid rows use a share of it")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    p.add_argument("--loop-trajectories", type=int, default=None)
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--normal-size", type=int, default=None,
                   help="normals per ceiling call (default 2^23; --quick 2^21)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="m of the m x m ceiling matmul (default 1024; --quick 512)")
    p.add_argument("--json", type=Path, default=Path("results/performance/performance.json"))
    p.add_argument("--plot", type=Path, default=Path("results/performance/performance.png"))
    p.add_argument("--no-loop", action="store_true", help="skip the per-trajectory loop baseline")
    p.add_argument("--keep-openblas-env", action="store_true",
                   help="do not remove OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for this run")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_probe is not None:
        print(json.dumps(memory_probe_child(json.loads(args.memory_probe)), default=_json_default))
        return {}

    mode_name = "quick" if args.quick else "full" if args.full else "default"
    mode = dict(MODES[mode_name])
    base = args.trajectories or mode["trajectories"]
    repeats = args.repeats or mode["repeats"]
    loop_r = args.loop_trajectories or mode["loop"]
    patterns = [s.strip() for s in args.cases.split(",") if s.strip()]
    todo = plan(mode, patterns, base, args.dtype)
    memory_trajectories = 10**8 if args.huge else mode["memory"]
    if args.list:
        for name, _ in todo["grid"]:
            print(name)
        for name, *_ in todo["sweep_r"] + todo["sweep_n"]:
            print(name)
        for name in todo["limit"]:
            print(name)
        if todo["memory"]:
            print("memory/ols/augment/fresh")
        return {}

    t_all = time.perf_counter()
    env = environment(removed_openblas_env())
    env["loadavg_start"] = _loadavg()
    print(f"collapse_jax performance benchmark ({mode_name})  G={G}  {args.dtype}  {env['cpu']}  "
          f"{env['cpu_count']} cores  numpy {env['numpy']}  jax {env['jax']}  "
          f"devices {env['jax_devices']}  git {env['git']}")
    print(f"/proc/loadavg at start: {env['loadavg_start']}  (other jobs share this machine: "
          "compare rates within this run, and read cpu/wall columns)")
    for k in OPENBLAS_VARS:
        state = ("removed for this run" if k in env["openblas_env_removed_for_this_run"]
                 else f"set to {os.environ[k]!r}" if k in os.environ else "not set")
        print(f"{k}: {state}")

    # 1. ceilings
    t0 = time.perf_counter()
    mode["normal_size"] = args.normal_size or mode["normal_size"]
    mode["matmul_size"] = args.matmul_size or mode["matmul_size"]
    ceilings = measure_ceilings(mode["normal_size"], mode["matmul_size"],
                                repeats=3 if args.quick else 5)
    print(f"\n== ceilings (best of calls; {time.perf_counter() - t0:.0f} s)")
    print(f"{'kind':7} {'library':12} {'impl':18} {'dtype':8} {'size':>9} {'rate':>12} "
          f"{'cpu/wall':>8}")
    for c in ceilings:
        unit = "normals/s" if c["kind"] == "normal" else "FLOP/s"
        print(f"{c['kind']:7} {c['library']:12} {c['impl']:18} {c['dtype']:8} {c['size']:>9} "
              f"{c['rate']:>12.3g} {c['cpu_s'] / c['wall_s']:>8.2f}  {unit}")

    runner = Runner(repeats, 0 if args.no_loop else loop_r, ceilings)
    loop = not args.no_loop

    # 2. grid
    print(f"\n== grid: engine vs numpy vs loop; G={G}; rates in fits/s (wall); engine: "
          f"{max(repeats, 2)} calls"
          + (f" (2 when the first runs over {REPEAT_BELOW_S:.0f} s)" if repeats > 2 else "")
          + ", median of those that compiled nothing; numpy: median of "
          f"{repeats} call(s)"
          + (f" (1 when over {REPEAT_BELOW_S:.0f} s)" if repeats > 1 else "")
          + f"; loop: one call on {loop_r} trajectories, or on "
          f"more (up to {LOOP_MAX_TRAJECTORIES}) when that takes under {LOOP_MIN_S:.0f} s")
    print(ROW_HEADER)
    print("-" * len(ROW_HEADER))
    grid_rows, errors = [], []
    for name, cfg in todo["grid"]:
        try:
            row = runner.measure(cfg, name, loop=loop, grow=True)
        except Exception as e:  # one broken case must not lose a long run
            errors.append({"name": name, "error": f"{type(e).__name__}: {e}"})
            print(f"{name.removeprefix('grid/'):36} ERROR {errors[-1]['error']}", flush=True)
            continue
        grid_rows.append(row)
        print(row_line(row), flush=True)

    # 3. sweeps
    sweeps = {"sweep_r": [], "sweep_n": []}
    for key, label in (("sweep_r", "trajectories (n=100, d=10)"),
                       ("sweep_n", f"n (d=10, R={base:,})")):
        if not todo[key]:
            continue
        print(f"\n== {key}: OLS fresh discard/augment, fits/s vs {label}")
        print(ROW_HEADER)
        print("-" * len(ROW_HEADER))
        for name, x, cfg in todo[key]:
            # No loop runs here (n = 10,000 augment would take minutes); rows whose
            # config was measured with a loop in the grid keep its rate.
            try:
                row = dict(runner.measure(cfg, name, loop=False))
            except Exception as e:  # as above
                errors.append({"name": name, "error": f"{type(e).__name__}: {e}"})
                print(f"{name:36} ERROR {errors[-1]['error']}", flush=True)
                continue
            row["name"], row["x"] = name, x
            sweeps[key].append(row)
            print(row_line(row), flush=True)

    # 4. limit
    limit = None
    if todo["limit"]:
        draws = tuple(x for x, nm in zip(mode["limit"], [f"limit/{x:.0e}".replace("+0", "")
                                                         for x in mode["limit"]], strict=True)
                      if nm in todo["limit"])
        print(f"\n== limit process: limit_monte_carlo, {len(LIMIT_WORKFLOWS)} workflows, "
              f"G={LIMIT_G}, d=1, one process (w: blocks at once, threads); numpy on {mode['numpy_limit']:,} draws")
        limit = measure_limit(draws, mode["numpy_limit"], ceilings)
        nr = limit["numpy"]
        print(f"{'case':14} {'draws':>11} {'compile s':>9} {'run s':>8} {'c/w':>4} {'w':>1} "
              f"{'steps/s':>10} {'MB':>6} | {'numpy steps/s':>13} {'c/w':>4} | {'eng/np':>7} "
              f"{'(cpu)':>7} | {'%nrm':>5} {'|z|':>5}")
        for r in limit["engine"]:
            print(f"{r['name']:14} {r['draws']:>11,} {r['engine_compile_s']:>9.2f} "
                  f"{r['engine_run_s']:>8.2f} {r['engine_run_cpu_s'] / r['engine_run_s']:>4.1f} "
                  f"{r['engine_workers']} "
                  f"{r['engine_steps_per_s']:>10.3g} {_mb(r['engine_peak_delta_bytes']):>6} | "
                  f"{nr['steps_per_s']:>13.3g} {nr['run_cpu_s'] / nr['run_s']:>4.1f} | "
                  f"{_ratio(r['engine_over_numpy']):>7} {_ratio(r['engine_over_numpy_cpu']):>7} | "
                  f"{_pct(r['normal_ceiling_fraction']):>5} {r['zmax']:>5.2f}", flush=True)
        print(f"numpy: {nr['draws']:,} draws in {nr['run_s']:.2f} s, "
              f"peak +{_mb(nr['peak_delta_bytes'])} MB, |z|max {nr['zmax']:.2f}")

    # 5. memory
    memory = None
    if todo["memory"]:
        print(f"\n== memory: OLS augment fresh n=100 d=10 G={G}, peak RSS vs trajectories "
              "(fresh subprocess, the block size of a 10^8 run, peak reset after every block)")
        memory = measure_memory(memory_trajectories)
        if "error" in memory:
            print("memory probe failed:\n" + memory["error"])
        else:
            w, run = memory["warmup"], memory["run"]
            print(f"block size {memory['block_size']} (driver estimate "
                  f"{memory['driver_block_bytes_estimate'] / MB:.0f} MB/block); RSS after import "
                  f"{_mb(memory['rss_after_import'])} MB; warm-up (compile "
                  f"{w['compile_s']:.1f} s + one block) peak {_mb(w['peak'])} MB")
            print(f"streaming {run['trajectories']:,} trajectories in one call: "
                  f"{run['wall_s']:.1f} s, cpu/wall {run['cpu_s'] / run['wall_s']:.1f}, "
                  f"{run['fits_per_s']:,.0f} fits/s; peak RSS of each block:")
            samples = memory["samples"]
            picks = sorted({0, *(round(f * (len(samples) - 1)) for f in (0.1, 0.25, 0.5, 0.75)),
                            len(samples) - 1})
            print("  " + "   ".join(f"{samples[i]['trajectories']:,}: {_mb(samples[i]['peak'])} MB"
                                    for i in picks))
            print(f"per-block peak vs trajectories, second half: slope "
                  f"{memory['slope_bytes_per_trajectory']:.3g} +- "
                  f"{memory['slope_se_bytes_per_trajectory']:.2g} B/trajectory ("
                  + ("growth" if memory["growth_detected"] else "no growth")
                  + f" detected at 2 SE; a leak this run could miss adds "
                  f"<= {memory['undetectable_growth_at_1e8_bytes'] / MB:,.0f} MB at 10^8); peak "
                  f"at 10^8 {memory['extrapolated_peak_at_1e8_bytes'] / MB:,.0f} MB, with compile "
                  f"{memory['peak_bound_at_1e8_bytes'] / MB:,.0f} MB; {memory['blocks']} blocks; "
                  f"time at 10^8 at this rate {memory['extrapolated_hours_at_1e8']:.1f} h")

    # 6. targets
    all_rows = grid_rows + sweeps["sweep_r"] + sweeps["sweep_n"]
    tg = targets(all_rows, limit, memory)
    if tg:
        print("\n== summary: issue #8 targets (measured: wall-time based; cpu: the same from "
              "process CPU time)")
        print(f"{'target':64} {'target':>18} {'measured':>11} {'cpu':>9}  met?")
        for t in tg:
            print(f"{t['target_name']:64} {t['target']:>18} {_fmt_target(t, 'measured'):>11} "
                  f"{_fmt_target(t, 'measured_cpu'):>9}  "
                  f"{'n/a' if t['met'] is None else 'yes' if t['met'] else 'NO'}"
                  + (f"   ({t['note']})" if t["note"] else ""))

    total = time.perf_counter() - t_all
    env["loadavg_end"] = _loadavg()
    print(f"\ntotal {total:.0f} s; /proc/loadavg at end: {env['loadavg_end']}")
    record = {
        "benchmark": "collapse_jax performance (issue #8)",
        "command": [sys.executable, *sys.argv] if argv is None else ["bench_performance.py", *argv],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode_name,
        "settings": {"generations": G, "dtype": args.dtype, "trajectories": base,
                     "repeats": repeats, "loop_trajectories": None if args.no_loop else loop_r,
                     "cases": patterns, "sweep_n_trajectories": base,
                     **{k: v for k, v in mode.items() if k != "grid"},
                     "memory": memory_trajectories},
        "environment": env,
        "ceilings": ceilings,
        "cases": grid_rows,
        "sweeps": sweeps,
        "limit": limit,
        "memory": memory,
        "targets": tg,
        "errors": errors,
        "total_s": total,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None and (sweeps["sweep_r"] or sweeps["sweep_n"]):
        plot(record, args.plot)
        print(f"wrote {args.plot}")
    return record


if __name__ == "__main__":
    main()
