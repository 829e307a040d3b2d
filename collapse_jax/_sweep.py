"""Sweeps: a grid of simulation cells from one TOML file, streamed, resumable.

A sweep is a product grid over `SimulationConfig` fields (any field may be a
list) plus a few sweep-wide options.  ``load_sweep(path)`` parses and
validates it completely -- malformed TOML, unknown keys, impossible cells --
before anything is compiled; ``iter_sweep(sweep, out)`` runs the cells one by
one through `simulate` and yields a `CellResult` as each finishes, while

- appending one JSON record per finished cell to ``out/results.jsonl`` (one
  ``os.write`` of the whole line on an ``O_APPEND`` descriptor, then fsync, so
  a crash never leaves a torn record; a partial last line is ignored when
  read, and cut off before the next append);
- regenerating ``out/summary.csv`` (one row per cell and generation, the
  cell's grid parameters as columns, then `SUMMARY_COLUMNS`) atomically from
  ``results.jsonl``;
- keeping the running cell's checkpoint in ``out/cells/<cell id>/`` (the
  `simulate` checkpoint), so that rerunning after a kill skips the finished
  cells, resumes the interrupted one where it stopped and ends with exactly
  the numbers of an uninterrupted run.

``out/sweep.json`` holds the sweep and its hash: a different sweep pointed at
the same directory is refused unless ``force``.  Cells with equal static
shapes (`StaticSpec`) share one compiled kernel and run consecutively.  See
``docs/sweeps.md`` for the file format.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ._config import SimulationConfig
from ._driver import (
    SUMMARY_COLUMNS,
    block_cap,
    bytes_per_trajectory,
    code_hash,
    fingerprint,
)
from ._io import write_csv, write_json

_FIELDS = tuple(f.name for f in dataclasses.fields(SimulationConfig))
# Grid keys: every SimulationConfig field but `trajectories` (a sweep option), plus sigma2.
GRID_KEYS = tuple(k for k in _FIELDS if k != "trajectories") + ("sigma2",)
# Sweep-wide options (top level of the TOML file).
OPTION_KEYS = (
    "name", "description", "trajectories", "precision", "max_trajectories", "skip_invalid",
)
_TOP_KEYS = OPTION_KEYS + ("grid",)
# Fields whose single value is itself a list: a list of those is a list of values.
_VECTOR_DEPTH = {"theta0": 1, "feature_cov": 2}
# Keys that never become summary.csv columns: they do not change the numbers.
_SILENT = ("block_size",)


def _did_you_mean(key: str, allowed) -> str:
    hint = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _depth(value: Any) -> int:
    d = 0
    while isinstance(value, list):
        if not value:
            return d + 1
        value = value[0]
        d += 1
    return d


def _values(key: str, raw: Any) -> tuple[Any, ...]:
    """A grid entry as a tuple of values (a scalar is one value)."""
    if isinstance(raw, dict):
        raise ValueError(f"grid.{key} must be a value or a list of values, not a table")
    base = _VECTOR_DEPTH.get(key, 0)
    depth = _depth(raw)
    if depth == base:
        return (raw,)
    if depth != base + 1:
        kind = {0: "a value", 1: "a list of numbers", 2: "a list of rows"}[base]
        raise ValueError(f"grid.{key} must be {kind} or a list of them, got {raw!r}")
    if not raw:
        raise ValueError(f"grid.{key} is an empty list")
    return tuple(raw)


class Cell(NamedTuple):
    """One point of the grid."""

    index: int  # position in grid order (the product in the order the keys are written)
    id: str  # fingerprint of `config`: names DIR/cells/<id>/ and the results.jsonl record
    params: dict[str, Any]  # grid key -> value as written (sigma2 stays sigma2)
    config: SimulationConfig  # what the first round runs (block_size fixed, see `SweepConfig`)


class CellResult(NamedTuple):
    """A finished cell: per-generation rows in `SUMMARY_COLUMNS` order."""

    cell: Cell
    rows: list[list[Any]]  # G rows, SUMMARY_COLUMNS; None where undefined (written blank)
    trajectories: int  # trajectories run (grows past `trajectories` under a precision target)
    wall_time: float  # seconds the run that finished this cell spent on it (after any resume)
    from_store: bool  # True: read back from results.jsonl (finished by an earlier run)

    def column(self, name: str) -> np.ndarray:
        """One summary column over generations, shape (G,), float64 (NaN where undefined)."""
        j = SUMMARY_COLUMNS.index(name)
        return np.asarray([np.nan if r[j] is None else r[j] for r in self.rows], np.float64)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep: a product grid of `SimulationConfig` cells.  Validated on construction.

    **Fields:**

    - `grid`: ``((key, values), ...)`` in the written order; keys are
      `SimulationConfig` fields except ``trajectories``, or ``sigma2`` (label
      noise variance: sigma = sqrt(sigma2); not together with ``sigma``).  The
      cells are the product of the values, first key outermost.
    - `trajectories`: trajectories per cell (with `precision`: per round).
    - `precision`: optional target for the 95% half-width of the last
      generation's variance ratio, relative to the ratio: a cell keeps adding
      new trajectories (fresh global indices, merged moments) until it is met
      or `max_trajectories` is reached.
    - `max_trajectories`: the cap for `precision` (required with it).
    - `skip_invalid`: skip cells that `SimulationConfig` rejects (such as OLS
      with n < d + 2) instead of refusing the sweep.  A value for which every
      cell is impossible is an error either way.
    - `name`, `description`: free text for records and plots.

    Each cell's block size is fixed up front (the grid's ``block_size`` if
    given, else ``min(trajectories, block_cap)``), so that cells of
    equal shape share one compiled kernel; under `precision` the trajectory
    counts are rounded up to whole blocks.
    """

    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    trajectories: int = 1000
    precision: float | None = None
    max_trajectories: int | None = None
    skip_invalid: bool = False
    name: str = ""
    description: str = ""
    cells: tuple[Cell, ...] = dataclasses.field(init=False, repr=False, compare=False)
    skipped: tuple[tuple[dict[str, Any], str], ...] = dataclasses.field(init=False, repr=False,
                                                                      compare=False)

    def __post_init__(self) -> None:
        t = self.trajectories
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ValueError(f"trajectories must be a positive integer, got {t!r}")
        if not isinstance(self.skip_invalid, bool):
            raise ValueError(f"skip_invalid must be true or false, got {self.skip_invalid!r}")
        for key in ("name", "description"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string, got {getattr(self, key)!r}")
        if self.precision is not None:
            p = self.precision
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
                raise ValueError(f"precision must be a number in (0, 1), got {p!r}")
            m = self.max_trajectories
            if m is None:
                raise ValueError("precision needs max_trajectories (the cap per cell)")
            if isinstance(m, bool) or not isinstance(m, int) or m < t:
                raise ValueError(
                    f"max_trajectories must be an integer >= trajectories ({t}), got {m!r}")
        elif self.max_trajectories is not None:
            raise ValueError("max_trajectories only applies with precision")
        cells, skipped = self._build_cells()
        object.__setattr__(self, "cells", cells)
        object.__setattr__(self, "skipped", skipped)

    # -- construction ------------------------------------------------------
    def _build_cells(self):
        keys = [k for k, _ in self.grid]
        for k in keys:
            if k not in GRID_KEYS:
                if k == "trajectories":
                    raise ValueError("trajectories is a sweep option (per cell): write it at the "
                                     "top level, before [grid]")
                raise ValueError(f"unknown grid key {k!r}{_did_you_mean(k, GRID_KEYS)}")
        if len(set(keys)) != len(keys):
            raise ValueError("a grid key appears twice")
        if "sigma" in keys and "sigma2" in keys:
            raise ValueError("give sigma or sigma2 in [grid], not both")
        values = [vals for _, vals in self.grid]
        good: list[tuple[dict[str, Any], SimulationConfig]] = []
        bad: list[tuple[dict[str, Any], str]] = []
        for combo in itertools.product(*values):
            params = dict(zip(keys, combo))
            try:
                good.append((params, self._config(params)))
            except ValueError as e:
                bad.append((params, str(e)))
        varying = [k for k, v in self.grid if len(v) > 1]

        def label(params):
            return ", ".join(f"{k}={params[k]!r}" for k in (varying or keys)) or "the only cell"

        if not good:
            raise ValueError(f"no cell is possible: {bad[0][1]}")
        # A value no cell can use is a mistake, not a combination to skip.
        for key, vals in self.grid:
            for v in vals:
                if not any(p[key] == v and type(p[key]) is type(v) for p, _ in good):
                    why = next(e for p, e in bad if p[key] == v)
                    raise ValueError(f"grid {key} = {v!r} makes every cell impossible: {why}")
        if bad and not self.skip_invalid:
            shown = "; ".join(f"({label(p)})" for p, _ in bad[:4])
            shown += "; ..." if len(bad) > 4 else ""
            raise ValueError(f"{len(bad)} of {len(bad) + len(good)} cells are impossible "
                             f"({bad[0][1]}): {shown}; set skip_invalid = true to skip them")
        cells = []
        seen: dict[SimulationConfig, int] = {}
        for i, (params, cfg) in enumerate(good):
            if cfg in seen:  # dataclass equality: sigma = 1 and 1.0 are one cell
                raise ValueError(f"grid has duplicate cells: ({label(good[seen[cfg]][0])}) and "
                                 f"({label(params)}) are the same configuration")
            seen[cfg] = i
            cells.append(Cell(i, fingerprint(cfg)[:12], params, cfg))
        return tuple(cells), tuple(bad)

    def _config(self, params: Mapping[str, Any]) -> SimulationConfig:
        kw = dict(params)
        if "sigma2" in kw:
            s2 = kw.pop("sigma2")
            number = isinstance(s2, (int, float)) and not isinstance(s2, bool)
            if not number or not s2 > 0 or not math.isfinite(s2):
                raise ValueError(f"sigma2 must be a positive number, got {s2!r}")
            kw["sigma"] = math.sqrt(s2)
        kw["trajectories"] = self.trajectories
        cfg = SimulationConfig.from_dict(kw)
        if cfg.block_size is None:
            cfg = cfg.replace(block_size=min(block_cap(cfg), self.trajectories))
        if self.precision is not None:
            b = cfg.block_size
            cfg = cfg.replace(trajectories=-(-self.trajectories // b) * b)
        return cfg

    # -- views -------------------------------------------------------------
    @property
    def varying(self) -> tuple[str, ...]:
        """Grid keys with more than one value."""
        return tuple(k for k, v in self.grid if len(v) > 1)

    @property
    def param_keys(self) -> tuple[str, ...]:
        """Grid keys that become summary.csv columns (all but block_size)."""
        return tuple(k for k, _ in self.grid if k not in _SILENT)

    def shapes(self) -> dict[Any, list[Cell]]:
        """Cells grouped by compiled shape: ``{StaticSpec: [cells]}``, in first-use order."""
        from ._driver import _spec

        groups: dict[Any, list[Cell]] = {}
        for c in self.cells:
            groups.setdefault(_spec(c.config, None), []).append(c)
        return groups

    def run_order(self) -> list[Cell]:
        """Execution order: cells of one shape consecutively (grid order within)."""
        return [c for group in self.shapes().values() for c in group]

    def to_dict(self) -> dict[str, Any]:
        """The sweep as plain data (grid values always as lists)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in OPTION_KEYS}
        d["grid"] = {k: list(v) for k, v in self.grid}
        return d

    def hash(self) -> str:
        """Hash of everything that fixes the numbers: options, grid and every cell's config."""
        d = self.to_dict()
        d.pop("name")
        d.pop("description")
        h = hashlib.sha256(json.dumps(d, default=str).encode())
        for c in self.cells:
            h.update(c.id.encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> SweepConfig:
        """Build from parsed TOML, rejecting unknown keys with a suggestion."""
        for key in mapping:
            if key not in _TOP_KEYS:
                if key in GRID_KEYS:
                    raise ValueError(f"{key!r} is a cell parameter: put it under [grid]")
                raise ValueError(f"unknown option {key!r}{_did_you_mean(key, _TOP_KEYS)}")
        if "grid" not in mapping:
            raise ValueError("no [grid] table: give at least one cell parameter, "
                             "e.g. n = [100, 1000]")
        grid = mapping["grid"]
        if not isinstance(grid, Mapping):
            raise ValueError("grid must be a table ([grid])")
        kwargs = {k: mapping[k] for k in OPTION_KEYS if k in mapping}
        return cls(grid=tuple((k, _values(k, v)) for k, v in grid.items()), **kwargs)


def load_sweep(path: str | os.PathLike) -> SweepConfig:
    """Parse and validate a sweep TOML file; every problem is a one-line `ValueError`."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"sweep config not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None
    try:
        return SweepConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# --------------------------------------------------------------------------
# The results store: DIR/sweep.json, DIR/results.jsonl, DIR/summary.csv
# --------------------------------------------------------------------------


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single write on an O_APPEND descriptor, then fsync."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(line)
        while view:  # regular files take it in one write; the loop is for the contract only
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a results.jsonl (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for i, line in enumerate(lines[:-1]):  # the last piece is b"" or a partial line
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{i + 1}: unreadable record") from None
    return out


def _cut_torn_tail(path: Path) -> None:
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)


def _csv_value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, tuple)) else v


def write_summary(out: Path, sweep: SweepConfig,
                  records: list[dict[str, Any]] | None = None) -> int:
    """Regenerate DIR/summary.csv (atomic) from the records; returns the number of cells in it."""
    if records is None:
        records = read_records(out / "results.jsonl")
    index = {c.id: c for c in sweep.cells}
    recs = sorted((r for r in records if r["cell_id"] in index),
                  key=lambda r: index[r["cell_id"]].index)
    keys = sweep.param_keys
    rows = []
    for r in recs:
        cell = index[r["cell_id"]]
        prefix = [cell.index, cell.id] + [_csv_value(cell.params[k]) for k in keys]
        rows.extend(prefix + list(row) for row in r["rows"])
    write_csv(out / "summary.csv", ("cell", "cell_id", *keys, *SUMMARY_COLUMNS), rows)
    return len(recs)


_OWNED = ("results.jsonl", "summary.csv", "sweep.json", "cells", "plots")


def _open_store(out: Path, sweep: SweepConfig, force: bool) -> None:
    """Check DIR against the sweep (refuse another sweep unless force); create it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    meta = out / "sweep.json"
    h, code = sweep.hash(), code_hash()
    clash = None
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("hash") != h:
            clash = f"{out} holds a different sweep (hash {old.get('hash')}, this one {h})"
        elif old.get("code") != code:
            clash = (f"{out} was started by other collapse_jax code or another JAX version "
                     f"(code hash {old.get('code')}, now {code}): resuming would mix their numbers")
    elif (out / "results.jsonl").exists() or (out / "cells").exists():
        clash = f"{out} holds sweep results without sweep.json"
    if clash:
        if not force:
            raise ValueError(f"{clash}; choose another output directory or pass --force to "
                             "start afresh")
        for name in _OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not meta.exists():
        from ._io import environment

        write_json(meta, {
            "hash": h,
            "code": code,
            "sweep": sweep.to_dict(),
            "cells": [{"cell": c.index, "cell_id": c.id, "params": c.params} for c in sweep.cells],
            "skipped": [{"params": p, "reason": why} for p, why in sweep.skipped],
            "summary_columns": ["cell", "cell_id", *sweep.param_keys, *SUMMARY_COLUMNS],
            "environment": environment(),
        })
    _cut_torn_tail(out / "results.jsonl")


# --------------------------------------------------------------------------
# Running one cell
# --------------------------------------------------------------------------


def _next_trajectories(sweep: SweepConfig, r: int, b: int, halfwidth: float) -> int | None:
    """The next round's total under the precision target, or None to stop."""
    cap = max(r, sweep.max_trajectories // b * b)
    if (math.isfinite(halfwidth) and halfwidth <= sweep.precision) or r >= cap:
        return None
    # Half-widths shrink like 1/sqrt(R): aim 10% past the predicted need.
    want = r * (halfwidth / sweep.precision) ** 2 * 1.1 if math.isfinite(halfwidth) else 2 * r
    return min(cap, max(r + b, -(-math.ceil(want) // b) * b))


def _rebase_checkpoint(cell_dir: Path, old: SimulationConfig, new: SimulationConfig) -> None:
    """Relabel a finished round's checkpoint as the first blocks of the next, larger round.

    The sums stay as they are; `simulate` with the new config then resumes at
    block old.trajectories / block_size and runs only the new global
    trajectory indices, merging onto them in block order, so the result is
    identical to one uninterrupted `simulate(new)`.
    """
    from ._driver import _save_checkpoint
    from ._statistics import Moments

    path = cell_dir / "checkpoint.npz"
    with np.load(path) as z:
        if str(z["fingerprint"]) != fingerprint(old):
            return  # already rebased (a kill came after this step)
        blocks = int(z["blocks_done"])
        assert blocks * old.block_size == old.trajectories, "rebasing an unfinished round"
        m = Moments(z["count"], z["sum"], z["outer"])
        _save_checkpoint(path, fingerprint(new), old.block_size, blocks, m, z["failed"],
                         z["iterations"], z["metrics"])


def _run_cell(sweep: SweepConfig, cell: Cell, cell_dir: Path, say: Callable[[str], None] | None):
    """Run (or resume) one cell in `cell_dir`; returns (SimulationResult, rounds)."""
    from ._driver import simulate

    cfg = cell.config
    rounds_file = cell_dir / "round.json"
    rounds = 1
    if sweep.precision is not None and rounds_file.exists():
        state = json.loads(rounds_file.read_text())
        prev = cfg.replace(trajectories=state["previous"])
        cfg = cfg.replace(trajectories=state["trajectories"])
        rounds = state["round"]
        _rebase_checkpoint(cell_dir, prev, cfg)
    while True:
        res = simulate(cfg, progress=say or False, out=cell_dir)
        if sweep.precision is None:
            return res, rounds
        nxt = _next_trajectories(sweep, cfg.trajectories, cfg.block_size,
                                 float(res.summary.relative_halfwidth[-1]))
        if nxt is None:
            return res, rounds
        rounds += 1
        new = cfg.replace(trajectories=nxt)
        write_json(rounds_file,
                   {"round": rounds, "trajectories": nxt, "previous": cfg.trajectories})
        _rebase_checkpoint(cell_dir, cfg, new)
        if say:
            hw = res.summary.relative_halfwidth[-1]
            say(f"[sweep]   round {rounds}: relative half-width {hw:.3g} > {sweep.precision}: "
                f"{cfg.trajectories:,} -> {nxt:,} trajectories")
        cfg = new


def _record(sweep: SweepConfig, cell: Cell, res, rounds: int, wall: float) -> dict[str, Any]:
    return {
        "cell_id": cell.id,
        "cell": cell.index,
        "params": cell.params,
        "config": res.config.to_dict(),
        "trajectories": res.config.trajectories,
        "rounds": rounds,
        "block_size": res.block_size,
        "wall_time_s": wall,
        "compile_time_s": res.compile_time,
        "sweep_hash": sweep.hash(),
        "columns": list(SUMMARY_COLUMNS),
        "rows": _json_rows(res.rows()),
    }


def _json_rows(rows: list[list[Any]]) -> list[list[Any]]:
    # Undefined statistics (NaN) become null: results.jsonl stays standard JSON.
    return [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row]
            for row in rows]


def _from_record(cell: Cell, rec: Mapping[str, Any]) -> CellResult:
    return CellResult(cell, rec["rows"], rec["trajectories"], rec.get("wall_time_s", 0.0), True)


def _describe(sweep: SweepConfig, cell: Cell) -> str:
    keys = sweep.varying or sweep.param_keys
    return " ".join(f"{k}={cell.params[k]}" for k in keys if k not in _SILENT)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def iter_sweep(
    sweep: SweepConfig,
    out: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool | Callable[[str], None] = False,
    compilation_cache: str | os.PathLike | None = None,
) -> Iterator[CellResult]:
    """Run a sweep into `out`, yielding each cell's `CellResult` as it finishes.

    **Arguments:**

    - `sweep`: a validated `SweepConfig` (see `load_sweep`).
    - `out`: the results directory (created).  If it already holds this
      sweep, finished cells are read back from ``results.jsonl`` (yielded
      first, ``from_store=True``) and the interrupted cell resumes from its
      checkpoint.  Another sweep there is refused (`ValueError`) unless
      `force`, which deletes its results and starts afresh.
    - `progress`: True prints progress lines to stderr; a callable gets them.
    - `compilation_cache`: optional directory for JAX's persistent
      compilation cache, so that later processes skip compiling the shapes
      earlier ones compiled (``compile_count`` still counts them).

    **Returns:** an iterator of `CellResult` in run order (cells of one
    compiled shape consecutively).  The directory is checked and prepared
    when this is called, before the first cell runs; ``summary.csv`` is
    regenerated as cells finish (at most every few seconds) and once at the end.

    Deterministic: the numbers of every cell, and ``summary.csv``, are the
    same whether the sweep ran in one go or was killed and resumed any number
    of times.
    """
    out = Path(out)
    say = ((lambda s: print(s, file=sys.stderr, flush=True)) if progress is True
           else (progress or None))
    _open_store(out, sweep, force)
    if compilation_cache is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return _iterate(sweep, out, say)


def _iterate(sweep: SweepConfig, out: Path, say) -> Iterator[CellResult]:
    results = out / "results.jsonl"
    by_id = {c.id: c for c in sweep.cells}
    stored = {r["cell_id"]: r for r in read_records(results) if r["cell_id"] in by_id}
    total = len(sweep.cells)
    if say and stored:
        say(f"[sweep] resuming: {len(stored)}/{total} cells already in {results}")
    for cell in sweep.cells:
        if cell.id in stored:
            shutil.rmtree(out / "cells" / cell.id, ignore_errors=True)  # killed before cleanup
            yield _from_record(cell, stored[cell.id])
    todo = [c for c in sweep.run_order() if c.id not in stored]
    done, t_start, last_csv = len(stored), time.perf_counter(), 0.0
    try:
        for k, cell in enumerate(todo):
            cell_dir = out / "cells" / cell.id
            head = f"[sweep] cell {done + 1}/{total} ({_describe(sweep, cell)})"
            t_cell = last_line = time.perf_counter()

            def relay(line: str, head=head) -> None:
                nonlocal last_line
                urgent = line.startswith("[sweep]") or "resuming" in line
                if say and (urgent or time.perf_counter() - last_line > 2.0):
                    last_line = time.perf_counter()
                    say(line if line.startswith("[sweep]")
                        else f"{head}: {line.split('] ', 1)[-1]}")

            res, rounds = _run_cell(sweep, cell, cell_dir, relay)
            wall = time.perf_counter() - t_cell
            append_record(results, _record(sweep, cell, res, rounds, wall))
            shutil.rmtree(cell_dir, ignore_errors=True)
            done += 1
            if time.perf_counter() - last_csv > 5.0:
                write_summary(out, sweep)
                last_csv = time.perf_counter()
            if say:
                s, g = res.summary, res.config.generations
                elapsed = time.perf_counter() - t_start
                eta = elapsed / (k + 1) * (len(todo) - k - 1)
                fits = res.config.trajectories * g / max(wall - res.compile_time, 1e-9)
                say(f"[sweep] {done}/{total} cells | {_describe(sweep, cell)} | "
                    f"R={res.config.trajectories:,} ratio[g={g}] = {s.variance_ratio[-1]:.4g} "
                    f"[{s.ci_low[-1]:.4g}, {s.ci_high[-1]:.4g}] "
                    f"mse = {s.mse[-1]:.4g} | {wall:.1f}s (compile {res.compile_time:.1f}s, "
                    f"{fits:,.0f} fits/s) | {(k + 1) / elapsed * 60:.1f} cells/min | "
                    f"ETA {_duration(eta)}")
            yield CellResult(cell, _json_rows(res.rows()), res.config.trajectories, wall, False)
    finally:
        write_summary(out, sweep)
        cells_dir = out / "cells"
        if cells_dir.is_dir() and not any(cells_dir.iterdir()):
            cells_dir.rmdir()


def run_sweep(
    sweep: SweepConfig,
    out: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool | Callable[[str], None] = False,
    compilation_cache: str | os.PathLike | None = None,
) -> list[CellResult]:
    """Run a whole sweep (see `iter_sweep`); returns the results in grid order."""
    results = list(iter_sweep(sweep, out, force=force, progress=progress,
                              compilation_cache=compilation_cache))
    return sorted(results, key=lambda r: r.cell.index)


# --------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f} MB"


def dry_run_report(sweep: SweepConfig) -> str:
    """The cells, the distinct compiled shapes and memory estimates, as text."""
    lines = []
    shapes = sweep.shapes()
    spec_no = {id(c): i for i, group in enumerate(shapes.values()) for c in group}
    lines.append(f"{len(sweep.cells)} cells ({len(sweep.skipped)} impossible cells skipped), "
                 f"{len(shapes)} compiled shapes; trajectories per cell: {sweep.trajectories:,}"
                 + (f", precision {sweep.precision} up to {sweep.max_trajectories:,}"
                    if sweep.precision is not None else ""))
    lines.append("")
    lines.append("cells (run order):")
    for c in sweep.run_order():
        cfg = c.config
        blocks = -(-cfg.trajectories // cfg.block_size)
        lines.append(f"  {c.index:>5} {c.id}  shape {spec_no[id(c)]:>3}  {_describe(sweep, c)}  "
                     f"R={cfg.trajectories:,} in {blocks} block(s) of {cfg.block_size:,}")
    for p, why in sweep.skipped:
        where = ", ".join(f"{k}={v}" for k, v in p.items() if k in sweep.varying)
        lines.append(f"  skipped: {where}: {why}")
    lines.append("")
    names = [f.name for f in dataclasses.fields(next(iter(shapes)))]
    differ = [k for k in names if len({getattr(s, k) for s in shapes}) > 1]

    def show(spec, k):  # n None: a traced argument of that kernel (`StaticSpec`)
        v = getattr(spec, k)
        return f"{k}=traced" if k == "n" and v is None else f"{k}={v}"

    common = ", ".join(show(next(iter(shapes)), k) for k in names if k not in differ)
    lines.append(f"compiled shapes (StaticSpec; all have {common}) and memory per block:")
    total_fits = 0
    for i, (spec, group) in enumerate(shapes.items()):
        cfg = group[0].config
        block = bytes_per_trajectory(cfg) * spec.block_size
        moments = 8 * spec.generations * (4 * spec.d) ** 2
        fields = ", ".join(show(spec, k) for k in differ)
        lines.append(f"  {i:>3}: {fields}: {len(group)} cell(s), block arrays ~{_mb(block)}, "
                     f"moment sums {_mb(moments)}")
        total_fits += sum(c.config.trajectories * c.config.generations for c in group)
    lines.append("")
    lines.append(f"total: {total_fits:,} fits (trajectories x generations) before any "
                 "precision rounds")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Command line: collapse-jax sweep / collapse-jax plot
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sweep`` options."""
    parser.description = (
        "Run a grid of simulation cells from a TOML file (see docs/sweeps.md): one record per "
        "finished cell in DIR/results.jsonl, a tidy DIR/summary.csv, progress on stderr. Rerun the "
        "same command after an interruption to resume."
    )
    parser.add_argument("config", type=Path, help="sweep TOML file")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cells, compiled shapes and memory per block; run nothing")
    parser.add_argument("--force", action="store_true",
                        help="replace the results of a different sweep in --out")
    parser.add_argument("--compilation-cache", type=Path, default=None, metavar="DIR",
                        help="JAX persistent compilation cache directory (reused across runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args: argparse.Namespace) -> int:
    """Run ``sweep``; bad input raises a one-line ValueError before anything is compiled."""
    sweep = load_sweep(args.config)
    if args.dry_run:
        print(dry_run_report(sweep))
        return 0
    if args.out is None:
        raise ValueError("--out is required (or pass --dry-run)")
    from ._driver import compile_count

    t0, c0 = time.perf_counter(), compile_count()
    ran = stored = 0
    for r in iter_sweep(sweep, args.out, force=args.force, progress=not args.quiet,
                        compilation_cache=args.compilation_cache):
        stored += r.from_store
        ran += not r.from_store
    print(f"wrote {args.out / 'summary.csv'}: {len(sweep.cells)} cells ({ran} run now, "
          f"{stored} from earlier runs), {compile_count() - c0} kernels compiled, "
          f"wall {time.perf_counter() - t0:.1f}s")
    return 0


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plot`` options."""
    parser.description = (
        "Draw a sweep's results: variance ratio and MSE against generation, faceted by n (rows) "
        "and d (columns), coloured by workflow, with closed-form curves where they exist. "
        "Writes DIR/plots/*.png and *.pdf."
    )
    parser.add_argument("dir", type=Path, help="a sweep results directory")


def plot_main(args: argparse.Namespace) -> int:
    """Run ``plot``."""
    from ._plots import plot_sweep

    paths = plot_sweep(args.dir)
    for p in paths:
        print(f"wrote {p}")
    return 0
