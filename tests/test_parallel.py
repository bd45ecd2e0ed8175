"""Training on many devices: make_train_step(mesh=...) with replicated params
(data parallel) and with params placed by param_rules (FSDP, tensor parallel),
checkpoints across device counts, and fnn.initialize.

Multi-device and multi-process checks run in subprocesses (the scripts in
tests/parallel_scripts/), each with a hard timeout: the number of CPU devices
must be set before JAX is imported, and jax.distributed can be initialised only
once per process. The scripts report measurements; the assertions are here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "parallel_scripts"
# float64 sums in a different order (per device, then across devices).
F64_TOL = 1e-12
SCRIPT_TIMEOUT_S = 240
# float32 sums in a different order; relative to each leaf's largest entry.
F32_REL_TOL = 1e-5
# A dead peer must be noticed through the heartbeat (5 s in the script).
DEAD_PEER_TIMEOUT_S = 90


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("XLA_FLAGS", None)
    return env


def _run(*args: str, timeout: float = SCRIPT_TIMEOUT_S) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(out: Path, *extra: str) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    script = str(SCRIPTS / "two_processes.py")
    return [
        subprocess.Popen(
            [sys.executable, script, str(out), coordinator, "2", str(pid)]
            + [str(out / "ckpt"), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for pid in (0, 1)
    ]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple]:
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def four_devices() -> dict:
    out = _run(str(SCRIPTS / "four_devices.py"))
    return json.loads(out.strip().splitlines()[-1])


def test_four_devices_equal_one_device_in_float64(four_devices):
    assert four_devices["devices"] == 4
    for case in ("mlp", "batchnorm"):
        r = four_devices[case]
        assert r["dtypes"] == ["float64"], r
        assert r["step"] == 3
        assert r["replicated"], r
        for part in ("params", "opt_state", "state", "metrics"):
            assert r[part] <= F64_TOL, (case, part, r[part])
    assert four_devices["mlp"]["metric_names"] == ["abs", "grad_norm", "loss", "weight"]
    assert four_devices["batchnorm"]["state_leaves"] == 2


def test_one_all_reduce_per_accumulated_step(four_devices):
    # Gradients, weight, loss and metric sums cross devices in ONE all-reduce,
    # after the scan over microbatches.
    assert four_devices["mlp"]["all_reduce"] == 1
    # A BatchNorm synchronised over devices adds its own all-reduces inside
    # the scan body (batch mean and variance, and their gradients), which the
    # HLO text shows once for the whole loop.
    assert four_devices["batchnorm"]["all_reduce"] > 1


def test_batch_that_does_not_split_is_a_clear_error(four_devices):
    msg = four_devices["bad_batch_error"]
    assert msg is not None
    assert "16 examples" in msg and "4 devices" in msg and "accum_steps=3" in msg


def test_two_processes_match_one_process_and_checkpoint(tmp_path):
    _run(str(SCRIPTS / "two_processes.py"), str(tmp_path))
    reference = np.load(tmp_path / "reference.npz")
    results = _wait_all(_start_pair(tmp_path), SCRIPT_TIMEOUT_S)
    for rc, _, err in results:
        assert rc == 0, err[-4000:]
    got = [np.load(tmp_path / f"params_{pid}.npz") for pid in (0, 1)]
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(got[0][name], got[1][name])
        np.testing.assert_allclose(got[0][name], reference[name], rtol=0, atol=F64_TOL)
        for g in got:  # every process saved and restored the same state
            np.testing.assert_array_equal(g["restored_" + name], g[name])
    assert [int(g["restored_step"]) for g in got] == [3, 3]


def test_a_dead_peer_makes_the_survivor_fail_not_hang(tmp_path):
    results = _wait_all(_start_pair(tmp_path, "die"), DEAD_PEER_TIMEOUT_S)
    (rc0, _, err0), (rc1, _, _) = results
    assert rc1 == 17
    assert rc0 != 0, err0[-4000:]
    assert "heartbeat" in err0 or "unhealthy" in err0.lower(), err0[-4000:]


def test_initialize_reads_fnn_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("FNN_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("FNN_NUM_PROCESSES", "4")
    monkeypatch.setenv("FNN_PROCESS_ID", "2")
    fnn.initialize(heartbeat_timeout_seconds=7)
    fnn.initialize("10.0.0.9:99", 2, 1)
    assert calls[0]["coordinator_address"] == "10.0.0.1:1234"
    assert (calls[0]["num_processes"], calls[0]["process_id"]) == (4, 2)
    assert calls[0]["heartbeat_timeout_seconds"] == 7
    assert (calls[1]["coordinator_address"], calls[1]["process_id"]) == (
        "10.0.0.9:99",
        1,
    )
    assert calls[1]["heartbeat_timeout_seconds"] == 15  # bounded by default
    monkeypatch.setenv("FNN_PROCESS_ID", "two")
    with pytest.raises(ValueError, match=r"initialize: .*FNN_PROCESS_ID.*'two'"):
        fnn.initialize()


def test_initialize_leaves_unset_values_to_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in ("FNN_COORDINATOR", "FNN_NUM_PROCESSES", "FNN_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    fnn.initialize()
    assert calls[0]["coordinator_address"] is None
    assert calls[0]["num_processes"] is None and calls[0]["process_id"] is None


def test_argument_errors():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with pytest.raises(ValueError, match="expected mesh to be a jax.sharding.Mesh"):
        fnn.make_train_step(lambda p, b, k: (0.0, 1.0), optax.sgd(0.1), mesh="data")
    with pytest.raises(ValueError, match="not the data axis 'batch'"):
        fnn.make_train_step(
            lambda p, b, k: (0.0, 1.0), optax.sgd(0.1), mesh=mesh, data_axis="batch"
        )
    step = fnn.make_train_step(lambda p, b, k: (0.0, 1.0), optax.sgd(0.1), mesh=mesh)
    with pytest.raises(ValueError, match=r"batch\['x'\] of shape \(\)"):
        step.shard({"x": np.float32(1.0)})


def test_one_device_step_matches_make_train_step():
    # In this process (one CPU device) the parallel step is the plain step.
    def loss_fn(params, batch, key):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.sum(err**2), err.shape[0]

    opt = optax.sgd(0.1)
    params = {"w": jnp.zeros(2)}
    batch = {"x": np.arange(8.0).reshape(4, 2), "y": np.ones(4)}
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    # numpy reference: w -= lr * 2 X^T (X w - y) / n at w = 0
    x, y = batch["x"], batch["y"]
    want = -0.1 * 2 * x.T @ (-y) / 4
    step = fnn.make_train_step(loss_fn, opt, accum_steps=2, mesh=mesh)
    got, _ = step(step.init(params, key=jax.random.key(0)), batch)
    np.testing.assert_allclose(got.params["w"], want, rtol=1e-6, atol=0)
    assert got.params["w"].sharding.is_fully_replicated
    assert not params["w"].is_deleted()  # init copied; donation is safe
    # grad_norm=True adds that metric only.
    step3 = fnn.make_train_step(loss_fn, opt, accum_steps=2, mesh=mesh, grad_norm=True)
    got3, metrics = step3(step3.init(params, key=jax.random.key(0)), batch)
    np.testing.assert_allclose(got3.params["w"], want, rtol=1e-6, atol=0)
    assert set(metrics) == {"grad_norm", "loss", "weight"}


# --- params placed by rules (FSDP, tensor parallel), 8 CPU devices ---


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    out = _run(str(SCRIPTS / "eight_devices.py"))
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "case", ["fsdp", "tp", "fsdp_tp", "fsdp_5_per_call", "fsdp_batchnorm"]
)
def test_sharded_params_train_as_on_one_device(eight_devices, case):
    # 5 Adam steps, accum_steps=2, a padding mask; float32.
    assert eight_devices["devices"] == 8
    r = eight_devices[case]
    assert r["step"] == 5
    for part in ("params", "opt_state", "state", "metrics"):
        assert r[part] <= F32_REL_TOL, (case, part, r[part])
    assert r["mu_follows_params"], r
    assert r["shardings_kept"], r  # the step returns the shardings init made


@pytest.mark.parametrize("case", ["replicated", "fsdp"])
def test_loss_scaling_skips_on_every_device_together(eight_devices, case):
    # An infinite loss on one device's rows: one decision for all 8 devices.
    r = eight_devices["loss_scale"][case]
    assert r == {
        "skipped": [0.0, 1.0],
        "scale": 2.0**14,
        "params_kept": True,
        "scale_replicated": True,
    }


def test_rules_place_the_params(eight_devices):
    assert set(eight_devices["fsdp"]["specs"].values()) == {"P('data',)"}
    tp = eight_devices["tp"]["specs"]
    assert (tp["0_dense/w"], tp["0_dense/b"]) == ("P(None, 'tp')", "P('tp',)")
    assert (tp["2_dense/w"], tp["4_dense/w"]) == ("P('tp',)", "P()")
    both = eight_devices["fsdp_tp"]["specs"]
    assert (both["0_dense/w"], both["2_dense/w"]) == (
        "P('data', 'tp')",
        "P('tp', 'data')",
    )


def test_fsdp_gathers_weights_and_reduces_gradients_in_the_loop(eight_devices):
    # Measured on XLA:CPU (docs/scale.md): each params leaf is all-gathered
    # once, before the accumulation loop; each microbatch's gradient is
    # reduced inside the loop (and each device keeps its shard of it).
    fsdp = eight_devices["fsdp"]["collectives"]
    assert fsdp["outside"].get("all-gather") == 6
    assert fsdp["loop"].get("all-reduce", 0) + fsdp["loop"].get("reduce-scatter", 0)
    # tensor parallel alone gathers nothing: the row-parallel layer's output
    # is all-reduced instead.
    assert "all-gather" not in eight_devices["tp"]["collectives"]["loop"]


def test_sharding_table(eight_devices):
    lines = eight_devices["fsdp_tp"]["table"].splitlines()
    assert lines[0].split()[0] == "path" and lines[0].split()[-1] == "replicated"
    row = lines[2].split()  # 0_dense/w, (8, 16) over data=2 x tp=4
    assert row[0] == "0_dense/w" and row[-2:] == ["64", "512"]
    assert lines[-4].split()[-2:] == ["512", "2,208"]  # the params in all


def test_a_dimension_that_does_not_divide_is_an_error_naming_the_path(eight_devices):
    assert eight_devices["not_dividing_error"] == (
        "step.init: params path 'w' of shape (12, 8) has dimension 0 of size 12, "
        "which does not divide over mesh axis 'data' of size 8 (rule '*': "
        "P('data',)); change the rule or make that dimension a multiple of 8."
    )


def test_sharded_checkpoints_restore_onto_other_device_counts(tmp_path):
    script = str(SCRIPTS / "sharded_checkpoints.py")
    runs = [
        json.loads(_run(script, str(n), str(tmp_path)).strip().splitlines()[-1])
        for n in (1, 8, 1)
    ]
    restores = {k: v for r in runs for k, v in r.items() if "->" in k}
    assert sorted(restores) == [
        "saved_1 -> 8 2x4",
        "saved_1 -> 8 data",
        "saved_8 -> 1 data",
        "saved_8 -> 8 2x4",
    ]
    assert runs[1]["saved_specs"] == ["P('data',)"]  # saved sharded over 8
    for name, result in restores.items():
        for target in ("real", "abstract"):
            want = {"equal": True, "shardings": True, "key": True}
            assert result[target] == want, (name, target)


def test_two_processes_fsdp_match_one_process(tmp_path):
    _run(str(SCRIPTS / "two_processes.py"), str(tmp_path))
    reference = np.load(tmp_path / "reference.npz")
    results = _wait_all(_start_pair(tmp_path, "fsdp"), SCRIPT_TIMEOUT_S)
    for rc, _, err in results:
        assert rc == 0, err[-4000:]
    got = [np.load(tmp_path / f"params_{pid}.npz") for pid in (0, 1)]
    for g in got:  # sharded over the 4 devices of both processes
        assert list(g["specs"]) == ["P(None, 'data')", "P('data',)"]
        assert list(g["restored_specs"]) == list(g["specs"])
        for name in ("w1", "w2"):
            np.testing.assert_allclose(g[name], reference[name], rtol=0, atol=F64_TOL)
            np.testing.assert_array_equal(g["restored_" + name], g[name])
    assert [int(g["restored_step"]) for g in got] == [3, 3]
