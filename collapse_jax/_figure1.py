"""``collapse-jax figure1``: Dey & Donoho's Figure 1 from the Gaussian-process limit.

For the four workflows (discard, augment, subsample, subsample-replace) this
computes the variance ratio Var(U_g) / Var(U_1) of the limit process two
ways, exactly (`limit_exact`, covariance propagation) and by Monte Carlo
(`limit_monte_carlo`, all workflows in one compiled kernel on common random
numbers), optionally overlays the finite-n engine (`simulate`), and writes

- ``DIR/figure1.png``, ``DIR/figure1.pdf``: left, every workflow; right, the
  same without discard, with the pi^2/6 line.  Monte Carlo curves with 95%
  bands, exact curves dotted on top, finite-n points with 95% error bars.
- ``DIR/figure1.csv``: ``workflow, generation, variance_ratio, ci_low,
  ci_high, variance_ratio_se, exact, draws`` (4 G rows).
- ``DIR/figure1_finite_n.csv`` (with ``--finite-n``): the finite-n ratios
  with the exact limit alongside.
- ``DIR/figure1.json``: the manifest (configuration, versions, wall times,
  draws per workflow, the values at the last generation).

Every file is written atomically (temporary file + ``os.replace``).
Defaults reproduce the paper's figure: G = 100, 10^6 draws, d = 1, float64;
``--workers`` Monte Carlo blocks run at once, in threads (default min(2, CPUs)
on CPU, 1 on GPU/TPU; the numbers do not depend on it).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._config import MODELS, WORKFLOWS
from ._io import atomic_write_bytes, environment, write_csv, write_json
from ._limit import (
    _CHUNK,
    LimitConfig,
    LimitResult,
    limit_monte_carlo,
    limit_ratio,
)

DEFAULT_BLOCK = 62_500
CSV_COLUMNS = (
    "workflow",
    "generation",
    "variance_ratio",
    "ci_low",
    "ci_high",
    "variance_ratio_se",
    "exact",
    "draws",
)
FINITE_N_COLUMNS = (
    "workflow",
    "generation",
    "model",
    "n",
    "trajectories",
    "variance_ratio",
    "ci_low",
    "ci_high",
    "variance_ratio_se",
    "exact",
    "failed_fits",
)
COLORS = {
    "discard": "tab:red",
    "augment": "tab:blue",
    "subsample": "tab:green",
    "subsample-replace": "tab:purple",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``figure1`` options (see the module docstring)."""
    parser.description = (
        "Reproduce Dey & Donoho's Figure 1: variance ratios Var(U_g)/Var(U_1) of the "
        "Gaussian-process limit for the discard, augment, subsample and subsample-replace "
        "workflows, by Monte Carlo (with 95% bands) and exactly. "
        "Writes DIR/figure1.{png,pdf,csv,json}."
    )
    parser.add_argument("--generations", type=int, default=100, help="G (default 100)")
    parser.add_argument(
        "--draws",
        type=int,
        default=1_000_000,
        help="Monte Carlo draws per workflow (default 10^6; with --precision, the minimum)",
    )
    parser.add_argument(
        "--precision",
        type=float,
        default=None,
        metavar="P",
        help="keep drawing blocks until every ratio's 95%% half-width is below P x ratio",
    )
    parser.add_argument(
        "--max-draws",
        type=int,
        default=None,
        help="stop --precision at this many draws (default 2^32 - block size)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Monte Carlo blocks run at once, in threads (default: min(2, CPUs) on CPU, 1 on "
        "GPU/TPU); same results for any",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"draws per compiled call (default min({DEFAULT_BLOCK:,}, draws))",
    )
    parser.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="Monte Carlo arithmetic (moments are float64 either way)",
    )
    parser.add_argument(
        "--finite-n",
        type=int,
        default=None,
        metavar="N",
        help="overlay the finite-n engine with N points per batch (fresh design, d=1)",
    )
    parser.add_argument(
        "--model", choices=MODELS, default=None, help="finite-n model (default ols)"
    )
    parser.add_argument(
        "--finite-n-generations",
        type=int,
        default=None,
        help="generations of the finite-n overlay (default min(G, 10))",
    )
    parser.add_argument(
        "--finite-n-trajectories",
        type=int,
        default=None,
        help="trajectories per workflow of the finite-n overlay (default 4,000; logistic at n=2000 runs ~250 per second on 2 cores)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _configs(args: argparse.Namespace) -> tuple[LimitConfig, list[Any]]:
    """Validate everything and build the configs, before anything is compiled."""
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    if args.precision is not None and not (
        math.isfinite(args.precision) and 0 < args.precision < 1
    ):
        raise ValueError(f"--precision must be in (0, 1), got {args.precision}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {args.workers}")
    if args.max_draws is not None and args.precision is None:
        raise ValueError("--max-draws only applies with --precision")
    if args.max_draws is not None and args.max_draws < args.draws:
        raise ValueError(f"--max-draws ({args.max_draws}) is below --draws ({args.draws})")
    block = args.block_size
    if block is None:  # small runs: one block of whole chunks, not 62,500 mostly padding
        whole = -(-args.draws // _CHUNK) * _CHUNK
        block = min(DEFAULT_BLOCK, whole) if args.draws > 0 else DEFAULT_BLOCK
    config = LimitConfig(
        workflows=WORKFLOWS,
        generations=args.generations,
        d=1,
        draws=args.draws,
        seed=args.seed,
        block_size=block,
        dtype=args.dtype,
    )
    finite = []
    if args.finite_n is None:
        for flag in ("model", "finite_n_generations", "finite_n_trajectories"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --finite-n")
    else:
        from ._config import SimulationConfig

        gens = (
            args.finite_n_generations
            if args.finite_n_generations is not None
            else min(args.generations, 10)
        )
        if isinstance(gens, int) and gens > args.generations:
            raise ValueError(
                f"--finite-n-generations ({gens}) exceeds --generations ({args.generations})"
            )
        trajectories = (
            args.finite_n_trajectories if args.finite_n_trajectories is not None else 4_000
        )
        for workflow in WORKFLOWS:
            finite.append(
                SimulationConfig(
                    model=args.model or "ols",
                    workflow=workflow,
                    design="fresh",
                    n=args.finite_n,
                    d=1,
                    generations=gens,
                    trajectories=trajectories,
                    seed=args.seed,
                    dtype="float64",
                )
            )
    return config, finite


def _plot(
    path_stem: Path, result: LimitResult, exact: dict[str, np.ndarray], finite: dict[str, Any]
) -> None:
    """Render the two panels and write PNG and PDF atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    G = result.config.generations
    g = np.arange(1, G + 1)
    fig = Figure(figsize=(7.2, 3.1), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, workflows in ((left, WORKFLOWS), (right, WORKFLOWS[1:])):
        for w in workflows:
            s, c = result.summaries[w], COLORS[w]
            ax.fill_between(g, s.ci_low, s.ci_high, color=c, alpha=0.3, lw=0)
            ax.plot(g, s.variance_ratio, color=c, lw=1.3, label=w)
            ax.plot(g, exact[w], color="k", ls=":", lw=0.9)
            if w in finite:
                fs = finite[w].summary
                gf = np.arange(1, len(fs.variance_ratio) + 1)
                ax.errorbar(
                    gf,
                    fs.variance_ratio,
                    yerr=fs.variance_ratio - fs.ci_low,
                    fmt="o",
                    ms=2.5,
                    color=c,
                    mfc="white",
                    mew=0.8,
                    elinewidth=0.8,
                    capsize=1.5,
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_xlabel("generation $g$")
        ax.set_xlim(0, G + 1)
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    left.set_ylabel(r"variance ratio $\mathrm{Var}(U_g)/\mathrm{Var}(U_1)$", fontsize=9)
    left.set_title("all workflows", fontsize=10)
    right.set_title("zoom: without discard", fontsize=10)
    right.axhline(math.pi**2 / 6, color="0.3", ls="--", lw=1.0, label=r"$\pi^2/6$")
    # Legend entries for the line styles shared by every workflow.
    left.plot([], [], color="k", ls=":", lw=0.9, label="exact")
    left.fill_between([], [], [], color="0.5", alpha=0.3, lw=0, label="95% band (MC)")
    if finite:
        cfg = next(iter(finite.values())).config
        left.errorbar(
            [],
            [],
            yerr=[],
            fmt="o",
            ms=2.5,
            color="0.3",
            mfc="white",
            mew=0.8,
            label=f"finite n={cfg.n} ({cfg.model})",
        )
    left.legend(fontsize=7, loc="upper left", frameon=False)
    right.legend(fontsize=7, loc="best", frameon=False)
    fig.suptitle(
        f"Gaussian-process limit, {result.draws:,} Monte Carlo draws per workflow", fontsize=10
    )
    for fmt, dpi in (("png", 200), ("pdf", None)):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        atomic_write_bytes(path_stem.with_suffix(f".{fmt}"), buf.getvalue())


def main(args: argparse.Namespace) -> int:
    """Run ``figure1``; bad input raises ValueError before anything is compiled."""
    t0 = time.perf_counter()
    config, finite_configs = _configs(args)
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))

    t_exact = time.perf_counter()
    exact = {w: limit_ratio(w, config.generations) for w in WORKFLOWS}
    t_exact = time.perf_counter() - t_exact

    result = limit_monte_carlo(
        config,
        args.precision,
        max_draws=args.max_draws,
        progress=say or False,
        workers=args.workers,
    )

    finite: dict[str, Any] = {}
    if finite_configs:
        from ._driver import simulate

        for cfg in finite_configs:
            if say:
                say(f"[figure1] finite-n {cfg.model} n={cfg.n}: {cfg.workflow}")
            finite[cfg.workflow] = simulate(cfg, progress=say or False)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in WORKFLOWS:
        s = result.summaries[w]
        for i in range(config.generations):
            rows.append(
                [
                    w,
                    i + 1,
                    float(s.variance_ratio[i]),
                    float(s.ci_low[i]),
                    float(s.ci_high[i]),
                    float(s.variance_ratio_se[i]),
                    float(exact[w][i]),
                    int(s.count[i]),
                ]
            )
    write_csv(out / "figure1.csv", CSV_COLUMNS, rows)
    outputs = ["figure1.csv", "figure1.png", "figure1.pdf", "figure1.json"]
    if finite:
        rows = []
        for w, res in finite.items():
            s = res.summary
            for i in range(res.config.generations):
                rows.append(
                    [
                        w,
                        i + 1,
                        res.config.model,
                        res.config.n,
                        int(s.count[i]),
                        float(s.variance_ratio[i]),
                        float(s.ci_low[i]),
                        float(s.ci_high[i]),
                        float(s.variance_ratio_se[i]),
                        float(exact[w][i]),
                        int(res.failed_fits[i]),
                    ]
                )
        write_csv(out / "figure1_finite_n.csv", FINITE_N_COLUMNS, rows)
        outputs.insert(1, "figure1_finite_n.csv")
    _plot(out / "figure1", result, exact, finite)

    G = config.generations
    last = {
        w: {
            "variance_ratio": float(result.summaries[w].variance_ratio[-1]),
            "ci_low": float(result.summaries[w].ci_low[-1]),
            "ci_high": float(result.summaries[w].ci_high[-1]),
            "relative_halfwidth": float(result.summaries[w].relative_halfwidth[-1]),
            "exact": float(exact[w][-1]),
        }
        for w in WORKFLOWS
    }
    mc_run = result.wall_time - result.compile_time
    manifest = {
        "command": "figure1",
        "arguments": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
        },
        "limit_config": config.to_dict(),
        "precision": args.precision,
        "draws_per_workflow": {w: result.draws for w in WORKFLOWS},
        "blocks": result.blocks,
        "workers": result.workers,
        "common_random_numbers": "the four workflows share each draw's Z_g and C_g noises",
        "wall_time_seconds": {
            "total": time.perf_counter() - t0,
            "exact": t_exact,
            "monte_carlo": result.wall_time,
            "monte_carlo_compile": result.compile_time,
            "finite_n": {w: r.wall_time for w, r in finite.items()},
        },
        "monte_carlo_draws_per_second": result.draws / mc_run if mc_run > 0 else None,
        "worst_relative_halfwidth": result.worst_halfwidth,
        f"at_generation_{G}": last,
        "finite_n": [c.to_dict() for c in finite_configs] or None,
        "environment": environment(),
        "outputs": outputs,
    }
    write_json(out / "figure1.json", manifest)
    for w in WORKFLOWS:
        v = last[w]
        print(
            f"{w:>17}: ratio[g={G}] = {v['variance_ratio']:.4f} "
            f"[{v['ci_low']:.4f}, {v['ci_high']:.4f}]  exact {v['exact']:.4f}"
        )
    print(
        f"wrote {out}/figure1.{{png,pdf,csv,json}}: {result.draws:,} draws per workflow, "
        f"wall {time.perf_counter() - t0:.1f}s (compile {result.compile_time:.1f}s)"
    )
    return 0
