"""Cheap checks of benchmarks/bench_performance.py (one tiny engine kernel is compiled here).

The ceilings probes return positive finite rates, the peak-memory probe sees
an allocation, the work model counts what docs/performance.md says, the
target table decides "met?" from the numbers, a grid row too short to time
is measured again on more trajectories with the same kernel, and a
ceilings-only run writes a JSON record with the documented top-level keys.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import collapse_jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_performance as bp  # noqa: E402

RECORD_KEYS = {"benchmark", "command", "date", "mode", "settings", "environment", "ceilings",
               "cases", "sweeps", "limit", "memory", "targets", "errors", "total_s"}


@pytest.fixture(scope="module")
def ceilings():
    return bp.measure_ceilings(normal_size=4096, matmul_size=32, repeats=1)


def test_ceilings_are_positive_and_finite(ceilings):
    out = ceilings
    kinds = {(c["kind"], c["library"], c["impl"], c["dtype"]) for c in out}
    assert len(kinds) == len(out) == 14  # 2 dtypes x (5 normal generators + 2 matmuls)
    for c in out:
        assert math.isfinite(c["rate"]) and c["rate"] > 0, c
        assert c["wall_s"] > 0 and c["cpu_s"] >= 0, c
    assert bp.ceiling(out, "normal", "float64") == max(
        c["rate"] for c in out if c["kind"] == "normal" and c["dtype"] == "float64")
    assert math.isnan(bp.ceiling(out, "normal", "float16"))


def test_peak_rss_sees_an_allocation():
    if not bp.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    with bp.peak_rss() as rec:
        a = np.ones(8 * 2**20)  # 64 MiB, touched
        a.sum()
        del a
    assert rec["delta"] is not None and rec["delta"] > 48 * 2**20, rec


def test_work_per_fit_counts():
    cfg = collapse_jax.SimulationConfig(model="ols", workflow="discard", n=100, d=10)
    assert bp.work_per_fit(cfg) == {"normals": 11.0, "flops": 20.0}
    w = bp.work_per_fit(cfg.replace(workflow="augment"))
    assert w["normals"] == 10 * 9 / 2 + 20 and w["flops"] == 1000 + 600
    w = bp.work_per_fit(cfg.replace(workflow="subsample"))
    assert w["normals"] == 100 * 11
    lg = cfg.replace(model="logistic", workflow="augment", design="fixed")
    assert bp.work_per_fit(lg, 2.0)["flops"] > bp.work_per_fit(lg, 1.0)["flops"]
    assert bp.work_per_fit(lg)["normals"] == 0


def _row(**kw):
    base = dict(name="grid/x", model="ols", workflow="discard", design="fresh", n=100, d=10,
                trajectories=1000, engine_over_numpy=1.0, engine_over_numpy_cpu=1.0,
                engine_over_loop=None, engine_fits_per_s=1.0, engine_fits_per_cpu_s=1.0,
                engine_compile_s=None, engine_compile_cpu_s_est=None)
    return {**base, **kw}


def test_targets_decide_met_from_the_numbers():
    rows = [
        _row(engine_over_numpy=3.5, engine_over_loop=150.0, engine_fits_per_s=100.0,
             engine_compile_s=1.0, engine_compile_cpu_s_est=0.5),
        _row(n=10_000, engine_fits_per_s=70.0, engine_compile_s=2.0),
        _row(name="grid/ols/subsample/fresh/n100/d10", workflow="subsample",
             engine_over_numpy=0.5),
    ]
    met = {t["target_name"]: t["met"] for t in bp.targets(rows, None, None)}
    assert met["OLS fresh discard n=100 d=10 (R=1,000) vs numpy"] is True
    assert met["OLS fresh discard n=100 d=10 (R=1,000) vs loop"] is True
    assert met["OLS fresh discard n=10,000 rate / n=100 rate (R=1,000)"] is False  # 0.7 < 0.8
    assert met["ols/subsample/fresh/n100/d10 vs numpy"] is False
    assert met["compile time per kernel shape, median of 2"] is True  # 1.5 s
    assert met["compile time per kernel shape, max of 2"] is False


def test_a_short_grid_row_is_measured_again_on_more_trajectories():
    cfg = collapse_jax.SimulationConfig(model="ols", workflow="subsample", n=12, d=2,
                                        generations=3, trajectories=32, seed=0)
    runner = bp.Runner(repeats=2, loop_trajectories=0, ceilings=[])
    row = runner.measure(cfg, "grid/tiny", loop=False, grow=True)
    # Calls of a few ms: grown by the largest factor, in blocks of the size it first ran with
    # (two blocks of 16 on two cores, one of 32 on one), so the same compiled kernel.
    assert row["trajectories_planned"] == 32
    assert row["trajectories"] == 32 * bp.ROW_MAX_GROWTH
    assert row["fits"] == row["trajectories"] * 3
    assert row["engine_block_size"] == collapse_jax.simulate(cfg).block_size
    assert row["engine_run_s"] > 0 and row["numpy_run_s"] > 0
    assert row["alive_engine"] == 1.0 and row["alive_numpy"] == 1.0
    # A grid lookup returns the grown row; a sweep point (no growth) is measured at its own count.
    assert runner.measure(cfg, "grid/tiny", loop=False, grow=True) is row
    point = runner.measure(cfg, "sweep/tiny", loop=False)
    assert point["trajectories"] == point["trajectories_planned"] == 32
    assert point["engine_block_size"] == row["engine_block_size"]


def test_ceilings_only_run_writes_the_documented_record(tmp_path, capsys, monkeypatch, ceilings):
    monkeypatch.setattr(bp, "measure_ceilings", lambda *a, **k: ceilings)  # measured above
    path = tmp_path / "perf.json"
    bp.main(["--quick", "--cases", "nothing", "--normal-size", "4096", "--matmul-size", "32",
             "--json", str(path), "--plot", str(tmp_path / "perf.png")])
    record = json.loads(path.read_text())
    assert set(record) == RECORD_KEYS
    assert record["mode"] == "quick" and record["cases"] == [] and record["targets"] == []
    assert len(record["ceilings"]) == 14
    assert record["environment"]["loadavg_start"] is not None
    assert "== ceilings" in capsys.readouterr().out


def _probe_record(peaks, block=2048):
    samples = [{"trajectories": (i + 1) * block, "peak": p, "rss": p} for i, p in enumerate(peaks)]
    return {"samples": samples, "warmup": {"peak": 500 * 2**20},
            "run": {"trajectories": len(peaks) * block, "peak": max(peaks)}}


def test_memory_analysis_tells_noise_from_a_leak():
    rng = np.random.default_rng(0)
    flat = list(380 * 2**20 + rng.integers(0, 8 * 2**20, 48))
    out = bp.analyse_memory(_probe_record(flat))
    assert not out["growth_detected"] and out["decided"]
    assert out["extrapolated_peak_at_1e8_bytes"] == max(flat)
    assert out["peak_bound_at_1e8_bytes"] == 500 * 2**20  # the warm-up (compile) peak
    leak = [p + 1000 * (i + 1) * 2048 for i, p in enumerate(flat)]  # 1000 B per trajectory
    out = bp.analyse_memory(_probe_record(leak))
    assert out["growth_detected"]
    assert 0.5e11 < out["extrapolated_peak_at_1e8_bytes"] < 2e11  # ~1000 B x 10^8
    assert not bp.analyse_memory(_probe_record(flat[:10]))["decided"]
