"""Time a sweep against the per-cell numpy loop of the original study, side by side.

    python benchmarks/bench_sweep.py [--numpy-trajectories R] [--quick] [--json PATH]

Kazdan et al. ran their linear-regression study as one numpy run per cell and
seed: a Python loop over model-fitting iterations with ``np.linalg.pinv`` per
fit (Accumulate refits on every batch so far).  This script takes a subset of
that grid (the cells of ``experiments/kazdan_linear.toml`` with d in {1, 10},
n in {32, 100}, sigma^2 = 1: 4 (n, d) pairs x 3 workflows = 12 cells, 100
generations, 100 trajectories each) and times

- the sweep: ``collapse_jax._sweep.run_sweep`` on those 12 cells in a fresh
  directory, one process, wall time including compilation (and, separately,
  without the compile time the cells report);
- the loop: ``numpy_baselines.simulate_loop`` (one trajectory and one
  generation at a time, ``np.linalg.pinv``) on each cell's config with
  `--numpy-trajectories` trajectories (default 10), scaled linearly to the
  sweep's 100 trajectories per cell (the loop's cost is exactly linear in
  trajectories: each is an independent Python loop).

and prints one row per cell and the total ratio loop / sweep for the same
total work (trajectories x generations x cells).  Timings are from whatever
else the machine is running at the time: say so when you quote them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import collapse_jax  # noqa: E402,F401  (turns on float64)
from collapse_jax._sweep import SweepConfig, read_records, run_sweep  # noqa: E402


def subset(quick: bool) -> SweepConfig:
    grid = {
        "model": "ols", "design": "fixed", "workflow": ["discard", "augment", "subsample"],
        "d": [1] if quick else [1, 10], "n": [32] if quick else [32, 100], "sigma2": 1,
        "generations": 100, "seed": 0,
    }
    return SweepConfig.from_dict({"name": "bench", "trajectories": 100, "grid": grid})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numpy-trajectories", type=int, default=10,
                   help="trajectories per cell actually run by the numpy loop (then scaled)")
    p.add_argument("--quick", action="store_true", help="d = 1, n = 32 only (3 cells)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    from numpy_baselines import simulate_loop

    sweep = subset(args.quick)
    R = sweep.trajectories
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_sweep(sweep, Path(tmp) / "out")
        sweep_wall = time.perf_counter() - t0
        records = {r["cell_id"]: r for r in read_records(Path(tmp) / "out" / "results.jsonl")}
    compile_s = sum(r["compile_time_s"] for r in records.values())

    rows = []
    numpy_total = 0.0
    for cell in sweep.cells:
        cfg = cell.config.replace(trajectories=args.numpy_trajectories, block_size=None)
        t0 = time.perf_counter()
        simulate_loop(cfg)
        t = (time.perf_counter() - t0) * R / args.numpy_trajectories
        numpy_total += t
        rec = records[cell.id]
        rows.append({"workflow": cell.config.workflow, "n": cell.config.n, "d": cell.config.d,
                     "numpy_loop_s": t, "sweep_cell_s": rec["wall_time_s"],
                     "sweep_cell_compile_s": rec["compile_time_s"]})

    G = sweep.cells[0].config.generations
    scale = R / args.numpy_trajectories
    print(f"{len(sweep.cells)} cells x {R} trajectories x {G} generations; numpy loop run on "
          f"{args.numpy_trajectories} trajectories per cell and scaled x{scale:g}")
    print(f"{'workflow':>10} {'n':>5} {'d':>4} {'numpy loop s':>13} {'sweep cell s':>13} "
          f"{'(compile s)':>12}")
    for r in rows:
        print(f"{r['workflow']:>10} {r['n']:>5} {r['d']:>4} {r['numpy_loop_s']:>13.2f} "
              f"{r['sweep_cell_s']:>13.2f} {r['sweep_cell_compile_s']:>12.2f}")
    run_only = sweep_wall - compile_s
    print(f"total: numpy loop {numpy_total:.1f} s; sweep {sweep_wall:.1f} s wall in one process "
          f"({compile_s:.1f} s of it compiling {len(sweep.shapes())} shapes, "
          f"{run_only:.1f} s running)")
    print(f"ratio numpy loop / sweep: {numpy_total / sweep_wall:.1f}x including compilation, "
          f"{numpy_total / max(run_only, 1e-9):.1f}x excluding it")
    if args.json:
        args.json.write_text(json.dumps({
            "cells": rows, "numpy_loop_total_s": numpy_total, "sweep_wall_s": sweep_wall,
            "sweep_compile_s": compile_s, "numpy_trajectories": args.numpy_trajectories,
            "trajectories_per_cell": R, "ratio_including_compile": numpy_total / sweep_wall,
            "ratio_excluding_compile": numpy_total / max(run_only, 1e-9),
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
