"""``collapse-jax realdata``: iterated logistic / softmax regression on real data sets.

Dey & Donoho's Figures 2-5: a classifier is fitted on a real training split;
each later iteration is fitted on labels drawn from the previous model at the
*same* training features (a fixed design), by one of three workflows:

- ``discard``: iteration g + 1 is fitted on the n synthetic labels drawn
  from the model of iteration g alone;
- ``augment``: on the real labels and every synthetic batch so far (g + 1
  copies of X; the pooled fit uses the label averages with weight g + 1,
  which is the same likelihood as the explicit stacked data);
- ``subsample``: on n (x, y) pairs drawn without replacement from that pool
  of (g + 1) n pairs.

Iteration 1 is the fit on the real training labels (the same in every
trajectory).  Each iteration's model is scored on the real test split: mean
log-loss and accuracy.  Unlike the paper's single unseeded runs, R
label-resampling trajectories run at once (vmapped; ``lax.scan`` over
iterations; each fit warm-started at the previous iteration's estimate), so
every curve comes with its spread: the across-trajectory 2.5-97.5% quantile
band and the standard error of the mean.

Fits: two classes, the engine's Newton MLE (`logistic_newton`); more classes,
softmax regression by optax L-BFGS (`softmax_lbfgs`).  Both may carry a ridge
penalty (1/2) lambda ||beta||^2 on the summed log-likelihood, intercept
unpenalised (lambda = 1 is scikit-learn's ``LogisticRegression()`` default,
C = 1).  A failed fit (separable labels, non-convergence) ends its
trajectory: it is counted at that iteration and the trajectory is left out of
every later iteration's statistics (never averaged in as NaN).

Keys: trajectory r uses ``fold_in(key(seed), r)`` and iteration g
``fold_in(that, g)``, so a trajectory's path does not depend on the block
size, and the workflows share their random numbers (discard and augment draw
the same iteration-2 labels).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._compile import jit
from ._config import _choice, _finite, _positive_int
from ._datasets import BUILTIN, Dataset, load_csv, load_raw, split_dataset
from ._engine import _sample_without_replacement, trajectory_keys
from ._estimators import FitResult, logistic_newton
from ._io import atomic_write_bytes, environment, write_csv, write_json
from ._softmax import softmax_lbfgs, softmax_logits

WORKFLOWS = ("discard", "augment", "subsample")
PAPER_DATASETS = ("diabetes", "heart", "titanic", "wisconsin")  # Figures 2 and 4, in that order
BINARY_DATASETS = (*PAPER_DATASETS, "pima")
# Training splits that some hyperplane separates have no unpenalised MLE: these
# data sets default to scikit-learn's default penalty (C = 1).
DEFAULT_RIDGE = {"wisconsin": 1.0, "digits": 1.0}
DEFAULT_TRAJECTORIES = 1000
WARM_NEWTON_STEPS = 20  # Newton steps from the warm start before the retry from zero
MULTICLASS_TRAJECTORIES = 64  # an L-BFGS softmax fit costs ~100x a small Newton fit
CSV_COLUMNS = (
    "dataset",
    "workflow",
    "iteration",
    "trajectories",
    "failed_fits",
    "failed_total",
    "loss_mean",
    "loss_se",
    "loss_q025",
    "loss_q975",
    "loss_median",
    "accuracy_mean",
    "accuracy_se",
    "accuracy_q025",
    "accuracy_q975",
    "accuracy_median",
    "fit_iterations_mean",
)
COLORS = {"discard": "tab:red", "augment": "tab:blue", "subsample": "tab:green"}


@dataclasses.dataclass(frozen=True)
class RealDataConfig:
    """One real-data run: a workflow, its size and its fits.  Validated on construction.

    **Fields:** `workflow` (one of `WORKFLOWS`); `iterations` G >= 1 (model
    fits per trajectory, the first on the real labels); `trajectories` R;
    `ridge` lambda >= 0 (penalty on the summed log-likelihood, intercept
    free); `seed`; `block_size` trajectories per compiled call (default
    min(R, 256)); `max_fit_iterations` Newton or L-BFGS steps per fit
    (default 50 Newton, 500 L-BFGS).
    """

    workflow: str = "augment"
    iterations: int = 50
    trajectories: int = DEFAULT_TRAJECTORIES
    ridge: float = 0.0
    seed: int = 0
    block_size: int | None = None
    max_fit_iterations: int | None = None

    def __post_init__(self) -> None:
        _choice("workflow", self.workflow, WORKFLOWS)
        for name in ("iterations", "trajectories"):
            _positive_int(name, getattr(self, name))
        for name in ("block_size", "max_fit_iterations"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        ridge = _finite("ridge", self.ridge)
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
            0 <= self.seed < 2**32
        ):
            raise ValueError(f"seed must be an integer in [0, 2^32), got {self.seed!r}")
        if self.trajectories >= 2**32:
            raise ValueError("trajectories must be below 2^32")

    @property
    def block(self) -> int:
        return self.block_size or min(self.trajectories, 256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RealData(NamedTuple):
    """The traced inputs of a run (float64 designs with the intercept column first)."""

    x: jax.Array  # shape=(n, p), float64: training design.
    y: jax.Array  # shape=(n,), int32: real training labels.
    x_test: jax.Array  # shape=(m, p), float64.
    y_test: jax.Array  # shape=(m,), int32.
    ridge: jax.Array  # shape=(p,), float64: per-coefficient penalty (0 on the intercept).
    theta1: jax.Array  # shape=(p, K-1), float64: the fit on the real labels.


class Curves(NamedTuple):
    """Per-trajectory, per-iteration results (leading axes: trajectories)."""

    loss: jax.Array  # shape=(..., G), float64: mean test log-loss of theta_g (nats).
    accuracy: jax.Array  # shape=(..., G), float64: test accuracy of theta_g.
    converged: jax.Array  # shape=(..., G), bool: the fit at iteration g ran and succeeded.
    alive: jax.Array  # shape=(..., G), bool: every fit up to and including g succeeded.
    fit_iterations: jax.Array  # shape=(..., G), int32: Newton or L-BFGS steps.


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What fixes compiled shapes and code paths; data, ridge and seed are traced."""

    workflow: str
    n: int
    p: int
    classes: int
    iterations: int
    block_size: int
    max_fit_iterations: int

    @property
    def newton(self) -> bool:
        return self.classes == 2


def fit_model(spec: KernelSpec, x, targets, weights, theta_init, ridge) -> FitResult:
    """One (penalised) MLE: Newton for two classes, L-BFGS softmax otherwise.

    A Newton fit that fails from the warm start is retried from zero (see below).

    `targets` (n, K) class frequencies; `theta_init` (p, K-1).  Returns a
    `FitResult` whose theta has shape (p, K-1).
    """
    if spec.newton:
        y, start = targets[:, 1], theta_init[:, 0]
        # Newton without a line search can cycle when the warm start is far from the new
        # optimum (seen on wisconsin with ridge 1, where the fit from zero converges), so a
        # fit that has not converged from the warm start within WARM_NEWTON_STEPS (a warm
        # start near the optimum needs ~5) is retried from zero with the full budget.  A lane
        # that converged restarts at its own solution (one step) and keeps its first result.
        res = logistic_newton(x, y, weights, start,
                              min(spec.max_fit_iterations, WARM_NEWTON_STEPS), ridge)
        retry = logistic_newton(x, y, weights, jnp.where(res.converged, res.theta, 0.0),
                                spec.max_fit_iterations, ridge)
        theta = jnp.where(res.converged, res.theta, retry.theta)
        ok = res.converged | retry.converged
        its = res.iterations + jnp.where(res.converged, 0, retry.iterations)
        return FitResult(jnp.where(ok, theta, start)[:, None], its, ok)
    return softmax_lbfgs(x, targets, weights, theta_init, ridge, spec.max_fit_iterations)


def test_metrics(x_test: jax.Array, y_test: jax.Array, theta: jax.Array):
    """Mean log-loss (nats) and accuracy of theta (p, K-1) on (x_test (m, p), y_test (m,)).

    The predicted class is the arg-max of ``[0, x @ theta]`` (ties: the lower class).
    """
    logits = softmax_logits(x_test, theta)
    true = jnp.take_along_axis(logits, y_test[:, None], axis=1)[:, 0]
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - true)
    acc = jnp.mean((jnp.argmax(logits, axis=1) == y_test).astype(logits.dtype))
    return loss, acc


def sample_labels(key: jax.Array, x: jax.Array, theta: jax.Array) -> jax.Array:
    """Synthetic labels drawn from the model theta (p, K-1) at the rows of x: (n,), int32.

    Two classes: ``u < sigmoid(x.theta)`` as the engine draws them; more: categorical.
    """
    logits = softmax_logits(x, theta)
    if logits.shape[1] == 2:
        u = jax.random.uniform(key, (x.shape[0],), x.dtype)
        return (u < jax.nn.sigmoid(logits[:, 1])).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=1).astype(jnp.int32)


def build_trajectory(spec: KernelSpec):
    """Pure ``(key, data: RealData) -> Curves`` for one trajectory (G = spec.iterations).

    Iteration 1 is ``data.theta1`` (fitted once on the host: it is the same
    for every trajectory); iterations 2..G run in one ``lax.scan``.
    """
    n, G, K = spec.n, spec.iterations, spec.classes

    def run(key, data: RealData) -> Curves:
        dtype = data.x.dtype
        ones = jnp.ones((n,), dtype)
        onehot = jax.nn.one_hot(data.y, K, dtype=dtype)
        pool = jnp.zeros((G, n), jnp.int32).at[0].set(data.y)

        def body(carry, g):
            theta_prev, alive, counts, pool = carry
            ky, ks = jax.random.split(jax.random.fold_in(key, g))
            y_new = sample_labels(ky, data.x, theta_prev)
            new = jax.nn.one_hot(y_new, K, dtype=dtype)
            x, weights = data.x, ones
            if spec.workflow == "discard":
                targets = new
            elif spec.workflow == "augment":
                # g copies of X with label counts c: weights g, targets c / g (same likelihood).
                counts = counts + new
                gf = g.astype(dtype)
                targets, weights = counts / gf, gf * ones
            else:
                pool = pool.at[g - 1].set(y_new)
                idx = _sample_without_replacement(ks, n, g * n, G * n)
                x = data.x[idx % n]
                targets = jax.nn.one_hot(pool.reshape(G * n)[idx], K, dtype=dtype)
            # A trajectory whose fit failed is over; under vmap its lane would still run
            # every later fit to the step limit and hold up the block, so it refits the real
            # data instead (one step from theta1).  Its results are never used.
            x = jnp.where(alive, x, data.x)
            targets = jnp.where(alive, targets, onehot)
            weights = jnp.where(alive, weights, ones)
            res = fit_model(spec, x, targets, weights,
                            jnp.where(alive, theta_prev, data.theta1), data.ridge)
            converged = alive & res.converged
            alive = converged
            loss, acc = test_metrics(data.x_test, data.y_test, res.theta)
            return (res.theta, alive, counts, pool), (loss, acc, converged, alive,
                                                      res.iterations)

        init = (data.theta1, jnp.ones((), bool), onehot, pool)
        _, (loss, acc, conv, alive, its) = jax.lax.scan(body, init, jnp.arange(2, G + 1))
        loss1, acc1 = test_metrics(data.x_test, data.y_test, data.theta1)
        first = (loss1, acc1, jnp.ones((), bool), jnp.ones((), bool), jnp.zeros((), jnp.int32))
        return Curves(*(jnp.concatenate([f[None], r]) for f, r in
                      zip(first, (loss, acc, conv, alive, its), strict=True)))

    return run


def build_block(spec: KernelSpec):
    """``(seed, start, data) -> Curves`` for trajectories start .. start + block_size - 1."""
    run = build_trajectory(spec)

    def block(seed, start, data):
        idx = start + jnp.arange(spec.block_size, dtype=jnp.uint32)
        keys = trajectory_keys(seed, idx)
        return jax.vmap(run, (0, None))(keys, data)

    return block


class CurveStats(NamedTuple):
    """Per-iteration statistics of one metric over the trajectories alive there (numpy (G,))."""

    mean: np.ndarray
    se: np.ndarray  # standard error of the mean: sd / sqrt(count)
    q025: np.ndarray  # across-trajectory 2.5% quantile
    q975: np.ndarray  # 97.5% quantile
    median: np.ndarray


def curve_stats(values: np.ndarray, alive: np.ndarray) -> CurveStats:
    """`values` (R, G) over the trajectories with `alive` (R, G) at each iteration.

    Entries with no alive trajectory are NaN (the SE too with fewer than two).
    """
    G = values.shape[1]
    out = {k: np.full(G, np.nan) for k in CurveStats._fields}
    for g in range(G):
        v = values[alive[:, g], g]
        if v.size == 0:
            continue
        out["mean"][g] = v.mean()
        out["median"][g] = np.median(v)
        out["q025"][g], out["q975"][g] = np.quantile(v, [0.025, 0.975])
        if v.size > 1:
            out["se"][g] = v.std(ddof=1) / math.sqrt(v.size)
    return CurveStats(**out)


class WorkflowResult(NamedTuple):
    """One data set under one workflow (numpy; R trajectories, G iterations)."""

    config: RealDataConfig
    path: Curves  # each field (R, G)
    loss: CurveStats
    accuracy: CurveStats
    count: np.ndarray  # (G,) trajectories alive at g
    failed: np.ndarray  # (G,) fits that failed at g (trajectory alive before g)
    wall_time: float
    compile_time: float


def ridge_vector(ridge: float, p: int) -> np.ndarray:
    """Per-coefficient penalties (p,): `ridge` on every coefficient but the intercept (column 0)."""
    v = np.full(p, float(ridge))
    v[0] = 0.0
    return v


def fit_real(dataset: Dataset, ridge: float, max_fit_iterations: int | None = None) -> FitResult:
    """Iteration 1: the fit on the real training labels (numpy theta (p, K-1)), from zero."""
    spec = _spec(dataset, RealDataConfig(ridge=ridge, max_fit_iterations=max_fit_iterations,
                                         trajectories=1, iterations=1))
    x = jnp.asarray(dataset.x_train)
    targets = jax.nn.one_hot(jnp.asarray(dataset.y_train), spec.classes, dtype=x.dtype)
    res = _real_fit(spec)(x, targets, jnp.asarray(ridge_vector(ridge, spec.p)))
    return FitResult(np.asarray(res.theta), int(res.iterations), bool(res.converged))


@functools.lru_cache(maxsize=32)
def _real_fit(spec: KernelSpec):
    def fit(x, targets, ridge):
        zeros = jnp.zeros((spec.p, spec.classes - 1), x.dtype)
        return fit_model(spec, x, targets, jnp.ones(spec.n, x.dtype), zeros, ridge)

    return jit(fit)


def _spec(dataset: Dataset, config: RealDataConfig) -> KernelSpec:
    K = dataset.n_classes
    max_it = config.max_fit_iterations or (50 if K == 2 else 500)
    return KernelSpec(config.workflow, dataset.x_train.shape[0], dataset.x_train.shape[1], K,
                      config.iterations, config.block, max_it)


@functools.lru_cache(maxsize=32)
def _compiled_block(spec: KernelSpec, m: int):
    """The compiled block program for `spec` and m test rows (one compile per shape)."""
    f64, i32, u32 = jnp.float64, jnp.int32, jnp.uint32
    S = jax.ShapeDtypeStruct
    data = RealData(S((spec.n, spec.p), f64), S((spec.n,), i32), S((m, spec.p), f64),
                    S((m,), i32), S((spec.p,), f64), S((spec.p, spec.classes - 1), f64))
    return jit(build_block(spec)).lower(S((), u32), S((), u32), data).compile()


def run_workflow(dataset: Dataset, config: RealDataConfig, theta1: np.ndarray,
                 progress=None) -> WorkflowResult:
    """All R trajectories of one workflow on one data set, in fixed-size blocks.

    `theta1` (p, K-1) is the converged fit on the real labels (`fit_real`).
    One compiled program per (workflow, data shapes, block size); the last
    block is padded and its padding dropped.
    """
    t0 = time.perf_counter()
    spec = _spec(dataset, config)
    data = RealData(
        jnp.asarray(dataset.x_train, jnp.float64),
        jnp.asarray(dataset.y_train, jnp.int32),
        jnp.asarray(dataset.x_test, jnp.float64),
        jnp.asarray(dataset.y_test, jnp.int32),
        jnp.asarray(ridge_vector(config.ridge, spec.p)),
        jnp.asarray(theta1, jnp.float64),
    )
    seed = jnp.asarray(config.seed, jnp.uint32)
    compiled = _compiled_block(spec, dataset.x_test.shape[0])
    compile_time = time.perf_counter() - t0
    R, B = config.trajectories, spec.block_size
    parts = []
    for start in range(0, R, B):
        out = compiled(seed, jnp.asarray(start, jnp.uint32), data)
        keep = min(B, R - start)  # the last block's padding is dropped
        parts.append(Curves(*(np.asarray(a)[:keep] for a in out)))
        if progress:
            done = min(start + B, R)
            progress(f"[realdata] {dataset.name} {config.workflow}: {done}/{R} trajectories, "
                     f"{time.perf_counter() - t0:.1f}s")
    path = Curves(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))
    alive_before = np.concatenate([np.ones_like(path.alive[:, :1]), path.alive[:, :-1]], axis=1)
    failed = (alive_before & ~path.converged).sum(0)
    return WorkflowResult(
        config=config,
        path=path,
        loss=curve_stats(path.loss, path.alive),
        accuracy=curve_stats(path.accuracy, path.alive),
        count=path.alive.sum(0),
        failed=failed,
        wall_time=time.perf_counter() - t0,
        compile_time=compile_time,
    )


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``realdata`` options (see the module docstring)."""
    parser.description = (
        "Dey & Donoho's real-data experiments (Figures 2-5) as R label-resampling "
        "trajectories: iterated logistic (two classes, Newton MLE) or softmax (more classes, "
        "optax L-BFGS) regression on a real training split, discard vs augment vs subsample, "
        "scored on the real test split. Writes DIR/realdata.{png,pdf,csv,json}."
    )
    parser.add_argument(
        "--dataset", default="all", metavar="NAME[,NAME...]",
        help=f"built-in data sets: {', '.join(BUILTIN)}; 'all' = {', '.join(BINARY_DATASETS)} "
        "(the two-class ones; digits is the multiclass softmax experiment, ask for it by name)",
    )
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE",
                        help="your own data: a CSV with a header row and numeric features "
                        "(replaces --dataset)")
    parser.add_argument("--label-column", default=None,
                        help="label column of --csv (default: the last column)")
    parser.add_argument("--iterations", type=int, default=50,
                        help="model fits per trajectory, the first on the real labels (default 50)")
    parser.add_argument("--trajectories", type=int, default=None,
                        help=f"R per workflow (default {DEFAULT_TRAJECTORIES:,}; "
                        f"{MULTICLASS_TRAJECTORIES} for multiclass data)")
    parser.add_argument("--workflow", default=",".join(WORKFLOWS), metavar="W[,W...]",
                        help=f"workflows (default {','.join(WORKFLOWS)})")
    parser.add_argument("--ridge", type=float, default=None, metavar="LAMBDA",
                        help="ridge penalty (lambda/2)||beta||^2 on the summed log-likelihood, "
                        "intercept free (1 = scikit-learn's default C=1). Default 0, except 1 for "
                        f"{' and '.join(DEFAULT_RIDGE)} (separable training splits: no MLE)")
    parser.add_argument("--seed", type=int, default=0, help="label-resampling seed (default 0)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the 70/30 train/test split (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--block-size", type=int, default=None,
                        help="trajectories per compiled call (default min(R, 256)); "
                        "results do not depend on it")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _list(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    for v in items:
        _choice(what, v, tuple(allowed))
    if len(set(items)) != len(items):
        raise ValueError(f"--{what} names a value twice: {value}")
    return items


class _Plan(NamedTuple):
    dataset: Dataset
    ridge: float
    ridge_default: bool
    trajectories: int
    theta1: FitResult


def _plan(args: argparse.Namespace) -> list[_Plan]:
    """Validate everything, load the data and fit iteration 1, before any simulation."""
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    workflows = _list(args.workflow, WORKFLOWS, "workflow")
    if args.csv is not None:
        if args.dataset != "all":
            raise ValueError("give --csv or --dataset, not both")
        raws = {args.csv.stem: load_csv(args.csv, args.label_column)}
    else:
        if args.label_column is not None:
            raise ValueError("--label-column needs --csv")
        names = (list(BINARY_DATASETS) if args.dataset.strip() == "all"
                 else _list(args.dataset, BUILTIN, "dataset"))
        raws = {name: load_raw(name) for name in names}
    if args.ridge is not None and not (math.isfinite(args.ridge) and args.ridge >= 0):
        raise ValueError(f"--ridge must be a finite number >= 0, got {args.ridge}")
    plans = []
    for name, raw in raws.items():
        comps = BUILTIN[name].components if args.csv is None else None
        ds = split_dataset(name, raw, args.split_seed, args.test_fraction, comps)
        ridge = args.ridge if args.ridge is not None else DEFAULT_RIDGE.get(name, 0.0)
        R = args.trajectories or (DEFAULT_TRAJECTORIES if ds.n_classes == 2
                                  else MULTICLASS_TRAJECTORIES)
        for w in workflows:  # checks every field before anything is compiled
            RealDataConfig(workflow=w, iterations=args.iterations, trajectories=R, ridge=ridge,
                           seed=args.seed, block_size=args.block_size)
        first = fit_real(ds, ridge)
        if not first.converged:
            raise ValueError(
                f"{name}: the fit on the real training labels failed (ridge {ridge:g}; "
                "separable classes have no unpenalised MLE): pass --ridge, e.g. --ridge 1"
            )
        plans.append(_Plan(ds, ridge, args.ridge is None, R, first))
    return plans


def _plot(path_stem: Path, plans: list[_Plan], results: dict) -> None:
    """Loss (top) and accuracy (bottom) vs iteration, one column per data set."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    D = len(plans)
    fig = Figure(figsize=(max(3.0 * D, 4.5), 5.6), layout="constrained")
    axes = np.asarray(fig.subplots(2, D, squeeze=False))
    for j, plan in enumerate(plans):
        ds = plan.dataset
        failures = []
        for w, res in results[ds.name].items():
            G = res.config.iterations
            g = np.arange(1, G + 1)
            # Where few trajectories are left the survivors' mean says little: not drawn.
            shown = res.count >= min_alive(res.config.trajectories)
            for ax, st in ((axes[0, j], res.loss), (axes[1, j], res.accuracy)):
                lo, hi, mean = (np.where(shown, v, np.nan) for v in (st.q025, st.q975, st.mean))
                ax.fill_between(g, lo, hi, color=COLORS[w], alpha=0.18, lw=0)
                ax.plot(g, mean, color=COLORS[w], lw=1.4, label=w)
            total = int(res.failed.sum())
            if total:
                first = int(np.flatnonzero(res.failed)[0]) + 1
                failures.append(f"{w}: {total}/{res.config.trajectories} failed fits "
                                f"(first at it. {first}; {int(res.count[-1])} left)")
        fit = "Newton" if ds.n_classes == 2 else "L-BFGS softmax"
        ridge = f", ridge {plan.ridge:g}" if plan.ridge else ""
        axes[0, j].set_title(
            f"{ds.name} (n={ds.info['n_train']}, p={ds.x_train.shape[1]}, K={ds.n_classes})\n"
            f"{fit}{ridge}, R={plan.trajectories:,}", fontsize=9)
        if failures:
            axes[0, j].text(0.02, 0.98, "\n".join(failures), transform=axes[0, j].transAxes,
                            va="top", ha="left", fontsize=6.5, color="0.25")
        for ax in axes[:, j]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3, lw=0.5)
            ax.tick_params(labelsize=8)
        axes[1, j].set_xlabel("iteration", fontsize=9)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    # Minor ticks: label 2x and 5x only, so that wide ranges do not crowd.
    minor = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
    for ax in axes[0]:
        ax.set_yscale("log")  # discard's loss runs to ~10x the others' on a heavy right tail
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(minor)
        ax.tick_params(axis="y", which="minor", labelsize=6)
    axes[0, 0].set_ylabel("test log-loss (nats, log scale)", fontsize=9)
    axes[1, 0].set_ylabel("test accuracy", fontsize=9)
    axes[1, 0].fill_between([], [], [], color="0.5", alpha=0.25, lw=0,
                            label="2.5-97.5% of trajectories")
    axes[1, 0].legend(fontsize=7, loc="lower left", frameon=False)
    fig.suptitle("Iterated refitting on real data: mean of the trajectories alive,\n"
                 "band: 2.5-97.5% of them (drawn while at least max(20, R/20) are alive)",
                 fontsize=9)
    for fmt, dpi in (("png", 170), ("pdf", None)):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi)
        atomic_write_bytes(path_stem.with_suffix(f".{fmt}"), buf.getvalue())


def min_alive(trajectories: int) -> int:
    """Fewest trajectories still alive for an iteration to be drawn: max(20, R / 20), at most R."""
    return min(trajectories, max(20, trajectories // 20))


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def main(args: argparse.Namespace) -> int:
    """Run ``realdata``; bad input raises ValueError before any simulation is compiled."""
    t0 = time.perf_counter()
    plans = _plan(args)
    workflows = _list(args.workflow, WORKFLOWS, "workflow")
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results: dict[str, dict[str, WorkflowResult]] = {}
    for plan in plans:
        ds = plan.dataset
        results[ds.name] = {}
        for w in workflows:
            config = RealDataConfig(workflow=w, iterations=args.iterations,
                                    trajectories=plan.trajectories, ridge=plan.ridge,
                                    seed=args.seed, block_size=args.block_size)
            results[ds.name][w] = run_workflow(ds, config, plan.theta1.theta, say)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for plan in plans:
        for w, res in results[plan.dataset.name].items():
            failed_total = np.cumsum(res.failed)
            its = np.where(res.path.alive, res.path.fit_iterations, 0).sum(0)
            for i in range(res.config.iterations):
                L, A = res.loss, res.accuracy
                rows.append([
                    plan.dataset.name, w, i + 1, int(res.count[i]), int(res.failed[i]),
                    int(failed_total[i]),
                    float(L.mean[i]), float(L.se[i]), float(L.q025[i]), float(L.q975[i]),
                    float(L.median[i]),
                    float(A.mean[i]), float(A.se[i]), float(A.q025[i]), float(A.q975[i]),
                    float(A.median[i]),
                    float(plan.theta1.iterations) if i == 0  # the host fit on the real labels
                    else float(its[i] / res.count[i]) if res.count[i] else float("nan"),
                ])
    write_csv(out / "realdata.csv", CSV_COLUMNS, rows)
    _plot(out / "realdata", plans, results)

    G = args.iterations
    datasets = {}
    for plan in plans:
        ds = plan.dataset
        per_w = {}
        for w, res in results[ds.name].items():
            per_w[w] = {
                f"iteration_{G}": {
                    "trajectories": int(res.count[-1]),
                    "loss_mean": _f(res.loss.mean[-1]), "loss_se": _f(res.loss.se[-1]),
                    "loss_q025": _f(res.loss.q025[-1]), "loss_q975": _f(res.loss.q975[-1]),
                    "accuracy_mean": _f(res.accuracy.mean[-1]),
                    "accuracy_se": _f(res.accuracy.se[-1]),
                    "accuracy_q025": _f(res.accuracy.q025[-1]),
                    "accuracy_q975": _f(res.accuracy.q975[-1]),
                },
                "failed_fits_per_iteration": res.failed.astype(int).tolist(),
                "failed_fits_total": int(res.failed.sum()),
                "wall_time_seconds": res.wall_time,
                "compile_time_seconds": res.compile_time,
                "config": res.config.to_dict(),
            }
        r0 = next(iter(results[ds.name].values()))
        datasets[ds.name] = {
            "source": ds.source,
            "preprocessing": ds.info,
            "features": list(ds.feature_names),
            "fit": "logistic_newton" if ds.n_classes == 2 else "softmax_lbfgs (optax)",
            "ridge": plan.ridge,
            "ridge_is_dataset_default": plan.ridge_default,
            "trajectories": plan.trajectories,
            "iteration_1": {
                "loss": float(r0.loss.mean[0]),
                "accuracy": float(r0.accuracy.mean[0]),
                "fit_iterations": int(plan.theta1.iterations),
                "theta": np.asarray(plan.theta1.theta).tolist(),
            },
            "workflows": per_w,
        }
    manifest = {
        "command": "realdata",
        "arguments": {k: (str(v) if isinstance(v, Path) else v)
                      for k, v in vars(args).items() if k != "func"},
        "design": "fixed: synthetic labels are drawn at the training features of the real split",
        "statistics": "per iteration over the trajectories whose fits all succeeded so far: "
        "mean, standard error of the mean (sd/sqrt(count)), 2.5/97.5% quantiles, median",
        "keys": "trajectory r: fold_in(key(seed, philox4x32), r); iteration g: fold_in(., g)",
        "datasets": datasets,
        "wall_time_seconds": time.perf_counter() - t0,
        "environment": environment(),
        "outputs": ["realdata.csv", "realdata.png", "realdata.pdf", "realdata.json"],
    }
    write_json(out / "realdata.json", manifest)
    for plan in plans:
        name = plan.dataset.name
        r0 = next(iter(results[name].values()))
        line = [f"{name}: it.1 loss {r0.loss.mean[0]:.4f} acc {r0.accuracy.mean[0]:.3f};"]
        for w, res in results[name].items():
            line.append(f"{w} it.{G} loss {res.loss.mean[-1]:.4f} "
                        f"[{res.loss.q025[-1]:.4f}, {res.loss.q975[-1]:.4f}] "
                        f"acc {res.accuracy.mean[-1]:.3f} failed {int(res.failed.sum())};")
        print(" ".join(line))
    print(f"wrote {out}/realdata.{{png,pdf,csv,json}}: wall {time.perf_counter() - t0:.1f}s")
    return 0
