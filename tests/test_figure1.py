"""The ``figure1`` command end to end, at small size."""

import argparse
import csv
import json
import math

import jax
import numpy as np
import pytest

import collapse_jax  # noqa: F401  (turns on float64)
from collapse_jax import _figure1
from collapse_jax._limit import default_workers, limit_ratio, trace_count
from collapse_jax._scaling import intra_op_threads

WORKFLOWS = ("discard", "augment", "subsample", "subsample-replace")
SMALL = [
    "--generations",
    "10",
    "--draws",
    "20000",
    "--block-size",
    "10000",
    "--workers",
    "1",
    "--quiet",
]


def _args(argv):
    parser = argparse.ArgumentParser()
    _figure1.add_arguments(parser)
    return parser.parse_args(argv)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figure1")
    assert _figure1.main(_args([*SMALL, "--out", str(out)])) == 0
    return out


def test_outputs_exist_and_are_files(small_run):
    png = (small_run / "figure1.png").read_bytes()
    pdf = (small_run / "figure1.pdf").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert pdf.startswith(b"%PDF") and len(pdf) > 5_000
    assert not list(small_run.glob(".*.tmp"))  # atomic writes left no temporaries


def test_csv_rows_and_values(small_run):
    rows = _rows(small_run / "figure1.csv")
    assert list(rows[0]) == list(_figure1.CSV_COLUMNS)
    for col in ("workflow", "generation", "variance_ratio", "ci_low", "ci_high", "exact"):
        assert col in rows[0]
    assert [r["workflow"] for r in rows] == [w for w in WORKFLOWS for _ in range(10)]
    for w in WORKFLOWS:
        mine = [r for r in rows if r["workflow"] == w]
        assert [int(r["generation"]) for r in mine] == list(range(1, 11))
        exact = np.array([float(r["exact"]) for r in mine])
        np.testing.assert_allclose(exact, limit_ratio(w, 10), rtol=0, atol=1e-12)
        ratio = np.array([float(r["variance_ratio"]) for r in mine])
        lo = np.array([float(r["ci_low"]) for r in mine])
        hi = np.array([float(r["ci_high"]) for r in mine])
        se = np.array([float(r["variance_ratio_se"]) for r in mine])
        assert np.all(lo <= ratio) and np.all(ratio <= hi)
        np.testing.assert_allclose(hi - lo, 2 * 1.959963984540054 * se, rtol=1e-9, atol=1e-15)
        assert np.all(np.abs(ratio[1:] - exact[1:]) < 5 * se[1:]), w
        assert all(int(r["draws"]) == 20_000 for r in mine)


def test_manifest(small_run):
    m = json.loads((small_run / "figure1.json").read_text())
    assert m["draws_per_workflow"] == {w: 20_000 for w in WORKFLOWS}
    assert m["limit_config"]["generations"] == 10 and m["limit_config"]["d"] == 1
    assert m["environment"]["versions"]["jax"]
    assert m["wall_time_seconds"]["total"] > 0
    assert set(m["at_generation_10"]) == set(WORKFLOWS)
    assert m["finite_n"] is None


def test_defaults_match_the_paper():
    args = _args(["--out", "x"])
    assert (args.generations, args.draws, args.precision, args.finite_n) == (
        100,
        1_000_000,
        None,
        None,
    )
    config, finite = _figure1._configs(args)
    assert config.d == 1 and config.draws == 1_000_000 and config.workflows == WORKFLOWS
    assert config.dtype == "float64" and finite == []
    assert args.workers is None  # resolved by default_workers(): min(2, CPUs) on CPU
    cpu = jax.default_backend() == "cpu"
    assert default_workers() == (min(2, intra_op_threads()) if cpu else 1)


def test_precision_mode(tmp_path, small_run, capsys):
    # Same generations and block size as small_run: the kernel is already compiled.
    argv = ["--generations", "10", "--draws", "10000", "--block-size", "10000", "--workers", "1"]
    argv += ["--precision", "0.03"]
    assert _figure1.main(_args([*argv, "--out", str(tmp_path)])) == 0
    m = json.loads((tmp_path / "figure1.json").read_text())
    assert m["worst_relative_halfwidth"] < 0.03
    assert m["draws_per_workflow"]["augment"] > 10_000
    err = capsys.readouterr().err
    assert err.count("[limit]") == m["blocks"] and "worst 95% rel. half-width" in err


def test_workers_give_identical_files(tmp_path, small_run):
    # Two threads run the blocks; merged in block order, the sums (hence every
    # CSV byte) are those of the one-block-at-a-time run.
    argv = [a for a in SMALL if a not in ("--workers", "1")]
    assert _figure1.main(_args([*argv, "--workers", "2", "--out", str(tmp_path)])) == 0
    assert (tmp_path / "figure1.csv").read_bytes() == (small_run / "figure1.csv").read_bytes()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--generations", "0"], "generations must be a positive integer"),
        (["--draws", "-3"], "draws must be a positive integer"),
        (["--precision", "1.5"], "precision"),
        (["--precision", "nan"], "precision"),
        (["--max-draws", "100"], "only applies with --precision"),
        (["--model", "logistic"], "--model needs --finite-n"),
        (["--finite-n-trajectories", "10"], "needs --finite-n"),
        (["--finite-n", "2"], "n >= d \\+ 2"),
        (["--finite-n", "100", "--finite-n-generations", "200"], "exceeds --generations"),
        (["--block-size", "0"], "block_size must be a positive integer"),
        (["--seed", "-1"], "seed"),
        (["--workers", "0"], "workers must be a positive integer"),
    ],
)
def test_bad_input_raises_before_compiling(tmp_path, argv, match):
    before = trace_count()
    with pytest.raises(ValueError, match=match):
        _figure1.main(_args([*argv, "--out", str(tmp_path / "out")]))
    assert trace_count() == before
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        _figure1.main(_args(["--out", str(f)]))


def test_cli_reports_one_line_error(tmp_path, capsys):
    from collapse_jax._cli import main

    assert main(["figure1", "--generations", "-1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "generations must be a positive integer" in err


@pytest.mark.slow
def test_finite_n_overlay_agrees_with_the_limit(tmp_path, small_run):
    # OLS, fresh design, n = 500: the finite-n ratios differ from the limit by
    # O(g / n) (each generation's fit carries an O(1/n) relative variance
    # correction).  Allowance: 5 standard errors + 3 g / n relative.
    n, G = 500, 4
    argv = [
        *SMALL,
        "--finite-n",
        str(n),
        "--finite-n-generations",
        str(G),
        "--finite-n-trajectories",
        "2000",
    ]
    assert _figure1.main(_args([*argv, "--out", str(tmp_path)])) == 0
    rows = _rows(tmp_path / "figure1_finite_n.csv")
    assert [r["workflow"] for r in rows] == [w for w in WORKFLOWS for _ in range(G)]
    for r in rows:
        g = int(r["generation"])
        ratio, se, exact = (
            float(r["variance_ratio"]),
            float(r["variance_ratio_se"]),
            float(r["exact"]),
        )
        assert r["model"] == "ols" and int(r["n"]) == n and int(r["trajectories"]) == 2000
        assert exact == pytest.approx(limit_ratio(r["workflow"], G)[g - 1], abs=1e-12)
        if g > 1:
            assert abs(ratio - exact) < 5 * se + 3 * g / n * exact, r
    m = json.loads((tmp_path / "figure1.json").read_text())
    assert len(m["finite_n"]) == 4 and "figure1_finite_n.csv" in m["outputs"]
    assert math.isfinite(m["wall_time_seconds"]["finite_n"]["subsample"])
