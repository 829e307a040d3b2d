"""The thin driver: blocks of trajectories through one compiled kernel.

``simulate(config)`` runs ``config.trajectories`` trajectories in fixed-size
blocks, merges each block's float64 moment sums on the host in block order,
prints a progress line per block, and (with ``out=DIR``) keeps an atomic
checkpoint so that a killed run resumes to exactly the same final numbers.
With several devices (or processes, `jax.distributed`) D consecutive blocks
run at once, one per device, and are merged in the same block order
(`_scaling`, docs/scaling.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._compile import jit
from ._concurrency import check_workers, default_workers, in_order, max_workers
from ._config import SimulationConfig
from ._data import ModelParams
from ._engine import (
    FIRST_DISTINCT_FROM,
    BlockResult,
    StaticSpec,
    Trajectory,
    build_block,
    build_trajectories,
)
from ._io import atomic_write_bytes, environment, write_csv, write_json
from ._models import metric_names
from ._scaling import Layout
from ._statistics import (
    MetricSummary,
    Moments,
    Summary,
    merge_moments,
    summarize,
    summarize_metrics,
    zero_moments,
)

_COMPILED: dict[tuple, Any] = {}
_COMPILE_SECONDS: dict[tuple, float] = {}
_MAX_WORKERS: dict[tuple, int] = {}


def compile_count() -> int:
    """How many block kernels this process has compiled (for tests)."""
    return len(_COMPILED)


class SimulationResult(NamedTuple):
    config: SimulationConfig
    summary: Summary  # per-generation statistics (see `Summary`).
    failed_fits: np.ndarray  # (G,) int: fits that failed at generation g.
    newton_iterations: np.ndarray  # (G,) float: mean Newton steps per fit (0 for OLS).
    moments: Moments  # the merged float64 sums (for merging further runs).
    wall_time: float  # seconds, this call, including compilation.
    compile_time: float  # seconds spent compiling in this call.
    block_size: int
    devices: int = 1  # devices that ran blocks (all processes together).
    processes: int = 1  # JAX processes (jax.distributed) that took part.
    metrics: MetricSummary | None = None  # the model's per-generation metrics (metrics.csv).
    workers: int = 1  # blocks that ran at once on one device (threads; `simulate`).

    def rows(self) -> list[list[Any]]:
        """`summary.csv` rows (see `SUMMARY_COLUMNS`)."""
        s = self.summary
        return [
            [g + 1, int(s.count[g]), float(s.variance_ratio[g]), float(s.ci_low[g]),
             float(s.ci_high[g]), float(s.variance_ratio_se[g]), float(s.mse[g]),
             float(s.mse_se[g]), int(self.failed_fits[g]), float(self.newton_iterations[g])]
            for g in range(len(s.count))
        ]


SUMMARY_COLUMNS = (
    "generation", "trajectories", "variance_ratio", "ci_low", "ci_high", "variance_ratio_se",
    "mse", "mse_se", "failed_fits", "newton_iterations",
)
METRICS_COLUMNS = ("generation", "metric", "trajectories", "mean", "se", "ci_low", "ci_high")


def bytes_per_trajectory(config: SimulationConfig) -> int:
    """Device bytes one trajectory of a block holds (float64 statistics, data, pools)."""
    n, d, G = config.n, config.d, config.generations
    item = 4 if config.dtype == "float32" else 8
    p = config.parameter_dim
    per = 8 * G * (16 * p + 4 * p + 4)  # float64 features and outputs
    if not config.uses_sufficient_statistics:
        per += item * (n * d + 3 * n)  # one batch of data
        if config.workflow != "discard" and config.design == "fresh":
            per += 3 * item * G * n * (d + 1)  # the pool and its gathered/weighted copies
        elif config.workflow != "discard":
            per += 2 * item * G * n
        if config.workflow == "subsample" and n >= FIRST_DISTINCT_FROM:
            per += 4 * G * n  # the sampler's first-occurrence slots (int32)
    return per


def block_cap(config: SimulationConfig) -> int:
    """The largest block (a power of two) whose arrays fit the backend's block memory.

    CPU: ~256 MB (`bytes_per_trajectory`) and at most 2^14 trajectories.
    GPU/TPU: a quarter of the device's memory (``memory_stats()["bytes_limit"]``;
    16 GB assumed where it is not reported) and at most 2^17.  Measured on an
    H100 (64 GB usable; fits/s at n = 100, d = 10, G = 50): the CPU budget ran
    OLS subsample in blocks of 128 at 6.2e4 fits/s against 1.2e7 at 2^16, and
    OLS discard at 2^14 gave 1.2e8 against 3.8e8 at 2^17.
    """
    if jax.default_backend() == "cpu":
        budget, largest = 256 * 2**20, 2**14
    else:
        stats = jax.local_devices()[0].memory_stats() or {}
        budget, largest = stats.get("bytes_limit", 16 * 2**30) // 4, 2**17
    cap = min(max(1, budget // bytes_per_trajectory(config)), largest)
    return 1 << (cap.bit_length() - 1)


def default_block_size(config: SimulationConfig) -> int:
    """Trajectories per block: the run split into equal blocks of at most `block_cap`.

    The trajectories are split into the fewest blocks of at most the cap,
    but at least `default_workers` of them (two on a CPU with two or more
    cores, so that a small run of an expensive model still fills both; one
    on a GPU/TPU), of equal size, so the last block pads fewer than one
    trajectory per block (20 trajectories under a cap of 16 run as 2 blocks
    of 10, not 2 of 16).  Results do not depend on it (checkpoints record
    it: see `simulate`).
    """
    cap = block_cap(config)
    trajectories = max(1, config.trajectories)
    blocks = max(-(-trajectories // cap), min(default_workers(), trajectories))
    return -(-trajectories // blocks)


def _params(config: SimulationConfig, design_matrix) -> ModelParams:
    dt = jnp.dtype(config.dtype)
    chol = (np.linalg.cholesky(np.asarray(config.feature_cov)) if config.feature_cov is not None
            else np.eye(config.d))
    x = np.zeros((0, config.d)) if design_matrix is None else design_matrix
    return ModelParams(
        theta0=jnp.asarray(config.parameter_vector, dt),
        sigma=jnp.asarray(config.sigma, dt),
        feature_chol=jnp.asarray(chol, dt),
        design_matrix=jnp.asarray(x, dt),
        ridge_penalty=jnp.asarray(config.ridge_penalty, dt),
        n=jnp.asarray(config.n, jnp.int64),
    )


def _check_design(config: SimulationConfig, design_matrix) -> np.ndarray | None:
    if design_matrix is None:
        return None
    x = np.asarray(design_matrix, np.float64)
    if config.design != "fixed":
        raise ValueError("a design_matrix requires design='fixed'")
    if x.shape != (config.n, config.d):
        raise ValueError(f"design_matrix has shape {x.shape}, expected (n, d) = ({config.n}, {config.d})")
    if not np.all(np.isfinite(x)):
        raise ValueError("design_matrix has non-finite entries")
    if np.linalg.matrix_rank(x) < config.d:
        raise ValueError("design_matrix does not have full column rank")
    return x


def _spec(config: SimulationConfig, design_matrix) -> StaticSpec:
    b = config.block_size or default_block_size(config)
    return StaticSpec.from_config(config, b, design_matrix is not None)


def _compiled_block(spec: StaticSpec, params: ModelParams, layout: Layout | None = None):
    """The AOT-compiled block kernel: one device, or D blocks at once over `layout`'s mesh."""
    from . import _scaling

    sharded = layout is not None and layout.size > 1
    key = ("sharded", spec, layout.devices) if sharded else ("block", spec)
    if key not in _COMPILED:
        t0 = time.perf_counter()
        scalars = (jnp.asarray(0, jnp.int64), jnp.asarray(0, jnp.int64), jnp.asarray(1, jnp.int64))
        if sharded:
            mesh = layout.mesh
            fn = _scaling.shard_blocks(build_block(spec), mesh, spec.block_size)
            args = _scaling.abstract((*scalars, params), mesh)
            _COMPILED[key] = _scaling.compile_sharded(fn, args, layout.devices)
            _MAX_WORKERS[key] = 1
        else:
            lowered = jit(build_block(spec)).lower(*scalars, params)
            _COMPILED[key] = lowered.compile()
            _MAX_WORKERS[key] = max_workers(lowered)
        _COMPILE_SECONDS[key] = time.perf_counter() - t0
    return _COMPILED[key], key


def _block_runner(spec: StaticSpec, params: ModelParams, layout: Layout, seed: int, total: int):
    """``run(b) -> [BlockResult (numpy)] * D`` for blocks b .. b + D - 1, and the compile key.

    Thread-safe: `run` may be called from several threads at once (one
    device, at most `_concurrency.max_workers` of the kernel).
    """
    from . import _scaling

    compiled, key = _compiled_block(spec, params, layout)
    i64 = lambda v: np.asarray(v, np.int64)  # noqa: E731
    if layout.size == 1:
        seed_a, total_a = jnp.asarray(seed, jnp.int64), jnp.asarray(total, jnp.int64)

        def run(b: int) -> list[BlockResult]:
            res = compiled(seed_a, jnp.asarray(b * spec.block_size, jnp.int64), total_a, params)
            return [jax.device_get(res)]

        return run, key
    mesh = layout.mesh
    seed_a, total_a, params_r = _scaling.replicated((i64(seed), i64(total), params), mesh)
    shapes = jax.eval_shape(build_block(spec), i64(seed), i64(0), i64(total), params)

    def run(b: int) -> list[BlockResult]:
        start = _scaling.replicated(i64(b * spec.block_size), mesh)
        packed = _scaling.gather(compiled(seed_a, start, total_a, params_r))  # (D, K)
        return [_scaling.unpack(row, shapes) for row in packed]

    return run, key


def fingerprint(config: SimulationConfig, design_matrix=None) -> str:
    """A hash of everything that determines the numbers of a run."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    if design_matrix is not None:
        h.update(np.ascontiguousarray(design_matrix, np.float64).tobytes())
    return h.hexdigest()[:16]


# The modules whose source, with the config, fixes a run's numbers (see `code_hash`).
_NUMERIC_MODULES = (
    "_config", "_data", "_engine", "_estimators", "_models", "_random", "_small_linalg",
    "_statistics", "_driver", "_compile",
)


@functools.cache
def code_hash() -> str:
    """Hash of what, besides the config, fixes the numbers: the source of the numeric
    modules of collapse_jax and the jax and jaxlib versions (read once per process)."""
    import jaxlib

    here = Path(__file__).parent
    h = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__}".encode())
    for name in _NUMERIC_MODULES:
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()[:16]


def _load_checkpoint(path: Path, fp: str, force: bool, block_size: int):
    if not path.exists():
        return None
    with np.load(path) as z:
        if str(z["fingerprint"]) != fp:
            if force:
                return None
            raise ValueError(f"{path.parent} holds a run of a different configuration; "
                             "choose another output directory or pass force=True (--force)")
        code = str(z["code"]) if "code" in z.files else "none"
        if code != code_hash():
            if force:
                return None
            raise ValueError(
                f"{path.parent} was started by other collapse_jax code or another JAX version "
                f"(code hash {code}, now {code_hash()}): resuming would mix their numbers; "
                "choose another output directory or pass force=True (--force)")
        if int(z["block_size"]) != block_size:  # the default differs between backends
            if force:
                return None
            raise ValueError(
                f"{path.parent} was run in blocks of {int(z['block_size'])} trajectories and "
                f"this run uses {block_size} (the default block size depends on the backend, "
                "the device's memory and the CPU count; a config's explicit block_size does "
                "not): resume it "
                "where it was started, or pass force=True (--force) to start afresh")
        m = Moments(z["count"], z["sum"], z["outer"])
        return int(z["blocks_done"]), m, z["failed"], z["iterations"], z["metrics"]


def _save_checkpoint(path: Path, fp: str, block_size: int, blocks_done: int, m: Moments, failed,
                     iterations, metrics) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, fingerprint=fp, code=code_hash(), block_size=block_size,
             blocks_done=blocks_done, count=m.count,
             sum=m.sum, outer=m.outer, failed=failed, iterations=iterations, metrics=metrics)
    atomic_write_bytes(path, buf.getvalue())


def _resume(ckpt: Path | None, fp: str, force: bool, layout: Layout, block_size: int, G: int,
            d: int, k: int = 0):
    """(blocks done, Moments, failed, iterations, metric sums) to start from (d: parameter length).

    Process 0 reads the checkpoint (only it writes one); every other process
    gets an exact copy, or the refusal of a foreign checkpoint as its error.
    """
    from . import _scaling

    fresh = (0, zero_moments(G, d), np.zeros(G), np.zeros(G), np.zeros((G, 2, k)))
    if ckpt is None:
        return fresh
    if layout.processes == 1:
        return _load_checkpoint(ckpt, fp, force, block_size) or fresh
    loaded, error = None, None
    if _scaling.is_writer():
        try:
            loaded = _load_checkpoint(ckpt, fp, force, block_size)
        except ValueError as e:
            error = str(e)
    _scaling.agree(error, 0, "")
    first, m, f, it, met = loaded or fresh  # the block count travels as an (exact) float64
    first, m, f, it, met = _scaling.from_writer((np.float64(first), m, f, it, met))
    return int(first), Moments(*m), f, it, met


def _progress_line(done: int, total: int, rate: float, s: Summary) -> str:
    g = len(s.count)
    r, lo, hi = s.variance_ratio[-1], s.ci_low[-1], s.ci_high[-1]
    return (f"[collapse-jax] {done:,}/{total:,} trajectories  {rate:,.0f} traj/s  "
            f"ratio[g={g}] = {r:.4f} [{lo:.4f}, {hi:.4f}]")


def simulate(
    config: SimulationConfig,
    *,
    design_matrix: np.ndarray | None = None,
    progress: bool | Callable[[str], None] = False,
    out: str | Path | None = None,
    force: bool = False,
    devices: int | None = None,
    workers: int | None = None,
) -> SimulationResult:
    """Run ``config.trajectories`` trajectories and summarise them per generation.

    **Arguments:**

    - `config`: a validated `SimulationConfig`.
    - `design_matrix`: optional (n, d) array, the fixed design shared by every
      trajectory (requires ``design="fixed"``); by default each trajectory
      draws its own fixed design once.
    - `progress`: True prints one line per block to stderr; a callable gets
      the line instead.
    - `out`: directory for `summary.csv`, `coordinates.csv`, `run.json` and a
      resumable checkpoint (`checkpoint.npz`, rewritten atomically after every
      block; rerunning the same config resumes from it; a different config,
      or a checkpoint of other collapse_jax code or JAX (`code_hash`), is
      refused unless `force`, which starts afresh).
    - `devices`: devices per process that run blocks at once (default: every
      local device; a single process uses at most one per block).  Not part
      of the results: a checkpoint written with one count resumes with any
      other.  Under `jax.distributed` every process calls `simulate` with the
      same arguments; all return the result, only process 0 writes `out`.
    - `workers`: blocks run at once on one device, in threads of this process
      (`_concurrency`).  Default: `default_workers` (min(2, CPUs) on the CPU
      backend, where XLA runs part of every kernel on one thread; 1 on a
      GPU/TPU).  Fewer where concurrent blocks could deadlock in jaxlib's
      LAPACK kernels (`_concurrency.max_workers`: a kernel with a batched
      call jaxlib splits; the engine's make one call per problem, so none
      now), and one with several devices (`SimulationResult.workers` tells).
      Each block in flight holds its own buffers (`block_cap`).  Not part of
      the results, like `devices`.

    **Returns:** `SimulationResult`.

    Deterministic: the same config (and design) gives the same numbers for
    any block size up to float64 rounding of the merged sums (~1e-15
    relative), and bitwise-identical per-trajectory thetas.  For a given
    block size the merged sums do not depend on `devices` or the process
    count beyond what the backend guarantees (bitwise on CPU; see
    docs/scaling.md).  Excluded
    trajectories: at generation g only trajectories whose fits 1..g all
    succeeded count; failures are reported in `failed_fits`.
    """
    from . import _scaling

    _scaling.check_devices(devices)
    check_workers(workers)
    x = _check_design(config, design_matrix)
    spec = _spec(config, x)
    params = _params(config, x)
    G, p, R, B = config.generations, config.parameter_dim, config.trajectories, spec.block_size
    names = metric_names(config.model)
    n_blocks = math.ceil(R / B)
    fp = fingerprint(config, x)
    i64 = np.int64
    layout = _scaling.layout(devices, n_blocks, fp, lambda: _scaling.splitting_lapack_calls(
        jit(build_block(spec)).lower(i64(0), i64(0), i64(R), params)))
    D, writer = layout.size, _scaling.is_writer()
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress is True else (progress or None)
    say = say if writer else None

    ckpt = Path(out) / "checkpoint.npz" if out is not None else None
    first, moments, failed, iterations, metrics = _resume(ckpt, fp, force, layout, B, G, p,
                                                          len(names))
    if say and first:
        say(f"[collapse-jax] resuming after block {first}/{n_blocks}")

    t_start = time.perf_counter()
    run, ckey = _block_runner(spec, params, layout, config.seed, R)
    compile_time = _COMPILE_SECONDS.pop(ckey, 0.0)
    workers = min(default_workers() if workers is None else workers, _MAX_WORKERS.get(ckey, 1))
    t_run = time.perf_counter()
    starts = range(first, n_blocks, D)
    ran = in_order(run, starts, workers)
    try:
        for b0, results in zip(starts, ran, strict=True):
            # Blocks b0 .. b0 + D - 1 ran at once; merge them one by one in block order,
            # exactly the additions of a one-device, one-thread run (blocks >= n_blocks
            # are padding).
            for res in results[: n_blocks - b0]:
                moments = merge_moments(moments, res.moments)
                failed = failed + res.failed
                iterations = iterations + res.iterations
                metrics = metrics + res.metrics
            done_blocks = min(b0 + D, n_blocks)
            if ckpt is not None and writer:
                _save_checkpoint(ckpt, fp, B, done_blocks, moments, failed, iterations, metrics)
            if say:
                done = min(done_blocks * B, R)
                rate = (done - first * B) / max(time.perf_counter() - t_run, 1e-9)
                say(_progress_line(done, R, rate, summarize(moments)))
    finally:
        ran.close()  # on an error: cancels the blocks not started, waits for the running

    summary = summarize(moments)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_iter = np.where(summary.count > 0, iterations / np.maximum(summary.count, 1), 0.0)
    result = SimulationResult(
        config=config,
        summary=summary,
        failed_fits=failed.astype(np.int64),
        newton_iterations=mean_iter,
        moments=moments,
        wall_time=time.perf_counter() - t_start,
        compile_time=compile_time,
        block_size=B,
        devices=D,
        processes=layout.processes,
        workers=workers,
        metrics=summarize_metrics(names, summary.count, metrics),
    )
    if out is not None and writer:
        write_outputs(result, Path(out), fp, layout)
    return result


def write_outputs(result: SimulationResult, out: Path, fp: str,
                  layout: Layout | None = None) -> None:
    """`summary.csv`, `coordinates.csv`, `metrics.csv` (models with metrics) and `run.json`
    in `out` (atomic writes)."""
    s = result.summary
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, result.rows())
    from ._statistics import Z95

    met = result.metrics
    if met is not None and met.names:
        write_csv(out / "metrics.csv", METRICS_COLUMNS, [
            [g + 1, name, int(met.count[g]), float(met.mean[g, j]), float(met.se[g, j]),
             float(met.ci_low[g, j]), float(met.ci_high[g, j])]
            for g in range(len(met.count)) for j, name in enumerate(met.names)
        ])

    coord_rows = [
        [g + 1, j, float(s.coord_ratio[g, j]), float(s.coord_ratio[g, j] - Z95 * s.coord_ratio_se[g, j]),
         float(s.coord_ratio[g, j] + Z95 * s.coord_ratio_se[g, j]), float(s.coord_ratio_se[g, j]),
         float(s.mean[g, j])]
        for g in range(len(s.count)) for j in range(s.coord_ratio.shape[1])
    ]
    write_csv(out / "coordinates.csv",
              ("generation", "coordinate", "variance_ratio", "ci_low", "ci_high", "variance_ratio_se", "bias"),
              coord_rows)
    write_json(out / "run.json", {
        "config": result.config.to_dict(),
        "fingerprint": fp,
        "environment": environment(),
        "wall_time_s": result.wall_time,
        "compile_time_s": result.compile_time,
        "block_size": result.block_size,
        "scaling": {**(layout.record() if layout is not None else
                       {"processes": result.processes, "devices": result.devices}),
                    "workers": result.workers},
        "columns": {
            "variance_ratio": "trace ratio tr Cov(theta_g) / tr Cov(theta_1); per-coordinate ratios "
                              "are in coordinates.csv",
            "ci_low/ci_high": "95% delta-method interval, paired over trajectories",
            "mse": "mean of ||theta_g - theta0||^2 over trajectories (test MSE for isotropic features)",
            "failed_fits": "fits that failed at generation g; those trajectories are excluded from g on",
            "newton_iterations": "mean Newton steps per fit (0 for least squares)",
            "metrics.csv": "per-generation means of the model's metrics (gaussian: "
                           "||mu_g - mu0||^2, tr and det of Sigma_g relative to Sigma0, W2^2 "
                           "to the true law), with standard errors and 95% intervals; see "
                           "docs/universality.md",
        },
    })


def simulate_trajectories(
    config: SimulationConfig,
    indices: np.ndarray | None = None,
    *,
    design_matrix: np.ndarray | None = None,
    devices: int | None = None,
) -> Trajectory:
    """Per-trajectory paths (numpy) for the given global indices (default all).

    Identical, bit for bit, to the trajectories `simulate` reduces, whatever
    the block size.  Shapes: theta (B, G, d); flags (B, G).  `devices` as in
    `simulate`: the indices are split over that many devices per process
    (same paths, bit for bit); under `jax.distributed` every process passes
    the same indices and gets every path.
    """
    from . import _scaling

    _scaling.check_devices(devices)
    x = _check_design(config, design_matrix)
    if indices is None:
        indices = np.arange(config.trajectories)
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {indices.shape}")
    spec = _spec(config, x)
    params = _params(config, x)
    token = fingerprint(config, x) + hashlib.sha256(indices.tobytes()).hexdigest()
    seed = np.int64(config.seed)
    layout = _scaling.layout(devices, max(1, len(indices)), token, lambda: (
        _scaling.splitting_lapack_calls(jit(build_trajectories(spec)).lower(
            seed, indices, params))))
    if layout.size == 1:
        key = ("paths", spec, indices.shape)
        if key not in _COMPILED:
            _COMPILED[key] = jit(build_trajectories(spec))
        out = _COMPILED[key](jnp.asarray(seed), jnp.asarray(indices), params)
        return Trajectory(*jax.device_get(out))
    # Pad to a multiple of D with index 0 (computed, then dropped): fixed shapes per device.
    D = layout.size
    padded = np.zeros(-(-len(indices) // D) * D, np.int64)
    padded[: len(indices)] = indices
    mesh = layout.mesh
    key = ("paths", spec, padded.shape, layout.devices)
    seed_a, params_r = _scaling.replicated((seed, params), mesh)
    idx = _scaling.split(padded, mesh)
    if key not in _COMPILED:
        fn = _scaling.shard_paths(build_trajectories(spec), mesh)
        args = (_scaling.abstract(seed, mesh), _scaling.abstract(padded, mesh, split=True),
                _scaling.abstract(params, mesh))
        _COMPILED[key] = _scaling.compile_sharded(fn, args, layout.devices)
    out = _scaling.gather(_COMPILED[key](seed_a, idx, params_r))
    return Trajectory(*(np.asarray(a)[: len(indices)] for a in out))
