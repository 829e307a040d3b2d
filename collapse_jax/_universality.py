"""``collapse-jax universality``: variance ratios of every model against the limit process.

Dey & Donoho's universality claim: for any exponential-family model with an
asymptotically linear estimator, the variance ratio Var(theta_g) / Var(theta_1)
of each workflow converges as n -> infinity to the same number c_gg, computed
exactly by `collapse_jax._limit.limit_ratio`, whatever the model, the
Fisher information, the dimension and the estimator's efficiency.  This
command runs the finite-n engine for each (model, workflow) cell with a fresh
design (the point models have none) and the same n, d, G, R and seed, and
writes

- ``DIR/universality.csv``: one row per model, workflow and table
  generation: the finite-n ratio with its 95% interval and standard error,
  the exact limit, z = (ratio - limit) / se, the exact finite-n ratio where
  a closed form exists (`collapse_jax._theory.exact_variance_ratio`), the
  scaled error n E||theta_g - theta0||^2 with its limit c_gg tr V (V from
  `collapse_jax._theory.asymptotic_covariance`; for the median V =
  MEDIAN_EFFICIENCY I^{-1}, so the efficiency shows in the scale but not in
  the ratio), and the cumulative failed fits;
- ``DIR/universality.md``: the same as markdown tables;
- ``DIR/universality.png`` / ``.pdf``: per workflow, every model's ratio
  against g with 95% bands and the limit (top), and the relative deviation
  ratio / limit - 1 (bottom); exact finite-n curves dotted;
- ``DIR/universality.json``: arguments, configurations, wall and compile
  times per cell, environment;
- ``DIR/cells/<model>-<workflow>/``: each cell's `simulate` outputs and
  checkpoint (a killed run resumes cell by cell to the same numbers).

``--update-doc FILE`` also replaces the block between the markers
``<!-- universality-table:begin -->`` and ``<!-- universality-table:end -->``
in FILE (docs/universality.md) with the markdown.  Every file is written
atomically.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._config import MODELS, WORKFLOWS, SimulationConfig
from ._io import atomic_write_bytes, atomic_write_text, environment, write_csv, write_json
from ._limit import MEDIAN_EFFICIENCY, limit_exact

DEFAULTS = dict(n=1000, d=2, generations=(2, 5, 10, 20), trajectories=2000, seed=0,
                ridge_penalty=1.0)
BEGIN = "<!-- universality-table:begin -->"
END = "<!-- universality-table:end -->"
CSV_COLUMNS = (
    "model", "workflow", "generation", "n", "d", "trajectories", "variance_ratio", "ci_low",
    "ci_high", "variance_ratio_se", "limit", "z", "exact_finite_n", "n_mse", "n_mse_se",
    "n_mse_limit", "failed_fits",
)
COLORS = {"ols": "tab:blue", "logistic": "tab:orange", "poisson": "tab:green",
          "gaussian": "tab:red", "ridge": "tab:purple", "median": "tab:brown"}


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    import difflib

    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise ValueError(f"--{what} is empty")
    for s in items:
        if s not in allowed:
            hint = difflib.get_close_matches(s, allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown {what[:-1]} {s!r}{extra}; choose from {', '.join(allowed)}")
    if len(set(items)) != len(items):
        raise ValueError(f"--{what} has duplicates: {text}")
    return items


def _generations(text: str) -> tuple[int, ...]:
    try:
        gens = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(
            f"--generations must be a comma-separated list of integers, got {text!r}"
        ) from None
    if not gens or min(gens) < 1:
        raise ValueError(f"--generations must be positive integers, got {text!r}")
    return tuple(sorted(set(gens)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``universality`` options (see the module docstring)."""
    d = DEFAULTS
    parser.description = (
        "Universality table: the finite-n variance ratio Var(theta_g)/Var(theta_1) of every model "
        "(ols, logistic, poisson, gaussian, ridge, median) and workflow, with 95%% intervals, "
        "beside the exact Gaussian-process limit. Writes DIR/universality.{csv,md,png,pdf,json}."
    )
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated models (default: all six)")
    parser.add_argument("--workflows", default=",".join(WORKFLOWS),
                        help="comma-separated workflows (default: all four)")
    parser.add_argument("--n", type=int, default=d["n"],
                        help=f"points per batch (default {d['n']})")
    parser.add_argument("--d", type=int, default=d["d"], help=f"dimension (default {d['d']})")
    parser.add_argument("--generations", default=",".join(map(str, d["generations"])),
                        help="table generations, comma-separated; G = the largest "
                        "(default 2,5,10,20)")
    parser.add_argument("--trajectories", type=int, default=d["trajectories"],
                        help="trajectories per (model, workflow) cell "
                        f"(default {d['trajectories']})")
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--ridge-penalty", type=float, default=d["ridge_penalty"],
                        help="lambda of the ridge model (default 1)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="trajectories per compiled block")
    parser.add_argument("--update-doc", type=Path, default=None, metavar="FILE",
                        help=f"also rewrite the block between {BEGIN} and {END} in FILE")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


class Plan(NamedTuple):
    configs: list[SimulationConfig]  # one per (model, workflow), model-major
    generations: tuple[int, ...]  # table generations


def plan(args: argparse.Namespace) -> Plan:
    """Validate everything and build the configs, before anything is compiled."""
    models = _names(args.models, MODELS, "models")
    workflows = _names(args.workflows, WORKFLOWS, "workflows")
    gens = _generations(args.generations)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    if args.update_doc is not None:
        if not args.update_doc.is_file():
            raise ValueError(f"--update-doc {args.update_doc} is not a file")
        text = args.update_doc.read_text()
        if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
            raise ValueError(f"--update-doc {args.update_doc} needs one {BEGIN} ... {END} block")
    configs = [
        SimulationConfig(model=m, workflow=w, design="fresh", n=args.n, d=args.d,
                         generations=max(gens), trajectories=args.trajectories, seed=args.seed,
                         ridge_penalty=args.ridge_penalty, block_size=args.block_size)
        for m in models for w in workflows
    ]
    return Plan(configs, gens)


def cell_rows(res, generations: tuple[int, ...]) -> list[list[Any]]:
    """`CSV_COLUMNS` rows of one `simulate` result at the table generations."""
    from ._theory import asymptotic_covariance, exact_variance_ratio

    cfg, s = res.config, res.summary
    c = np.diag(limit_exact(cfg.workflow, cfg.generations))
    exact = exact_variance_ratio(cfg)
    tr_v = float(np.trace(asymptotic_covariance(cfg)))
    failed = np.cumsum(res.failed_fits)
    rows = []
    for g in generations:
        i = g - 1
        se = float(s.variance_ratio_se[i])
        z = (float(s.variance_ratio[i]) - float(c[i])) / se if se > 0 else math.nan
        rows.append([
            cfg.model, cfg.workflow, g, cfg.n, cfg.d, int(s.count[i]), float(s.variance_ratio[i]),
            float(s.ci_low[i]), float(s.ci_high[i]), se, float(c[i]), z,
            math.nan if exact is None else float(exact[i]), cfg.n * float(s.mse[i]),
            cfg.n * float(s.mse_se[i]), float(c[i]) * tr_v, int(failed[i]),
        ])
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return ""
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def markdown(rows: list[list[Any]], generations: tuple[int, ...], meta: dict[str, Any]) -> str:
    """The markdown tables of `rows` (`CSV_COLUMNS`)."""
    col = {name: i for i, name in enumerate(CSV_COLUMNS)}
    by = {(r[0], r[1], r[2]): r for r in rows}
    models = list(dict.fromkeys(r[0] for r in rows))
    workflows = list(dict.fromkeys(r[1] for r in rows))
    head = "| model | " + " | ".join(f"g = {g}" for g in generations) + " | max abs z |"
    rule = "|---|" + "---:|" * (len(generations) + 1)
    out = [
        f"Finite n = {meta['n']}, d = {meta['d']}, {meta['trajectories']:,} trajectories per cell "
        f"(seed {meta['seed']}, ridge penalty {meta['ridge_penalty']:g}, fresh design). "
        "Cells: variance ratio Var(theta_g)/Var(theta_1) +- the 95% half-width; "
        "**limit**: the exact Gaussian-process value c_gg; *exact finite n*: closed forms "
        "where they exist; z = (ratio - limit) / se.",
        "",
    ]
    for w in workflows:
        out += [f"#### {w}", "", head, rule]
        lim = [_fmt(by[(models[0], w, g)][col["limit"]], 4) for g in generations]
        out.append("| **limit** | " + " | ".join(lim) + " | |")
        for m in models:
            cells, zs = [], []
            for g in generations:
                r = by[(m, w, g)]
                half = r[col["ci_high"]] - r[col["variance_ratio"]]
                cells.append(f"{_fmt(r[col['variance_ratio']])} ± {_fmt(half)}"
                             if math.isfinite(half) else _fmt(r[col["variance_ratio"]]))
                if math.isfinite(r[col["z"]]):
                    zs.append(abs(r[col["z"]]))
            worst = f"{max(zs):.1f}" if zs else ""
            out.append(f"| {m} | " + " | ".join(cells) + f" | {worst} |")
            exact = [by[(m, w, g)][col["exact_finite_n"]] for g in generations]
            if all(math.isfinite(e) for e in exact) and m == "gaussian":
                values = " | ".join(_fmt(e, 4) for e in exact)
                out.append(f"| *{m}, exact finite n* | {values} | |")
        out.append("")
    g_last = generations[-1]
    out += [
        f"#### scale: n E‖θ_g − θ0‖² against the limit c_gg tr V (augment, g = {g_last})",
        "",
        "| model | efficiency tr V / tr I⁻¹ | n·MSE, g = 1 | limit tr V | "
        f"n·MSE, g = {g_last} | limit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    w_scale = "augment" if "augment" in workflows else workflows[0]
    for m in models:
        r = by.get((m, w_scale, g_last))
        if r is None:
            continue
        eff = MEDIAN_EFFICIENCY if m == "median" else 1.0
        r1 = meta["g1"].get(f"{m}/{w_scale}")
        n_mse1 = f"{_fmt(r1[0])} ± {_fmt(1.96 * r1[1])}" if r1 else ""
        tr_v = r1[2] if r1 else math.nan
        out.append(
            f"| {m} | {eff:.4f} | {n_mse1} | {_fmt(tr_v)} | "
            f"{_fmt(r[col['n_mse']])} ± {_fmt(1.96 * r[col['n_mse_se']])} | "
            f"{_fmt(r[col['n_mse_limit']])} |"
        )
    out.append("")
    return "\n".join(out)


def _plot(path_stem: Path, results: dict[tuple[str, str], Any], gens: tuple[int, ...]) -> None:
    """Ratio and relative deviation from the limit per workflow; PNG and PDF, atomically."""
    from matplotlib.figure import Figure

    from ._theory import exact_variance_ratio

    workflows = list(dict.fromkeys(w for _, w in results))
    fig = Figure(figsize=(3.0 * len(workflows), 5.6), layout="constrained")
    axes = fig.subplots(2, len(workflows), squeeze=False)
    for j, w in enumerate(workflows):
        top, bottom = axes[0, j], axes[1, j]
        G = next(r.config.generations for (m, ww), r in results.items() if ww == w)
        g = np.arange(1, G + 1)
        c = np.diag(limit_exact(w, G))
        top.plot(g, c, color="k", ls="--", lw=1.0, label="limit (exact)")
        bottom.axhline(0.0, color="k", ls="--", lw=1.0)
        for (m, ww), res in results.items():
            if ww != w:
                continue
            s, col = res.summary, COLORS.get(m, "0.4")
            top.fill_between(g, s.ci_low, s.ci_high, color=col, alpha=0.25, lw=0)
            top.plot(g, s.variance_ratio, color=col, lw=1.0, label=m)
            rel_lo, rel_hi = s.ci_low / c - 1, s.ci_high / c - 1
            bottom.fill_between(g, rel_lo, rel_hi, color=col, alpha=0.25, lw=0)
            bottom.plot(g, s.variance_ratio / c - 1, color=col, lw=1.0)
            idx = np.asarray(gens) - 1
            bottom.plot(g[idx], s.variance_ratio[idx] / c[idx] - 1, "o", ms=2.5, color=col)
            exact = exact_variance_ratio(res.config)
            if exact is not None and m == "gaussian":
                top.plot(g, exact, color=col, ls=":", lw=1.2, label=f"{m}, exact finite n")
                bottom.plot(g, exact / c - 1, color=col, ls=":", lw=1.2)
        top.set_title(w, fontsize=10)
        if w == "discard":
            from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

            for ax, axis in ((top, "x"), (top, "y"), (bottom, "x")):
                getattr(ax, f"set_{axis}scale")("log")
                sub = getattr(ax, f"{axis}axis")
                sub.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                sub.set_major_formatter(ScalarFormatter())
                sub.set_minor_formatter(NullFormatter())
        top.grid(alpha=0.3, lw=0.5)
        bottom.grid(alpha=0.3, lw=0.5)
        bottom.set_xlabel("generation $g$")
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel(r"$\mathrm{Var}(\theta_g)/\mathrm{Var}(\theta_1)$", fontsize=9)
    axes[1, 0].set_ylabel("ratio / limit − 1 (95% band)", fontsize=9)
    if any(m == "gaussian" and w == "discard" for m, w in results):
        axes[0, -1].plot([], [], color="0.3", ls=":", lw=1.2,
                         label="exact finite n (gaussian discard)")
    axes[0, -1].legend(fontsize=6, loc="best", frameon=False)
    any_res = next(iter(results.values())).config
    fig.suptitle(f"Universality of the variance ratio: finite n = {any_res.n}, d = {any_res.d}, "
                 f"{any_res.trajectories:,} trajectories per cell", fontsize=10)
    for fmt, dpi in (("png", 170), ("pdf", None)):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        atomic_write_bytes(path_stem.with_suffix(f".{fmt}"), buf.getvalue())


def update_doc(path: Path, table: str, command: str) -> None:
    """Replace the marked block of `path` with `table` (atomic write)."""
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = f"{BEGIN}\n<!-- generated by: {command} -->\n\n{table}\n{END}"
    atomic_write_text(path, head + block + tail)


def main(args: argparse.Namespace) -> int:
    """Run ``universality``; bad input raises ValueError before anything is compiled."""
    from ._driver import simulate
    from ._theory import asymptotic_covariance

    t0 = time.perf_counter()
    p = plan(args)
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], Any] = {}
    timing: dict[str, dict[str, float]] = {}
    for i, cfg in enumerate(p.configs):
        name = f"{cfg.model}-{cfg.workflow}"
        if say:
            say(f"[universality] {i + 1}/{len(p.configs)} {cfg.model} {cfg.workflow}: n={cfg.n}, "
                f"d={cfg.d}, G={cfg.generations}, {cfg.trajectories:,} trajectories")
        res = simulate(cfg, progress=False, out=out / "cells" / name)
        results[(cfg.model, cfg.workflow)] = res
        timing[name] = {"wall_s": res.wall_time, "compile_s": res.compile_time}
        if say:
            s = res.summary
            say(f"[universality]   ratio[g={cfg.generations}] = {s.variance_ratio[-1]:.4f} "
                f"[{s.ci_low[-1]:.4f}, {s.ci_high[-1]:.4f}], "
                f"failed fits {int(res.failed_fits.sum())}, "
                f"{res.wall_time:.1f}s (compile {res.compile_time:.1f}s)")
    rows = [row for res in results.values() for row in cell_rows(res, p.generations)]
    write_csv(out / "universality.csv", CSV_COLUMNS, rows)
    g1 = {
        f"{m}/{w}": (r.config.n * float(r.summary.mse[0]), r.config.n * float(r.summary.mse_se[0]),
                     float(np.trace(asymptotic_covariance(r.config))))
        for (m, w), r in results.items()
    }
    cfg0 = p.configs[0]
    meta = dict(n=cfg0.n, d=cfg0.d, trajectories=cfg0.trajectories, seed=cfg0.seed,
                ridge_penalty=cfg0.ridge_penalty, g1=g1)
    table = markdown(rows, p.generations, meta)
    atomic_write_text(out / "universality.md", table + "\n")
    _plot(out / "universality", results, p.generations)
    command = "collapse-jax universality " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("func", "command", "quiet", "out", "update_doc") and v is not None
    ) + f" --out {args.out}" + (f" --update-doc {args.update_doc}" if args.update_doc else "")
    if args.update_doc is not None:
        update_doc(args.update_doc, table, command)
    write_json(out / "universality.json", {
        "command": command,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k != "func"},
        "generations": p.generations,
        "configs": [c.to_dict() for c in p.configs],
        "wall_time_seconds": {"total": time.perf_counter() - t0, "cells": timing},
        "environment": environment(),
        "outputs": ["universality.csv", "universality.md", "universality.png", "universality.pdf",
                    "universality.json", "cells/"],
    })
    worst = max((abs(r[CSV_COLUMNS.index("z")]) for r in rows
                 if math.isfinite(r[CSV_COLUMNS.index("z")])), default=math.nan)
    print(f"wrote {out}/universality.{{csv,md,png,pdf,json}}: {len(results)} cells, "
          f"largest |z| vs the limit {worst:.2f}, wall {time.perf_counter() - t0:.1f}s")
    return 0
