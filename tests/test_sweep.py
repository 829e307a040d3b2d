"""Sweeps: parsing and validation up front, the results store, compile reuse,
precision rounds, kill-and-resume to identical numbers, dry run and plots."""

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import collapse_jax as cj
from collapse_jax import _driver, _sweep
from collapse_jax._driver import compile_count
from collapse_jax._sweep import SweepConfig, iter_sweep, load_sweep, read_records, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _wired() -> bool:
    from collapse_jax._cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "sweep" in sub.choices


def _sweep_cli(argv: list[str]) -> int:
    """`collapse-jax sweep ARGV` through the real CLI once it is wired, else through our
    parser with the CLI's error contract (ValueError -> one line on stderr, exit 2)."""
    if _wired():
        from collapse_jax._cli import main

        return main(["sweep", *argv])
    parser = argparse.ArgumentParser(prog="collapse-jax sweep")
    _sweep.add_arguments(parser)
    try:
        return _sweep.main(parser.parse_args(argv))
    except ValueError as e:
        print(f"collapse-jax sweep: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2


def _sweep_command(config: Path, out: Path) -> list[str]:
    if _wired():
        return [sys.executable, "-m", "collapse_jax", "sweep", str(config), "--out", str(out)]
    code = ("import argparse, sys; from collapse_jax import _sweep; p = argparse.ArgumentParser(); "
            "_sweep.add_arguments(p); sys.exit(_sweep.main(p.parse_args(sys.argv[1:])))")
    return [sys.executable, "-c", code, str(config), "--out", str(out)]


# --------------------------------------------------------------------------
# Parsing: everything is reported before anything runs
# --------------------------------------------------------------------------

BAD = [
    ("trajectories = 10\n[grid\nn = 5\n", "invalid TOML"),
    ("trajectories = 10\n[grid]\nn = [20]\ngenrations = 3\n", "did you mean 'generations'"),
    ("trajectorys = 10\n[grid]\nn = [20]\n", "did you mean 'trajectories'"),
    ("trajectories = 10\nseed = 1\n[grid]\nn = [20]\n", "put it under [grid]"),
    ("trajectories = 10\n[grid]\nn = [20]\ntrajectories = 5\n", "sweep option"),
    ("trajectories = 10\n[grid]\nn = [5, 20]\nd = [3, 10]\n", "1 of 4 cells are impossible"),
    ("trajectories = 10\nskip_invalid = true\n[grid]\nn = [20]\nd = [3, 30]\n",
     "d = 30 makes every cell impossible"),
    ("trajectories = 10\n[grid]\nn = [20]\nworkflow = ['augment', 'discrad']\n",
     "did you mean 'discard'"),
    ("trajectories = 10\n[grid]\nn = 20\nsigma = 1\nsigma2 = [1, 2]\n", "not both"),
    ("trajectories = 10\n[grid]\nn = 20\nsigma2 = [1, -2]\n", "sigma2 must be a positive number"),
    ("trajectories = 10\nprecision = 0.1\n[grid]\nn = 20\n", "needs max_trajectories"),
    ("trajectories = 10\n[grid]\nn = []\n", "empty list"),
    ("trajectories = 10\n[grid]\nsigma = [1, 1.0]\n", "duplicate cells"),
    ("trajectories = 0\n[grid]\nn = 20\n", "trajectories must be a positive integer"),
    ("trajectories = 10\n", "no [grid] table"),
]


@pytest.mark.parametrize("text, fragment", BAD, ids=[f for _, f in BAD])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, capsys, text, fragment):
    path = _write(tmp_path, text)
    out = tmp_path / "out"
    before = compile_count()
    with pytest.raises(ValueError, match=None) as exc:
        load_sweep(path)
    assert fragment in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert _sweep_cli([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("collapse-jax") and fragment in err, err
    assert compile_count() == before
    assert not out.exists()


def test_missing_file_and_dry_run_without_out(tmp_path, capsys):
    assert _sweep_cli([str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    path = _write(tmp_path, "trajectories = 8\n[grid]\nn = 20\n")
    assert _sweep_cli([str(path)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_grid_semantics_sigma2_and_skip_invalid():
    sweep = SweepConfig.from_dict({
        "trajectories": 50, "skip_invalid": True,
        "grid": {"workflow": ["discard", "augment"], "n": [4, 20], "d": [1, 3], "sigma2": [0.1, 10],
                 "generations": 3},
    })
    assert len(sweep.cells) == 2 * 3 * 2  # (n=4, d=3) is impossible for OLS: skipped
    assert len(sweep.skipped) == 2 * 2
    assert all("n >= d + 2" in why for _, why in sweep.skipped)
    c = sweep.cells[0]
    assert c.params == {"workflow": "discard", "n": 4, "d": 1, "sigma2": 0.1, "generations": 3}
    assert c.config.sigma == math.sqrt(0.1) and c.config.trajectories == 50
    assert c.config.block_size == 50  # one block of exactly the cell's trajectories
    assert sweep.varying == ("workflow", "n", "d", "sigma2")
    # first key outermost; equal shapes consecutive in run order
    assert [x.params["workflow"] for x in sweep.cells[:6]] == ["discard"] * 6
    order = sweep.run_order()
    specs = [_driver._spec(x.config, None) for x in order]
    assert all(specs[i] == specs[i + 1] or specs[i] not in specs[i + 1:]
               for i in range(len(specs) - 1))
    # OLS draws sufficient statistics here, whose kernels trace n: one shape per (workflow, d)
    assert len(sweep.shapes()) == 4
    # vector-valued fields: one value is a list, a list of lists is several values
    s2 = SweepConfig.from_dict({"trajectories": 4, "grid": {"d": 2, "n": 8,
                                                             "theta0": [[1.0, 0.0], [0.0, 2.0]]}})
    assert [x.config.theta0 for x in s2.cells] == [(1.0, 0.0), (0.0, 2.0)]
    s3 = SweepConfig.from_dict({"trajectories": 4, "grid": {"d": 2, "n": 8, "theta0": [1.0, 0.0]}})
    assert len(s3.cells) == 1
    assert s2.hash() != s3.hash() and s3.hash() == SweepConfig.from_dict(s3.to_dict()).hash()


class _FakeDevice:
    def memory_stats(self):
        return {"bytes_limit": 64 * 2**30}


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_bytes_model_matches_default_block_size(backend, monkeypatch):
    # The block memory budget: 256 MB on CPU, a quarter of the device's memory elsewhere.
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "local_devices", lambda: [_FakeDevice()])
    budget, largest = (256 * 2**20, 2**14) if backend == "cpu" else (16 * 2**30, 2**17)
    for kw in ({"workflow": "augment", "design": "fresh", "draw": "data"},
               {"workflow": "subsample", "design": "fixed"},
               {"workflow": "discard"}, {"model": "logistic", "workflow": "augment"}):
        cfg = cj.SimulationConfig(n=300, d=20, generations=40, trajectories=2**20, **kw)
        want = budget // _sweep.bytes_per_trajectory(cfg)
        got = _driver.default_block_size(cfg)
        assert got == _driver.block_cap(cfg)
        assert got <= want < 2 * got or got == largest


# --------------------------------------------------------------------------
# One small sweep, shared: compile reuse, the store, summary.csv, plots
# --------------------------------------------------------------------------

SMALL = """
    name = "test sweep"
    trajectories = 40

    [grid]
    workflow = ["discard", "augment"]
    sigma = [0.5, 1.0, 2.0]
    seed = [0, 1]
    n = 13
    d = 2
    generations = 4
    design = "fixed"
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("small")
    sweep = load_sweep(_write(tmp, SMALL))
    out = tmp / "out"
    new_shapes = [s for s in sweep.shapes() if ("block", s) not in _driver._COMPILED]
    before = compile_count()
    live = list(iter_sweep(sweep, out))
    return {"sweep": sweep, "out": out, "live": live, "compiled": compile_count() - before,
            "new_shapes": len(new_shapes)}


def test_cells_sharing_shapes_compile_once(small):
    sweep = small["sweep"]
    assert len(sweep.cells) == 12 and len(sweep.shapes()) == 2
    assert small["new_shapes"] == 2  # nothing else in the suite uses n=13, d=2, G=4, B=40
    assert small["compiled"] == 2  # sigma and seed are traced: one kernel per workflow
    # streamed in run order: all discard cells, then all augment cells
    assert [r.cell.params["workflow"] for r in small["live"]] == ["discard"] * 6 + ["augment"] * 6
    assert not any(r.from_store for r in small["live"])


def test_results_store_and_summary(small):
    sweep, out = small["sweep"], small["out"]
    records = read_records(out / "results.jsonl")
    assert len(records) == 12 and {r["cell_id"] for r in records} == {c.id for c in sweep.cells}
    assert not (out / "cells").exists()  # per-cell checkpoints are removed once recorded
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["hash"] == sweep.hash() and len(meta["cells"]) == 12
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 12 * 4
    assert list(rows[0])[:8] == ["cell", "cell_id", "workflow", "sigma", "seed", "n", "d",
                                 "generations"]
    assert [int(r["cell"]) for r in rows] == sorted(int(r["cell"]) for r in rows)
    # a cell's numbers are exactly those of simulate() on its config
    cell = sweep.cells[7]
    res = cj.simulate(cell.config)
    mine = [r for r in rows if int(r["cell"]) == 7]
    assert ([float(r["variance_ratio"]) for r in mine]
            == [float(x) for x in res.summary.variance_ratio])
    assert [float(r["mse"]) for r in mine] == [float(x) for x in res.summary.mse]
    assert float(mine[0]["sigma"]) == cell.config.sigma


def test_rerun_reads_back_and_other_sweep_is_refused(small, tmp_path, capsys):
    sweep, out = small["sweep"], small["out"]
    text = (out / "summary.csv").read_text()
    before = compile_count()
    again = run_sweep(sweep, out)
    assert all(r.from_store for r in again) and compile_count() == before
    live = sorted(small["live"], key=lambda r: r.cell.index)
    assert [r.rows for r in again] == [r.rows for r in live]
    assert (out / "summary.csv").read_text() == text

    other = _write(tmp_path, SMALL.replace("trajectories = 40", "trajectories = 41"))
    assert _sweep_cli([str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep" in err and "--force" in err and err.count("\n") == 1
    assert (out / "summary.csv").read_text() == text  # untouched


def test_torn_last_line_is_ignored_and_cut(small, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small["out"], out)
    results = out / "results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    # as if killed mid-append: the last two cells lost, one of them half-written
    results.write_bytes(b"".join(lines[:10]) + lines[10][:57])
    assert len(read_records(results)) == 10
    r = run_sweep(small["sweep"], out)
    assert sum(not x.from_store for x in r) == 2
    assert len(read_records(results)) == 12
    assert results.read_bytes().endswith(b"\n")
    assert (out / "summary.csv").read_text() == (small["out"] / "summary.csv").read_text()


def test_other_code_is_refused(small, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small["out"], out)
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["code"] == _sweep.code_hash()
    (out / "sweep.json").write_text(json.dumps({**meta, "code": "0" * 16}))
    with pytest.raises(ValueError, match="other collapse_jax code or another JAX version"):
        run_sweep(small["sweep"], out)


def test_force_replaces_another_sweep(small, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small["out"], out)
    grid = {"n": 13, "d": 2, "generations": 4, "design": "fixed", "workflow": "augment"}
    one = SweepConfig.from_dict({"trajectories": 40, "grid": grid})
    with pytest.raises(ValueError, match="different sweep"):
        run_sweep(one, out)
    r = run_sweep(one, out, force=True)
    assert len(r) == 1 and len(read_records(out / "results.jsonl")) == 1
    assert json.loads((out / "sweep.json").read_text())["hash"] == one.hash()


def test_dry_run_lists_cells_shapes_and_memory(small, capsys):
    before = compile_count()
    path = small["out"].parent / "sweep.toml"
    assert _sweep_cli([str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "12 cells" in text and "2 compiled shapes" in text
    assert "n=traced" in text  # OLS discard/augment draw sufficient statistics: n is traced
    assert "block arrays ~" in text and "moment sums" in text and "StaticSpec" in text
    assert text.count(" R=40 in 1 block(s) of 40") == 12
    assert compile_count() == before


def test_plot_writes_readable_figures(small):
    from collapse_jax._plots import harmonic2, plot_sweep, theory

    paths = plot_sweep(small["out"], formats=("png",))
    names = sorted(p.name for p in paths)
    # sigma fills the columns (n and d are fixed); seed splits figures
    assert names == ["mse__seed=0.png", "mse__seed=1.png", "variance_ratio__seed=0.png",
                     "variance_ratio__seed=1.png"]
    assert all(p.stat().st_size > 10_000 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    g = np.arange(1, 5)
    assert np.allclose(harmonic2(g), np.cumsum(1 / g**2))
    cfg = small["sweep"].cells[0].config.to_dict()
    assert np.allclose(theory({**cfg, "workflow": "discard"}, "mse", g), 0.25 * 2 / (13 - 3) * g)
    assert theory({**cfg, "workflow": "augment", "design": "fresh"}, "mse", g) is None


# --------------------------------------------------------------------------
# Precision target: new trajectory indices, merged moments, resumable rounds
# --------------------------------------------------------------------------


def test_precision_rounds_equal_one_simulate_and_resume_exactly(tmp_path):
    spec = {"trajectories": 40, "precision": 0.2, "max_trajectories": 400,
            "grid": {"n": 13, "d": 2, "generations": 4, "design": "fixed", "workflow": "discard",
                     "sigma": [0.5, 1.0]}}
    sweep = SweepConfig.from_dict(spec)
    clean = run_sweep(sweep, tmp_path / "clean")
    recs = {r["cell_id"]: r for r in read_records(tmp_path / "clean" / "results.jsonl")}
    for r in clean:
        rec = recs[r.cell.id]
        assert rec["rounds"] > 1 and 40 < r.trajectories <= 400 and r.trajectories % 40 == 0
        hw = 1.959963984540054 * r.column("variance_ratio_se")[-1] / r.column("variance_ratio")[-1]
        assert hw <= 0.2 or r.trajectories == 400
        # identical to one uninterrupted simulate over indices 0..R-1: no index drawn twice
        ref = cj.simulate(cj.SimulationConfig.from_dict(rec["config"]))
        assert r.column("variance_ratio").tolist() == [float(x) for x in ref.summary.variance_ratio]
        assert r.column("trajectories")[0] == r.trajectories

    # crash after the second checkpoint of the run, then resume: same text
    calls = []

    def crash(line):
        calls.append(line)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path / "crashed", progress=crash)
    assert list((tmp_path / "crashed" / "cells").iterdir())  # a checkpoint was left behind
    run_sweep(sweep, tmp_path / "crashed")
    assert ((tmp_path / "crashed" / "summary.csv").read_text()
            == (tmp_path / "clean" / "summary.csv").read_text())


# --------------------------------------------------------------------------
# SIGKILL mid-cell, then the same command again: exactly the numbers of a clean run
# --------------------------------------------------------------------------

KILL = """
    trajectories = 131072

    [grid]
    workflow = "augment"
    design = "fixed"
    n = 30
    d = 3
    generations = 5
    block_size = 4096
    sigma2 = [0.5, 1.0, 2.0]
    seed = 3
"""


def test_sigkill_mid_cell_then_resume_gives_identical_summary(tmp_path):
    config = _write(tmp_path, KILL)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cache = ["--compilation-cache", str(tmp_path / "jax-cache")]
    # the uninterrupted reference runs alongside the one we kill
    ref = subprocess.Popen(_sweep_command(config, clean) + cache + ["--quiet"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_sweep_command(config, killed) + cache, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = killed / "results.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            recs = read_records(results)
            cells = killed / "cells"
            running = ([p for p in cells.iterdir() if (p / "checkpoint.npz").exists()]
                       if cells.exists() else [])
            if recs and any(p.name not in {r["cell_id"] for r in recs} for p in running):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
    n_done = len(read_records(results))
    assert 1 <= n_done < 3

    resumed = subprocess.run(_sweep_command(config, killed) + cache, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {n_done}/3 cells" in resumed.stderr
    assert "resuming after block" in resumed.stderr  # the interrupted cell continued, not restarted
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    assert (killed / "summary.csv").read_text() == (clean / "summary.csv").read_text()
    assert len(read_records(results)) == 3
