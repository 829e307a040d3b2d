"""collapse-jax: batched Monte Carlo of model-collapse workflows and their Gaussian-process limit.

Every user error (unknown option, bad value, impossible configuration) is
reported as one line on stderr with exit code 2, before anything is compiled.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import numpy as np


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and a suggestion for mistyped options."""

    def error(self, message: str):  # noqa: D401 - argparse API
        if "unrecognized arguments" in message:
            known = [s for a in self._actions for s in a.option_strings]
            for a in self._actions:  # the subcommands' options too
                if isinstance(a, argparse._SubParsersAction):
                    for sub in a.choices.values():
                        known += [s for b in sub._actions for s in b.option_strings]
            for word in message.split(":", 1)[1].split():
                hint = difflib.get_close_matches(word.split("=")[0], known, n=1)
                if hint:
                    message += f" (did you mean {hint[0]}?)"
                    break
        raise SystemExit(_fail(f"{self.prog}: error: {message}"))


def _fail(line: str) -> int:
    print(line.replace("\n", " "), file=sys.stderr)
    return 2


def _add_simulate(sub) -> None:
    from . import _scaling
    from ._config import DESIGNS, DTYPES, MODELS, WORKFLOWS, SimulationConfig

    d = SimulationConfig()
    p = sub.add_parser(
        "simulate",
        help="run trajectories of one workflow and write per-generation statistics",
        description="Run R trajectories of one model-collapse workflow and write DIR/summary.csv "
        "(one row per generation), DIR/coordinates.csv and DIR/run.json. With no model options: "
        f"{d.model}, {d.workflow}, {d.design} design, n={d.n}, d={d.d}, G={d.generations}, "
        f"R={d.trajectories}.",
        allow_abbrev=False,
    )
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--workflow", choices=WORKFLOWS, default=d.workflow)
    p.add_argument("--design", choices=DESIGNS, default=d.design)
    p.add_argument("--n", type=int, default=d.n, help="points per batch")
    p.add_argument("--d", type=int, default=d.d, help="number of features")
    p.add_argument("--generations", type=int, default=d.generations)
    p.add_argument("--trajectories", type=int, default=d.trajectories)
    p.add_argument("--sigma", type=float, default=d.sigma,
                   help="label noise sd (ols, ridge); scale of the points (gaussian, median)")
    p.add_argument("--ridge-penalty", type=float, default=d.ridge_penalty,
                   help="lambda of --model ridge: minimises ||y - X theta||^2 + lambda ||theta||^2")
    p.add_argument("--theta0-scale", type=float, default=d.theta0_scale,
                   help="||theta0||; theta0 = scale * ones(d)/sqrt(d)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--draw", choices=("auto", "data"), default=d.draw,
                   help="auto: sample OLS sufficient statistics where exact; data: explicit (X, y)")
    p.add_argument("--design-matrix", type=Path, default=None,
                   help="a fixed design X (n x d) as .npy or .csv, shared by all trajectories")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--force", action="store_true",
                   help="overwrite an output directory that holds a different run")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _scaling.add_arguments(p)
    p.set_defaults(func=_run_simulate)


def _run_simulate(args) -> int:
    from . import _scaling
    from ._config import SimulationConfig
    from ._driver import simulate

    processes = _scaling.options_from_args(args)
    config = SimulationConfig(
        model=args.model, workflow=args.workflow, design=args.design, n=args.n, d=args.d,
        generations=args.generations, trajectories=args.trajectories, sigma=args.sigma,
        theta0_scale=args.theta0_scale, seed=args.seed, dtype=args.dtype,
        block_size=args.block_size, draw=args.draw, ridge_penalty=args.ridge_penalty,
    )
    x = None
    if args.design_matrix is not None:
        path = args.design_matrix
        if not path.exists():
            raise ValueError(f"design matrix file not found: {path}")
        x = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
    _scaling.initialize(processes)  # before anything touches a JAX backend
    res = simulate(config, design_matrix=x, progress=not args.quiet, out=args.out,
                   force=args.force, devices=args.devices, workers=args.workers)
    if not _scaling.is_writer():
        return 0
    s = res.summary
    print(f"wrote {args.out / 'summary.csv'}: variance ratio at g={config.generations}: "
          f"{s.variance_ratio[-1]:.4f} [{s.ci_low[-1]:.4f}, {s.ci_high[-1]:.4f}], "
          f"failed fits {int(res.failed_fits.sum())}, wall {res.wall_time:.1f}s "
          f"(compile {res.compile_time:.1f}s)"
          + (f", {res.devices} devices in {res.processes} processes" if res.processes > 1
             else f", {res.devices} devices" if res.devices > 1 else ""))
    return 0


# Subcommands that live in their own module: (name, module, help, add_arguments, main).
_MODULE_COMMANDS = (
    ("figure1", "_figure1",
     "reproduce Dey & Donoho's Figure 1 (Gaussian-process limit), exact and Monte Carlo",
     "add_arguments", "main"),
    ("sweep", "_sweep", "run a resumable parameter sweep declared in a TOML file",
     "add_arguments", "main"),
    ("plot", "_sweep", "faceted figures of a sweep directory, with theory overlaid",
     "add_plot_arguments", "plot_main"),
    ("realdata", "_realdata",
     "Dey & Donoho's real-data experiments (Figures 2-5) with R trajectories per workflow",
     "add_arguments", "main"),
    ("universality", "_universality",
     "variance ratios of every model and workflow against the Gaussian-process limit",
     "add_arguments", "main"),
)


def _add_module_commands(sub) -> None:
    import importlib

    for name, module, help_text, add, run in _MODULE_COMMANDS:
        mod = importlib.import_module(f".{module}", __package__)
        p = sub.add_parser(name, help=help_text, allow_abbrev=False)
        getattr(mod, add)(p)
        p.set_defaults(func=getattr(mod, run))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="collapse-jax", description=__doc__.splitlines()[0], allow_abbrev=False)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"collapse-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_simulate(sub)
    _add_module_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        return _fail(f"collapse-jax {args.command}: error: {e}")
    except KeyboardInterrupt:
        return _fail("collapse-jax: interrupted")


if __name__ == "__main__":
    sys.exit(main())
