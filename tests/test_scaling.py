"""Scale-out (`_scaling.py`): blocks sharded over devices and processes, same statistics.

Fake CPU devices exist only if the count is set before JAX initialises, so the
multi-device runs happen in subprocesses (4 devices; two processes of 2
devices on loopback), each with a timeout: a sharded program that hangs must
fail the test, not the suite.  The one-device references are computed here
while the subprocess runs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import collapse_jax
from collapse_jax import SimulationConfig, simulate, simulate_trajectories
from collapse_jax._cli import main
from collapse_jax._driver import compile_count

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="fake multi-device runs need the CPU backend")

TIMEOUT = 300  # seconds; a few compiles of tiny kernels take well under a minute

# Five blocks of 8: a 4-device super-block then a padded one.
CONFIGS = {
    "ols": SimulationConfig(n=8, d=2, generations=3, trajectories=37, block_size=8, seed=3),
    "logistic": SimulationConfig(model="logistic", workflow="subsample", n=12, d=2,
                                 generations=3, trajectories=37, block_size=8, seed=5),
}

FOUR_DEVICES = r"""
import json, sys
import numpy as np
import jax
import collapse_jax
from collapse_jax import SimulationConfig, simulate, simulate_trajectories

out = sys.argv[1]
assert jax.device_count() == 4, jax.devices()
for name, d in json.loads(sys.argv[2]).items():
    cfg = SimulationConfig.from_dict(d)
    r = simulate(cfg)  # default: every device
    p = simulate_trajectories(cfg)
    np.savez(f"{out}/{name}.npz", devices=r.devices, count=r.moments.count, sum=r.moments.sum,
             outer=r.moments.outer, failed=r.failed_fits, **p._asdict())

class Stop(Exception):
    pass

def stop(line):
    raise Stop

try:  # killed after its first super-block: a checkpoint of 4 blocks
    simulate(SimulationConfig.from_dict(json.loads(sys.argv[2])["ols"]), out=f"{out}/ckpt",
             progress=stop)
except Stop:
    pass
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(collapse_jax.__file__).parents[1]), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update(extra)
    return env


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A subprocess with stdout and stderr in `log` (a file: no pipe can fill up and block it)."""
    with open(log, "w") as f:
        return subprocess.Popen(args, env=_env(PYTHONFAULTHANDLER="1", **env), stdout=f,
                                stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    """Wait for every process; on a timeout dump their Python stacks, kill them all and fail."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        time.sleep(2)
        pytest.fail(f"timed out after {timeout}s:\n" + "\n".join(
            f"--- {log.name}:\n{log.read_text()[-4000:]}" for log in logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    for p, text in zip(procs, texts, strict=True):
        assert p.returncode == 0, text[-4000:]
    return texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 4-device subprocess's outputs and this process's one-device references."""
    tmp = tmp_path_factory.mktemp("scaling")
    configs = json.dumps({k: c.to_dict() for k, c in CONFIGS.items()})
    log = tmp / "four_devices.log"
    proc = _start([sys.executable, "-c", FOUR_DEVICES, str(tmp), configs], log,
                  JAX_NUM_CPU_DEVICES="4")
    try:
        ref = {k: (simulate(c), simulate_trajectories(c)) for k, c in CONFIGS.items()}
    finally:
        _finish([proc], [log], TIMEOUT)
    return tmp, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_four_devices_match_one(runs, name):
    tmp, ref = runs
    one, paths = ref[name]
    with np.load(tmp / f"{name}.npz") as z:
        assert int(z["devices"]) == 4
        # Every trajectory's path, bit for bit.
        for field, mine in paths._asdict().items():
            np.testing.assert_array_equal(z[field], mine)
        np.testing.assert_array_equal(z["count"], one.moments.count)
        np.testing.assert_array_equal(z["failed"], one.failed_fits)
        for key, mine in (("sum", one.moments.sum), ("outer", one.moments.outer)):
            np.testing.assert_allclose(z[key], mine, rtol=1e-12, atol=1e-12)


def test_checkpoint_of_four_devices_resumes_on_one(runs, tmp_path):
    tmp, ref = runs
    out = tmp_path / "resume"
    shutil.copytree(tmp / "ckpt", out)
    with np.load(out / "checkpoint.npz") as z:
        assert int(z["blocks_done"]) == 4
    lines = []
    r = simulate(CONFIGS["ols"], out=out, progress=lines.append, devices=1)
    assert lines[0] == "[collapse-jax] resuming after block 4/5" and r.devices == 1
    for mine, theirs in zip(r.moments, ref["ols"][0].moments, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """Two processes of 2 CPU devices each resume a one-device checkpoint, then agree with one."""
    cfg = CONFIGS["ols"]

    class Stop(Exception):
        pass

    def stop(line):
        raise Stop

    with pytest.raises(Stop):  # one block done by this process's single device
        simulate(cfg, out=tmp_path / "p0", progress=stop)
    args = [sys.executable, "-m", "collapse_jax", "simulate", "--n", str(cfg.n), "--d", str(cfg.d),
            "--generations", str(cfg.generations), "--trajectories", str(cfg.trajectories),
            "--block-size", str(cfg.block_size), "--seed", str(cfg.seed),
            "--coordinator-address", f"127.0.0.1:{_free_port()}", "--num-processes", "2"]
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [_start(args + ["--process-id", str(i), "--out", str(tmp_path / f"p{i}")], logs[i],
                    JAX_NUM_CPU_DEVICES="2") for i in range(2)]
    errs = _finish(procs, logs, TIMEOUT)
    assert "resuming after block 1/5" in errs[0]
    assert not (tmp_path / "p1").exists()  # only process 0 writes
    with open(tmp_path / "p0" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    one = simulate(cfg).summary  # compiled already by the `runs` fixture
    got = np.array([float(r["variance_ratio"]) for r in rows[1:]])
    np.testing.assert_allclose(got, one.variance_ratio[1:], rtol=1e-12)
    np.testing.assert_allclose([float(r["mse"]) for r in rows], one.mse, rtol=1e-12)
    assert [int(r["trajectories"]) for r in rows] == one.count.astype(int).tolist()
    run = json.loads((tmp_path / "p0" / "run.json").read_text())
    assert run["scaling"] == {"processes": 2, "devices": 4, "devices_per_process": 2,
                              "platform": "cpu", "device_kind": "cpu", "workers": 1}


@pytest.mark.parametrize("argv, message", [
    (["--devices", "0"], "devices must be a positive integer"),
    (["--devices", "64"], "devices=64 but this process sees 1 cpu device"),
    (["--workers", "0"], "workers must be a positive integer"),
    (["--num-processes", "2"], "give both --num-processes and --process-id"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator-address", "h:1"],
     "process_id must be below num_processes"),
    (["--num-processes", "2", "--process-id", "1"], "needs --coordinator-address"),
    (["--coordinator-address", "nohost"], "must be HOST:PORT"),
])
def test_bad_options_fail_before_compiling(argv, message, tmp_path, capsys, monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    before = compile_count()
    code = main(["simulate", "--trajectories", "10", "--n", "5", "--d", "2", "--generations", "2",
                 "--out", str(tmp_path / "x"), "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert compile_count() == before and not (tmp_path / "x").exists()


def test_bad_devices_in_the_api():
    cfg = CONFIGS["ols"]
    with pytest.raises(ValueError, match="positive integer"):
        simulate(cfg, devices=0)
    with pytest.raises(ValueError, match="this process sees 1 cpu device"):
        simulate_trajectories(cfg, np.arange(3), devices=2)


def test_process_options_from_the_environment():
    from collapse_jax._scaling import process_options

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert process_options(None, None, None, environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert process_options(None, 1, 0, environ={}) is None  # one process: no runtime
    assert process_options(None, None, None, environ={}) is None
    assert process_options(None, None, None, auto=True, environ={}) == {
        "coordinator_address": None, "num_processes": None, "process_id": None}


def test_lapack_calls_jaxlib_would_split():
    """The CPU deadlock guard sees batched Cholesky factors large enough to be split."""
    from collapse_jax._scaling import splitting_lapack_calls

    def calls(shape):
        return splitting_lapack_calls(jax.jit(jax.numpy.linalg.cholesky).lower(np.zeros(shape)))

    assert calls((1024, 10, 10)) == ["lapack_dpotrf_ffi"]
    assert calls((8, 2, 2)) == [] and calls((10, 10)) == []


def test_cpu_devices_capped_where_lapack_could_deadlock(monkeypatch):
    from collapse_jax import _scaling

    monkeypatch.setattr(_scaling, "intra_op_threads", lambda: 4)
    splits = lambda: ["lapack_dpotrf_ffi"]  # noqa: E731
    with pytest.warns(RuntimeWarning, match="using 3 of 4 CPU devices"):
        assert _scaling.cpu_safe_devices(4, "cpu", splits) == 3
    assert _scaling.cpu_safe_devices(3, "cpu", splits) == 3  # a thread stays free
    assert _scaling.cpu_safe_devices(4, "cpu", lambda: []) == 4
    assert _scaling.cpu_safe_devices(8, "gpu", splits) == 8
