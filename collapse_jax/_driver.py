"""The thin driver: blocks of trajectories through one compiled kernel.

``simulate(config)`` runs ``config.trajectories`` trajectories in fixed-size
blocks, merges each block's float64 moment sums on the host in block order,
prints a progress line per block, and (with ``out=DIR``) keeps an atomic
checkpoint so that a killed run resumes to exactly the same final numbers.
"""

from __future__ import annotations

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

from ._config import SimulationConfig
from ._data import ModelParams
from ._engine import BlockResult, StaticSpec, Trajectory, build_block, build_trajectories
from ._io import atomic_write_bytes, environment, write_csv, write_json
from ._statistics import Moments, Summary, merge_moments, summarize, zero_moments

_COMPILED: dict[tuple, Any] = {}
_COMPILE_SECONDS: dict[tuple, float] = {}


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


def bytes_per_trajectory(config: SimulationConfig) -> int:
    """Device bytes one trajectory of a block holds (float64 statistics, data, pools)."""
    n, d, G = config.n, config.d, config.generations
    item = 4 if config.dtype == "float32" else 8
    per = 8 * G * (16 * d + 4 * d + 4)  # float64 features and outputs
    if not config.uses_sufficient_statistics:
        per += item * (n * d + 3 * n)  # one batch of data
        if config.workflow != "discard" and config.design == "fresh":
            per += 3 * item * G * n * (d + 1)  # the pool and its gathered/weighted copies
        elif config.workflow != "discard":
            per += 2 * item * G * n
    return per


def default_block_size(config: SimulationConfig) -> int:
    """Trajectories per block: a power of two with the block's arrays within ~256 MB."""
    size = max(1, (256 * 2**20) // bytes_per_trajectory(config))
    size = min(size, 2**14, max(1, config.trajectories))
    return 1 << (size.bit_length() - 1) if size & (size - 1) else size


def _params(config: SimulationConfig, design_matrix) -> ModelParams:
    dt = jnp.dtype(config.dtype)
    chol = (np.linalg.cholesky(np.asarray(config.feature_cov)) if config.feature_cov is not None
            else np.eye(config.d))
    x = np.zeros((0, config.d)) if design_matrix is None else design_matrix
    return ModelParams(
        theta0=jnp.asarray(config.theta0_vector, dt),
        sigma=jnp.asarray(config.sigma, dt),
        feature_chol=jnp.asarray(chol, dt),
        design_matrix=jnp.asarray(x, dt),
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


def _compiled_block(spec: StaticSpec, params: ModelParams):
    key = ("block", spec)
    if key not in _COMPILED:
        t0 = time.perf_counter()
        fn = jax.jit(build_block(spec))
        args = (jnp.asarray(0, jnp.int64), jnp.asarray(0, jnp.int64), jnp.asarray(1, jnp.int64), params)
        _COMPILED[key] = fn.lower(*args).compile()
        _COMPILE_SECONDS[key] = time.perf_counter() - t0
    return _COMPILED[key], key


def fingerprint(config: SimulationConfig, design_matrix=None) -> str:
    """A hash of everything that determines the numbers of a run."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    if design_matrix is not None:
        h.update(np.ascontiguousarray(design_matrix, np.float64).tobytes())
    return h.hexdigest()[:16]


def _load_checkpoint(path: Path, fp: str, force: bool):
    if not path.exists():
        return None
    with np.load(path) as z:
        if str(z["fingerprint"]) != fp:
            if force:
                return None
            raise ValueError(f"{path.parent} holds a run of a different configuration; "
                             "choose another output directory or pass force=True (--force)")
        m = Moments(z["count"], z["sum"], z["outer"])
        return int(z["blocks_done"]), m, z["failed"], z["iterations"]


def _save_checkpoint(path: Path, fp: str, blocks_done: int, m: Moments, failed, iterations) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, fingerprint=fp, blocks_done=blocks_done, count=m.count, sum=m.sum, outer=m.outer,
             failed=failed, iterations=iterations)
    atomic_write_bytes(path, buf.getvalue())


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
      block; rerunning the same config resumes from it; a different config
      is refused unless `force`, which starts afresh).

    **Returns:** `SimulationResult`.

    Deterministic: the same config (and design) gives the same numbers for
    any block size up to float64 rounding of the merged sums (~1e-15
    relative), and bitwise-identical per-trajectory thetas.  Excluded
    trajectories: at generation g only trajectories whose fits 1..g all
    succeeded count; failures are reported in `failed_fits`.
    """
    x = _check_design(config, design_matrix)
    spec = _spec(config, x)
    params = _params(config, x)
    G, d, R, B = config.generations, config.d, config.trajectories, spec.block_size
    n_blocks = math.ceil(R / B)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if progress is True else (progress or None)

    t_start = time.perf_counter()
    compiled, ckey = _compiled_block(spec, params)
    compile_time = _COMPILE_SECONDS.pop(ckey, 0.0)
    fp = fingerprint(config, x)

    moments = zero_moments(G, d)
    failed = np.zeros(G)
    iterations = np.zeros(G)
    first = 0
    ckpt = Path(out) / "checkpoint.npz" if out is not None else None
    if ckpt is not None:
        loaded = _load_checkpoint(ckpt, fp, force)
        if loaded is not None:
            first, moments, failed, iterations = loaded
            if say and first:
                say(f"[collapse-jax] resuming after block {first}/{n_blocks}")

    seed = jnp.asarray(config.seed, jnp.int64)
    total = jnp.asarray(R, jnp.int64)
    t_run = time.perf_counter()
    for b in range(first, n_blocks):
        res: BlockResult = compiled(seed, jnp.asarray(b * B, jnp.int64), total, params)
        res = jax.device_get(res)
        moments = merge_moments(moments, res.moments)
        failed = failed + res.failed
        iterations = iterations + res.iterations
        if ckpt is not None:
            _save_checkpoint(ckpt, fp, b + 1, moments, failed, iterations)
        if say:
            done = min((b + 1) * B, R)
            rate = (done - first * B) / max(time.perf_counter() - t_run, 1e-9)
            say(_progress_line(done, R, rate, summarize(moments)))

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
    )
    if out is not None:
        write_outputs(result, Path(out), fp)
    return result


def write_outputs(result: SimulationResult, out: Path, fp: str) -> None:
    """`summary.csv`, `coordinates.csv` and `run.json` in `out` (atomic writes)."""
    s = result.summary
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, result.rows())
    from ._statistics import Z95

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
        "columns": {
            "variance_ratio": "trace ratio tr Cov(theta_g) / tr Cov(theta_1); per-coordinate ratios "
                              "are in coordinates.csv",
            "ci_low/ci_high": "95% delta-method interval, paired over trajectories",
            "mse": "mean of ||theta_g - theta0||^2 over trajectories (test MSE for isotropic features)",
            "failed_fits": "fits that failed at generation g; those trajectories are excluded from g on",
            "newton_iterations": "mean Newton steps per fit (0 for least squares)",
        },
    })


def simulate_trajectories(
    config: SimulationConfig,
    indices: np.ndarray | None = None,
    *,
    design_matrix: np.ndarray | None = None,
) -> Trajectory:
    """Per-trajectory paths (numpy) for the given global indices (default all).

    Identical, bit for bit, to the trajectories `simulate` reduces, whatever
    the block size.  Shapes: theta (B, G, d); flags (B, G).
    """
    x = _check_design(config, design_matrix)
    if indices is None:
        indices = np.arange(config.trajectories)
    indices = np.asarray(indices, np.int64)
    spec = _spec(config, x)
    params = _params(config, x)
    key = ("paths", spec, indices.shape)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(build_trajectories(spec))
    out = _COMPILED[key](jnp.asarray(config.seed, jnp.int64), jnp.asarray(indices), params)
    return Trajectory(*jax.device_get(out))
