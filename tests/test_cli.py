"""The command line: outputs, one-line errors with exit code 2, kill-and-resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import collapse_jax as cj
from collapse_jax._cli import main


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["simulate", "--out", "x", "--n", "3", "--d", "5"], "n >= d + 2"),
        (["simulate", "--out", "x", "--workflow", "augmnt"], "augment"),
        (["simulate", "--out", "x", "--trajectories", "0"], "trajectories must be a positive integer"),
        (["simulate", "--out", "x", "--generations", "-2"], "generations must be a positive integer"),
        (["simulate", "--out", "x", "--genrations", "5"], "did you mean --generations"),
        (["simulate", "--out", "x", "--sigma", "-1"], "sigma must be positive"),
        (["simulate", "--out", "x", "--model", "logistic", "--n", "4", "--d", "4"], "n > d"),
        (["simulate", "--out", "x", "--design-matrix", "missing.npy", "--design", "fixed"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment, capsys):
    from collapse_jax._driver import compile_count

    before = compile_count()
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("collapse-jax"), err
    assert fragment in err
    assert compile_count() == before  # rejected before compiling anything


def test_api_raises_value_error_for_typos():
    with pytest.raises(ValueError, match="did you mean 'generations'"):
        cj.SimulationConfig.from_dict({"genrations": 4})
    with pytest.raises(ValueError, match="unknown workflow"):
        cj.SimulationConfig(workflow="replace")
    with pytest.raises(ValueError, match="design_matrix requires design='fixed'"):
        cj.simulate(cj.SimulationConfig(n=5, d=2), design_matrix=np.ones((5, 2)))


def test_simulate_writes_summary_and_run_json(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        ["simulate", "--n", "20", "--d", "2", "--generations", "3", "--trajectories", "500",
         "--workflow", "discard", "--out", str(out)], capsys)
    assert code == 0
    assert "trajectories" in stderr and "ratio[g=3]" in stderr  # progress line
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [int(r["generation"]) for r in rows] == [1, 2, 3]
    for col in ("variance_ratio", "ci_low", "ci_high", "mse", "mse_se", "failed_fits"):
        assert col in rows[0]
    assert float(rows[0]["variance_ratio"]) == 1.0
    lo, hi = float(rows[2]["ci_low"]), float(rows[2]["ci_high"])
    assert lo < float(rows[2]["variance_ratio"]) < hi
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["n"] == 20 and meta["environment"]["backend"] == jax.default_backend()
    assert meta["wall_time_s"] > 0 and "compile_time_s" in meta
    coords = list(csv.DictReader((out / "coordinates.csv").open()))
    assert len(coords) == 3 * 2


def _cli_cmd(out):
    return [sys.executable, "-m", "collapse_jax", "simulate", "--model", "ols", "--workflow",
            "augment", "--n", "30", "--d", "3", "--generations", "5", "--trajectories", "240000",
            "--block-size", "1024", "--seed", "3", "--out", str(out)]


def test_sigkill_mid_run_then_resume_gives_identical_numbers(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint.npz"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not ckpt.exists():
            time.sleep(0.005)
        assert ckpt.exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGKILL)  # at once: 235 blocks take well under a second
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.csv").exists()
    with np.load(ckpt) as z:
        done = int(z["blocks_done"])
    assert 0 < done < 235

    resumed = subprocess.run(_cli_cmd(killed), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after block {done}" in resumed.stderr or "resuming after block" in resumed.stderr

    clean = tmp_path / "clean"
    fresh = subprocess.run(_cli_cmd(clean), env=env, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert (killed / "summary.csv").read_text() == (clean / "summary.csv").read_text()
    assert (killed / "coordinates.csv").read_text() == (clean / "coordinates.csv").read_text()


def test_other_config_in_same_dir_is_refused_unless_forced(tmp_path):
    cfg = cj.SimulationConfig(n=10, d=2, generations=2, trajectories=50)
    cj.simulate(cfg, out=tmp_path)
    with pytest.raises(ValueError, match="different configuration"):
        cj.simulate(cfg.replace(seed=1), out=tmp_path)
    r = cj.simulate(cfg.replace(seed=1), out=tmp_path, force=True)
    assert json.loads((tmp_path / "run.json").read_text())["config"]["seed"] == 1
    assert r.summary.count[0] == 50


def test_checkpoint_of_other_code_is_refused_unless_forced(tmp_path):
    """A sampler change (e.g. how normals are drawn) changes every number: a checkpoint
    written by other collapse_jax code or JAX must not be resumed into a mixed result."""
    cfg = cj.SimulationConfig(n=10, d=2, generations=2, trajectories=50)
    first = cj.simulate(cfg, out=tmp_path)
    ckpt = tmp_path / "checkpoint.npz"
    with np.load(ckpt) as z:
        saved = {k: z[k] for k in z.files}
    assert str(saved["code"]) == cj._driver.code_hash()
    np.savez(ckpt, **{**saved, "code": np.str_("0123456789abcdef")})
    with pytest.raises(ValueError, match="other collapse_jax code"):
        cj.simulate(cfg, out=tmp_path)
    again = cj.simulate(cfg, out=tmp_path, force=True)  # recomputed from the start
    np.testing.assert_array_equal(again.summary.variance_ratio, first.summary.variance_ratio)


def test_checkpoint_of_another_block_size_is_refused_unless_forced(tmp_path, monkeypatch):
    """The default block size depends on the backend (`block_cap`): a checkpoint's block
    count means nothing under another block size, so it must not be resumed."""
    cfg = cj.SimulationConfig(n=10, d=2, generations=2, trajectories=40)
    first = cj.simulate(cfg, out=tmp_path)
    workers = cj._driver.default_workers()
    assert first.block_size == 40 // workers  # at least one block per default worker
    monkeypatch.setattr(cj._driver, "block_cap", lambda config: 16)  # another backend's default
    with pytest.raises(ValueError,
                       match=f"blocks of {40 // workers} trajectories and this run uses 14"):
        cj.simulate(cfg, out=tmp_path)
    again = cj.simulate(cfg, out=tmp_path, force=True)
    assert again.block_size == 14  # 40 under a cap of 16: 3 blocks of 14
    np.testing.assert_allclose(again.summary.variance_ratio, first.summary.variance_ratio,
                               rtol=1e-13)
