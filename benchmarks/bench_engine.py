"""Time `collapse_jax.simulate` against plain-numpy baselines, side by side.

    python benchmarks/bench_engine.py [--trajectories R] [--quick] [--json PATH]

One process, one table.  For each case (model x workflow x design x dtype,
n=100, d=10, G=50) it times

- the engine (`collapse_jax.simulate`): the median wall time over the
  calls (of `--repeats`) that compiled nothing; the first call compiles and
  its compile time has its own column (the driver caches the compiled
  program, so later calls compile nothing); when only that call ran, its
  wall time minus its compile time;
- the vectorized numpy baseline (`numpy_baselines.simulate_vectorized`) on
  the same configuration and trajectory count: median of `--repeats` calls;
- the per-trajectory loop of published research code
  (`numpy_baselines.simulate_loop`) on `--loop-trajectories` trajectories:
  one call.

A first call whose run takes over 5 s is not repeated.

Rates are fits per second, fits = trajectories x generations, so rows with
different trajectory counts compare.  Ratios are engine rate / baseline rate
from this run only.  "draw" says how the engine and the vectorized baseline
draw OLS data: ``stats`` samples the sufficient statistics (X^T X by
Bartlett's decomposition, X^T eps given X^T X), ``data`` draws (X, y).  The
loop baseline always draws data.  Column ``|z|max`` is the largest
|difference| of the engine's and the numpy baseline's variance ratio over
generations (those with at least 30 surviving trajectories in both), in
combined standard errors: a check that both computed the same thing.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: when set in the environment, they can
slow OpenBLAS on some processors.  numpy uses OpenBLAS, and so does the
engine for its CPU LAPACK calls (jaxlib takes them from scipy's OpenBLAS).
Unless ``--keep-openblas-env`` is given, the script re-executes itself once
with both variables removed, so that the whole command (engine and baselines
alike) runs without them; the table header and the JSON record say what was
set and what was done.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))  # numpy_baselines, _openblas_env
sys.path.insert(0, str(_HERE.parent))  # this checkout's collapse_jax

from _openblas_env import OPENBLAS_VARS, REPORTED_ENV  # noqa: E402
from _openblas_env import REEXEC_MARK as _REEXEC_MARK  # noqa: E402
from _openblas_env import reexec_without_openblas_env as _reexec_without_openblas_env  # noqa: E402

if __name__ == "__main__":
    _reexec_without_openblas_env()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import collapse_jax  # noqa: E402
from numpy_baselines import simulate_loop, simulate_vectorized  # noqa: E402

N, D, G = 100, 10, 50

# (model, workflow, draw, share of --trajectories): costlier cases run fewer
# trajectories so that every row takes seconds, not minutes; rates are per fit.
CASES = (
    ("ols", "discard", "auto", 1.0),
    ("ols", "discard", "data", 0.2),
    ("ols", "augment", "auto", 1.0),
    ("ols", "augment", "data", 0.2),
    ("ols", "subsample", "auto", 0.02),
    ("logistic", "discard", "auto", 0.02),
    ("logistic", "augment", "auto", 0.01),
    ("logistic", "subsample", "auto", 0.01),
)
REPEAT_BELOW_S = 5.0  # a first timed call longer than this is not repeated


def measure_calls(fn, repeats: int, *, compile_seconds=None, min_calls: int = 1,
                  probe=None) -> dict:
    """Call `fn()` `repeats` times, once if its first run is long, but at least `min_calls` times.

    Each call is timed in wall seconds (`time.perf_counter`) and process CPU
    seconds (`time.process_time`, all threads of this process: on a shared
    machine CPU / wall shows how much of the cores the call got).
    `compile_seconds(result)` says how much of a call's wall time was
    compilation (default 0); a first call whose remaining run time exceeds
    REPEAT_BELOW_S is not repeated beyond `min_calls` calls (2 gives a call
    that compiled nothing).  `probe`, if given, is a zero-argument
    factory of a context manager entered around every call; the value it
    yields is stored per call (used for peak memory).

    Returns a dict: ``result`` (the first call's), per-call lists ``wall``,
    ``cpu``, ``compile``, ``probe``; ``calls``; and ``run_s`` / ``run_cpu_s``:
    the median over the calls that compiled nothing, or, when only the first
    call ran and it compiled, its wall time minus its compile time (CPU: the
    same subtraction, an approximation flagged by ``run_cpu_approx``).
    """
    walls, cpus, comps, probes = [], [], [], []
    first = None
    while True:
        ctx = probe() if probe is not None else None
        rec = ctx.__enter__() if ctx is not None else None
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        comp = float(compile_seconds(out)) if compile_seconds is not None else 0.0
        walls.append(wall)
        cpus.append(cpu)
        comps.append(comp)
        probes.append(rec)
        if first is None:
            first = out
        n = len(walls)
        if n >= min_calls and (n >= repeats or walls[0] - comps[0] > REPEAT_BELOW_S):
            break
    clean = [i for i in range(len(walls)) if comps[i] == 0.0]
    if clean:
        run_s = statistics.median(walls[i] for i in clean)
        run_cpu = statistics.median(cpus[i] for i in clean)
    else:
        run_s = walls[0] - comps[0]
        run_cpu = max(cpus[0] - comps[0], 0.0)
    return {"result": first, "wall": walls, "cpu": cpus, "compile": comps, "probe": probes,
            "calls": len(walls), "run_s": run_s, "run_cpu_s": run_cpu,
            "run_cpu_approx": not clean}


def _median_time(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `fn()` over `repeats` calls (one if the first is long).

    Returns (seconds, first call's result).
    """
    m = measure_calls(fn, repeats)
    return m["run_s"], m["result"]


def time_engine(cfg: collapse_jax.SimulationConfig, repeats: int, *, min_calls: int = 1,
                probe=None) -> dict:
    """Engine timing with compilation excluded.

    The first call compiles (the driver caches the compiled block per static
    shape) and reports its compile time; further calls reuse the compiled
    program.  The run time is the median over the calls that compiled
    nothing, or the first call's wall time minus its compile time when it is
    the only call (see `measure_calls`, which also gives CPU times and
    `probe` values).
    """
    m = measure_calls(lambda: collapse_jax.simulate(cfg), repeats,
                      compile_seconds=lambda out: out.compile_time, min_calls=min_calls,
                      probe=probe)
    return {**m, "compile_s": m["compile"][0], "first_call_s": m["wall"][0],
            "first_call_cpu_s": m["cpu"][0]}


def _summary(cfg, baseline) -> collapse_jax.Summary:
    delta = baseline.thetas.astype(np.float64) - cfg.theta0_vector
    return collapse_jax.summarize(collapse_jax.block_moments(delta, baseline.ok))


def _max_z(a: collapse_jax.Summary, b: collapse_jax.Summary, min_count: int = 30) -> float:
    """Largest |ratio difference| / combined se over generations where both have min_count alive."""
    se = np.hypot(a.variance_ratio_se, b.variance_ratio_se)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(a.variance_ratio - b.variance_ratio) / se
    z = z[np.isfinite(z) & (a.count >= min_count) & (b.count >= min_count)]
    return float(z.max()) if z.size else float("nan")


def environment(removed: dict) -> dict:
    env = {k: os.environ.get(k) for k in REPORTED_ENV}
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import subprocess

    import jax
    import scipy

    try:
        git = subprocess.run(["git", "-C", str(_HERE.parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "git": git,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "jax": jax.__version__,
        "collapse_jax": collapse_jax.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load,
        "jax_devices": [str(dv) for dv in jax.devices()],
        "env": env,
        "openblas_env_removed_for_this_run": removed,
    }


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _fmt_ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x"


HEADER = (f"{'model':8} {'workflow':9} {'design':6} {'draw':5} {'dtype':7} {'R':>6} | "
          f"{'engine fits/s':>13} {'compile s':>9} | {'numpy fits/s':>12} {'eng/np':>8} | "
          f"{'loop R':>6} {'loop fits/s':>11} {'eng/loop':>9} | {'alive eng/np':>12} {'|z|max':>6}")


def _row_line(r: dict) -> str:
    return (f"{r['model']:8} {r['workflow']:9} {r['design']:6} {r['draw']:5} {r['dtype']:7} "
            f"{r['trajectories']:>6} | {_fmt_rate(r['engine_fits_per_s']):>13} "
            f"{r['engine_compile_s']:>9.2f} | {_fmt_rate(r['numpy_fits_per_s']):>12} "
            f"{_fmt_ratio(r['engine_over_numpy']):>8} | {r['loop_trajectories']:>6} "
            f"{_fmt_rate(r['loop_fits_per_s']):>11} {_fmt_ratio(r['engine_over_loop']):>9} | "
            f"{r['alive_engine']:>6.3f}/{r['alive_numpy']:<5.3f} "
            f"{r['max_z_engine_vs_numpy']:>6.2f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trajectories", type=int, default=None,
                   help="trajectories for the cheapest cases; others use a fixed share "
                        "(default 10000; --quick 1000)")
    p.add_argument("--loop-trajectories", type=int, default=None,
                   help="trajectories for the per-trajectory loop baseline (default 10; --quick 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default 3; --quick 1)")
    p.add_argument("--designs", default="fresh",
                   help="comma list of fresh,fixed (default fresh)")
    p.add_argument("--dtypes", default="float64",
                   help="comma list of float64,float32 (default float64)")
    p.add_argument("--quick", action="store_true",
                   help="1000 trajectories, 1 repeat, 3 loop trajectories")
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    p.add_argument("--keep-openblas-env", action="store_true",
                   help="do not remove OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE for this run")
    args = p.parse_args(argv)
    if args.trajectories is None:
        args.trajectories = 1_000 if args.quick else 10_000
    repeats = args.repeats or (1 if args.quick else 3)
    loop_r = args.loop_trajectories or (3 if args.quick else 10)
    designs = [s.strip() for s in args.designs.split(",") if s.strip()]
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]

    removed = json.loads(os.environ.get(_REEXEC_MARK, "{}"))
    env = environment(removed)
    print(f"collapse_jax benchmark  n={N} d={D} G={G}  {env['cpu']}  {env['cpu_count']} cores  "
          f"numpy {env['numpy']}  jax {env['jax']}  devices {env['jax_devices']}  git {env['git']}")
    print(f"load average at start: {env['load_average_at_start']}  "
          "(a shared machine makes rates noisy)")
    for k in OPENBLAS_VARS:
        if k in removed:
            print(f"{k}: was {removed[k]!r} in the environment; removed for this whole run "
                  "(engine and numpy alike; --keep-openblas-env keeps it)")
        elif os.environ.get(k) is not None:
            print(f"{k}: set to {os.environ[k]!r} (kept)")
        else:
            print(f"{k}: not set")
    others = {k: v for k, v in env["env"].items() if k not in OPENBLAS_VARS and v is not None}
    print(f"other threading variables: {others or 'none set'}")
    print(f"engine: median over {repeats} call(s) of those that compiled nothing (the first "
          f"compiles; alone, it counts minus its compile time); numpy: median of {repeats} "
          f"call(s); calls over {REPEAT_BELOW_S:.0f} s are "
          f"not repeated; loop: one call on {loop_r} trajectories")
    print()
    print(HEADER)
    print("-" * len(HEADER))

    rows = []
    loop_cache: dict[tuple, dict] = {}
    t_all = time.perf_counter()
    for dtype in dtypes:
        for design in designs:
            for model, workflow, draw, share in CASES:
                R = max(2, round(args.trajectories * share))
                cfg = collapse_jax.SimulationConfig(
                    model=model, workflow=workflow, design=design, n=N, d=D, generations=G,
                    trajectories=R, seed=0, dtype=dtype, draw=draw)
                fits = R * G
                eng = time_engine(cfg, repeats)
                np_s, base = _median_time(lambda cfg=cfg: simulate_vectorized(cfg), repeats)
                key = (model, workflow, design, dtype)
                if key not in loop_cache:
                    rl = min(loop_r, R)
                    lcfg = cfg.replace(trajectories=rl, draw="data")
                    t0 = time.perf_counter()
                    lres = simulate_loop(lcfg)
                    loop_cache[key] = {"trajectories": rl, "seconds": time.perf_counter() - t0,
                                       "alive": float(lres.ok[:, -1].mean())}
                loop = loop_cache[key]
                eng_rate = fits / eng["run_s"]
                np_rate = fits / np_s
                loop_rate = loop["trajectories"] * G / loop["seconds"]
                res = eng["result"]
                row = {
                    "model": model, "workflow": workflow, "design": design, "dtype": dtype,
                    "draw": "stats" if cfg.uses_sufficient_statistics else "data",
                    "n": N, "d": D, "generations": G, "trajectories": R,
                    "engine_block_size": res.block_size,
                    "engine_prng": getattr(cfg, "prng", None),
                    "engine_compile_s": eng["compile_s"],
                    "engine_first_call_s": eng["first_call_s"],
                    "engine_run_s": eng["run_s"],
                    "engine_calls": eng["calls"],
                    "engine_fits_per_s": eng_rate,
                    "numpy_run_s": np_s,
                    "numpy_fits_per_s": np_rate,
                    "engine_over_numpy": eng_rate / np_rate,
                    "loop_trajectories": loop["trajectories"],
                    "loop_run_s": loop["seconds"],
                    "loop_fits_per_s": loop_rate,
                    "engine_over_loop": eng_rate / loop_rate,
                    "alive_engine": float(res.summary.count[-1] / R),
                    "alive_numpy": float(base.ok[:, -1].mean()),
                    "alive_loop": loop["alive"],
                    "max_z_engine_vs_numpy": _max_z(res.summary, _summary(cfg, base)),
                }
                rows.append(row)
                print(_row_line(row), flush=True)
    total = time.perf_counter() - t_all
    print()
    print(f"total {total:.0f} s.  fits = trajectories x generations; eng/np and eng/loop are "
          "rate ratios from this run.  alive = share of trajectories whose 50 fits all succeeded.")

    record = {
        "benchmark": "collapse_jax engine vs numpy baselines",
        "command": [sys.executable, *sys.argv],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"n": N, "d": D, "generations": G, "trajectories": args.trajectories,
                     "loop_trajectories": loop_r, "repeats": repeats, "designs": designs,
                     "dtypes": dtypes, "quick": args.quick},
        "environment": env,
        "rows": rows,
        "total_s": total,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    main()
