"""Scale-out: trajectory blocks sharded over devices and processes by JAX itself.

One run uses a one-axis device mesh over trajectories (axis ``"trajectories"``):
D devices of P processes (``jax.distributed``), N = D / P on each process.  A
*super-block* is D consecutive blocks of B trajectories; mesh position k runs
block ``s D + k`` of super-block s through the ordinary per-block kernel
(`build_block`, wrapped in `jax.shard_map`), so block b always holds global
trajectories ``b B .. b B + B - 1`` whatever D is.  Every process gathers the
D per-block `BlockResult`s (`multihost_utils.process_allgather`) and merges
them on the host in float64, in block order: exactly the additions a
one-device run makes.  See docs/scaling.md.

Every check that can fail runs before anything is compiled; checks that
depend on more than one process (device counts, the configuration) are agreed
through one all-gather, so that a bad option fails on every process with a
one-line `ValueError` instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._compile import jit

AXIS = "trajectories"


class Layout(NamedTuple):
    """The devices of one run, in mesh order (process-major, then device id)."""

    devices: tuple[Any, ...]  # the D jax devices; position k runs block s D + k.
    processes: int  # P: jax.process_count().
    per_process: int  # N = D / P devices on each process.

    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def mesh(self) -> Mesh:
        return Mesh(np.array(self.devices), (AXIS,))

    def record(self) -> dict[str, Any]:
        """What run.json says about the layout."""
        d = self.devices[0]
        return {"processes": self.processes, "devices": self.size,
                "devices_per_process": self.per_process, "platform": d.platform,
                "device_kind": d.device_kind}


# --------------------------------------------------------------------------
# Options and layout
# --------------------------------------------------------------------------


def check_devices(devices: Any) -> None:
    """`devices` is None (every local device) or a positive int; no JAX calls."""
    if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int)
                                or devices <= 0):
        raise ValueError(f"devices must be a positive integer, got {devices!r}")


def is_writer() -> bool:
    """Only process 0 writes outputs (checkpoint, CSVs, run.json) and prints progress."""
    return jax.process_index() == 0


def layout(devices: int | None, work: int, token: str,
           lapack_calls: Callable[[], list[str]] | None = None) -> Layout:
    """The devices to use, agreed by every process.

    **Arguments:**

    - `devices`: devices per process (None: all local devices).
    - `work`: number of blocks (or trajectories) to spread; a single process
      uses at most that many devices.
    - `token`: a string that must be the same on every process (the run's
      fingerprint): processes given different configurations are refused.
    - `lapack_calls`: returns the batched LAPACK calls of one device's
      program that jaxlib may split over its CPU thread pool
      (`splitting_lapack_calls`); asked only where that could deadlock
      (`cpu_safe_devices`).

    **Returns:** `Layout`; every process uses the same number of devices, the
    smallest any of them can.  Raises `ValueError` (on every process) when a
    process asks for more devices than it has, or processes disagree.
    """
    check_devices(devices)
    local = sorted(jax.local_devices(), key=lambda d: d.id)
    error = None
    if devices is not None and devices > len(local):
        error = (f"devices={devices} but this process sees {len(local)} "
                 f"{local[0].platform} device{'s' if len(local) > 1 else ''}")
    n = len(local) if devices is None else devices
    procs = jax.process_count()
    if procs == 1:
        if error:
            raise ValueError(error)
        n = cpu_safe_devices(max(1, min(n, work)), local[0].platform, lapack_calls)
        return Layout(tuple(local[:n]), 1, n)
    if error is None:
        n = cpu_safe_devices(n, local[0].platform, lapack_calls)
    digest = int.from_bytes(hashlib.sha256(token.encode()).digest()[:7], "little")
    rows = agree(error, digest, "processes were given different configurations", extra=n)
    n = int(rows[:, 2].min())
    by_process: dict[int, list[Any]] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    chosen = tuple(d for p in sorted(by_process) for d in by_process[p][:n])
    return Layout(chosen, procs, n)


def agree(error: str | None, value: int, mismatch: str, extra: int = 0) -> np.ndarray:
    """Collective check: raise on every process if any process failed or `value`s differ.

    `error` is this process's own problem (None if none); `value` an int63
    that must be equal everywhere; `extra` any int63 to share.  Every process
    must call this.  **Returns:** the (P, 3) int64 rows ``[failed, value,
    extra]`` of all processes.
    """
    from jax.experimental import multihost_utils

    row = np.array([error is not None, value, extra], np.int64)
    rows = np.asarray(multihost_utils.process_allgather(row))  # (P, 3)
    if error is not None:
        raise ValueError(error)
    bad = np.flatnonzero(rows[:, 0])
    if bad.size:
        raise ValueError(f"process {int(bad[0])} refused the run (see its error)")
    if np.any(rows[:, 1] != rows[0, 1]):
        raise ValueError(mismatch)
    return rows


# --------------------------------------------------------------------------
# jaxlib's CPU LAPACK kernels and the intra-op thread pool
# --------------------------------------------------------------------------

# jaxlib 0.10 (lapack_kernels.cc) splits a batched LAPACK call over XLA:CPU's
# intra-op thread pool when batch * flops >= this (its kMinWorkPerTask) and
# then blocks its thread until the pieces are done.  A device's program runs
# on a thread of that same pool, so when every pool thread runs a device that
# is inside such a call, nothing is left to run the pieces: a deadlock
# (measured: 2 CPU devices on 2 cores, d = 10, a Cholesky over 1,024 matrices
# per device hangs; 512 do not).
_LAPACK_MIN_WORK = 200_000


def intra_op_threads() -> int:
    """Threads in XLA:CPU's intra-op pool: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_safe_devices(n: int, platform: str, lapack_calls: Callable[[], list[str]] | None) -> int:
    """`n`, or fewer CPU devices where `n` could deadlock in jaxlib's LAPACK kernels.

    Only the CPU backend, only when `n` devices would occupy every intra-op
    thread, and only when `lapack_calls()` (one device's program) finds a
    call that jaxlib splits: then ``threads - 1`` devices, with a warning.
    """
    import warnings

    threads = intra_op_threads()
    if platform != "cpu" or n < 2 or threads < 2 or n < threads or lapack_calls is None:
        return n
    calls = lapack_calls()
    if not calls:
        return n
    safe = threads - 1
    warnings.warn(
        f"using {safe} of {n} CPU devices: with {threads} CPU threads, {n} devices running "
        f"{calls[0]} over large batches can deadlock in jaxlib's LAPACK kernels "
        "(docs/scaling.md); results do not depend on the device count",
        RuntimeWarning, stacklevel=4)
    return safe


def custom_call_operands(lowered) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(target, operand shapes) of every custom call of a lowered program, in order."""
    from jax.extend.mlir import ir

    found: list[tuple[str, list[tuple[int, ...]]]] = []

    def visit(op):
        if op.name == "stablehlo.custom_call":
            target = ir.StringAttr(op.attributes["call_target_name"]).value
            found.append((target, [tuple(ir.RankedTensorType(v.type).shape) for v in op.operands]))
        return ir.WalkResult.ADVANCE

    lowered.compiler_ir("stablehlo").operation.walk(visit)
    return found


def lapack_call_splits(target: str, shapes: list[tuple[int, ...]]) -> bool:
    """Whether jaxlib may split this custom call over threads (see `splitting_lapack_calls`)."""
    if not target.startswith("lapack_"):
        return False
    simple = "potrf" in target or "trsm" in target
    for shape in shapes:
        if len(shape) < 2:
            continue
        *batch, r, c = shape
        b = int(np.prod(batch)) if batch else 1
        if b > 1 and (not simple or b * r * c * max(r, c) >= _LAPACK_MIN_WORK):
            return True
    return False


def splitting_lapack_calls(lowered) -> list[str]:
    """Batched LAPACK custom calls of a lowered program that jaxlib may split over threads.

    Cholesky (``potrf``) and triangular solves (``trsm``) split when
    ``batch * r * c * max(r, c) >= 200,000`` (at least jaxlib's own flop
    estimate); any other LAPACK call (QR, SVD, eigen-decompositions...)
    counts whenever it is batched.
    """
    return [t for t, shapes in custom_call_operands(lowered) if lapack_call_splits(t, shapes)]


def from_writer(tree: Any) -> Any:
    """Process 0's value of a pytree of float64 numpy arrays, on every process (exact copy)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
    return unpack(np.asarray(multihost_utils.process_allgather(flat))[0], tree)


# --------------------------------------------------------------------------
# Sharded kernels
# --------------------------------------------------------------------------


def shard_blocks(block: Callable, mesh: Mesh, block_size: int) -> Callable:
    """``(seed, start, total, params) -> (D, K) float64``: D packed block results.

    Mesh position k runs ``block(seed, start + k * block_size, total,
    params)`` (the arguments are replicated) and returns its float64 result
    as one packed vector (`pack`), so that fetching a super-block is one
    all-gather.  No collectives inside: each device reduces its own block, the
    host merges.  ``check_vma=False`` because the kernel's scan carries start
    from replicated values (theta0) and become per-device; nothing in the body
    communicates.
    """

    def per_device(seed, start, total, params):
        k = jax.lax.axis_index(AXIS).astype(start.dtype)
        return pack(block(seed, start + k * block_size, total, params))[None]

    return jax.shard_map(per_device, mesh=mesh, in_specs=P(), out_specs=P(AXIS), check_vma=False)


def pack(tree: Any) -> jax.Array:
    """The leaves of a pytree of float64 arrays as one float64 vector (exact)."""
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def unpack(vector: np.ndarray, like: Any) -> Any:
    """Inverse of `pack`: a numpy pytree shaped like `like` (arrays or ShapeDtypeStructs)."""
    leaves, treedef = jax.tree.flatten(like)
    cuts = np.cumsum([int(np.prod(x.shape)) for x in leaves])[:-1]
    parts = np.split(np.asarray(vector), cuts)
    return treedef.unflatten([p.reshape(x.shape) for p, x in zip(parts, leaves, strict=True)])


def shard_paths(many: Callable, mesh: Mesh) -> Callable:
    """``(seed, indices (D m,), params) -> Trajectory``, indices split over the mesh."""
    return jax.shard_map(many, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(AXIS),
                         check_vma=False)


def replicated(tree: Any, mesh: Mesh) -> Any:
    """Host values as global arrays replicated over `mesh` (every process passes the same)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def split(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array as a global array split along axis 0 over `mesh`."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P(AXIS)), lambda idx: x[idx])


def abstract(tree: Any, mesh: Mesh, split: bool = False) -> Any:
    """`jax.ShapeDtypeStruct`s of a pytree, replicated (or `split` along axis 0) over `mesh`."""
    sharding = NamedSharding(mesh, P(AXIS) if split else P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                                      sharding=sharding), tree)


def gather(tree: Any) -> Any:
    """A pytree of (possibly multi-process) global arrays as numpy, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def compile_sharded(fn: Callable, args: Sequence[Any], devices: tuple[Any, ...]):
    """``jax.jit(fn).lower(*args).compile()`` with a partitioner that can compile it.

    Shardy (JAX's default partitioner) fails in jax 0.10 with "Unable to
    convert MHLO to StableHLO" on any program partitioned over 2+ devices
    that contains ``lax.mulhi``, which the default philox4x32 PRNG uses; such
    programs are lowered with the GSPMD partitioner instead (XLA then logs a
    deprecation warning).  Whether Shardy works is probed once per device set
    with a two-op program, so a fixed JAX uses Shardy again by itself.
    """
    with _partitioner(shardy=_shardy_compiles_mulhi(devices)):
        return jit(fn).lower(*args).compile()


@contextlib.contextmanager
def _partitioner(shardy: bool):
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", shardy and previous)
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


@functools.cache
def _shardy_compiles_mulhi(devices: tuple[Any, ...]) -> bool:
    if not jax.config.jax_use_shardy_partitioner:
        return False
    mesh = Mesh(np.array(devices), (AXIS,))
    f = jax.shard_map(lambda x: jax.lax.mulhi(x, x), mesh=mesh, in_specs=P(AXIS),
                      out_specs=P(AXIS))
    arg = jax.ShapeDtypeStruct((len(devices),), jnp.uint32, sharding=NamedSharding(mesh, P(AXIS)))
    try:
        with _quiet_stderr():  # XLA prints the MLIR diagnostic of the expected failure
            jax.jit(f).lower(arg).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


@contextlib.contextmanager
def _quiet_stderr():
    """Discard what C++ code writes to file descriptor 2 (Python's sys.stderr is untouched)."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------
# Multi-process runs
# --------------------------------------------------------------------------

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def process_options(coordinator_address: str | None, num_processes: int | None,
                    process_id: int | None, auto: bool = False,
                    environ: Any = os.environ) -> dict[str, Any] | None:
    """Validate the process options; the `jax.distributed.initialize` kwargs, or None.

    Missing options fall back to the environment variables
    ``JAX_COORDINATOR_ADDRESS`` (which JAX itself reads), ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``.  None means a single process (no distributed
    runtime): no option set, or ``num_processes == 1``.  `auto` asks JAX to
    detect whatever is unset from the cluster (SLURM, Open MPI, Cloud TPU,
    Kubernetes).  Pure: raises `ValueError` with one line, touches no JAX.
    """
    address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
    num = num_processes if num_processes is not None else _env_int(environ, "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int(environ, "JAX_PROCESS_ID")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise ValueError(f"num_processes must be a positive integer, got {num!r}")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        raise ValueError(f"process_id must be a non-negative integer, got {pid!r}")
    if (num is None) != (pid is None) and not auto:
        raise ValueError("give both --num-processes and --process-id, or neither "
                         "(--distributed lets JAX detect them on SLURM, Open MPI or a TPU slice)")
    if num is not None and pid is not None and pid >= num:
        raise ValueError(f"process_id must be below num_processes, got {pid} of {num}")
    if address is not None and not _ADDRESS.match(address):
        raise ValueError(f"coordinator address must be HOST:PORT, got {address!r}")
    if num == 1 and not auto:
        return None
    if num is None and address is None and not auto:
        return None
    if address is None and not auto:
        raise ValueError("a multi-process run needs --coordinator-address HOST:PORT "
                         "(process 0's host; or JAX_COORDINATOR_ADDRESS)")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def _env_int(environ: Any, name: str) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize(options: dict[str, Any] | None) -> None:
    """`jax.distributed.initialize(**options)` unless None or already initialised.

    Must run before anything touches a JAX backend (JAX's rule).
    """
    if options is None or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**options)
    except RuntimeError as e:  # e.g. called after a backend was initialised
        raise ValueError(f"jax.distributed.initialize failed: {e}".splitlines()[0]) from e


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """``--devices`` and the multi-process options of a subcommand."""
    g = parser.add_argument_group(
        "devices and processes",
        "Blocks run on every local device by default. For several processes (hosts), start the "
        "same command once per process with the process options, or with --distributed under "
        "SLURM, Open MPI or on a TPU slice (see docs/scaling.md). Results do not depend on these.")
    g.add_argument("--devices", type=int, default=None, metavar="N",
                   help="devices per process to use (default: all local devices)")
    g.add_argument("--workers", type=int, default=None, metavar="K",
                   help="blocks run at once on one device, in threads (default: min(2, CPUs) on "
                        "CPU, 1 on GPU/TPU; fewer where jaxlib's LAPACK could deadlock)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run, letting JAX detect unset options from the "
                        "cluster (SLURM, Open MPI, Cloud TPU, Kubernetes)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's address (default: $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, metavar="P",
                   help="number of processes (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process, 0 .. P-1 (default: $JAX_PROCESS_ID)")


def options_from_args(args) -> dict[str, Any] | None:
    """Validated `jax.distributed.initialize` options from parsed `add_arguments` options."""
    check_devices(args.devices)
    return process_options(args.coordinator_address, args.num_processes, args.process_id,
                           auto=args.distributed)
