"""Tests for fnn.fit: exact resume, NaN handling, history files, evaluation."""

from __future__ import annotations

import csv
import json
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnn

N_TRAIN, N_EVAL, FEATURES, CLASSES, HIDDEN = 44, 13, 4, 3, 8
BATCH = 8  # 5 batches per epoch, 4 examples dropped
PER_EPOCH = N_TRAIN // BATCH
STEPS_PER_CALL_RTOL = 1e-5  # a scan of steps may fuse differently from single steps
EVAL_RTOL = 1e-5  # float32 eval metrics against the float64 numpy reference

OPT = optax.adam(0.05)


def _loss_fn(params, batch, key):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"][None, :])
    logits = h @ params["w2"]
    per_example = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]
    )
    hits = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    if "mask" in batch:
        m = batch["mask"].astype(jnp.float32)
        return jnp.sum(per_example * m), jnp.sum(m), {"accuracy": jnp.sum(hits * m)}
    weight = jnp.asarray(per_example.shape[0], jnp.float32)
    return jnp.sum(per_example), weight, {"accuracy": jnp.sum(hits)}


STEP = fnn.make_train_step(_loss_fn, OPT)
EVAL_STEP = fnn.make_eval_step(_loss_fn)


def _step(steps_per_call=1, loss_fn=_loss_fn):
    return fnn.make_train_step(loss_fn, OPT, steps_per_call=steps_per_call)


def _data(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    return {"x": x, "y": y}


TRAIN, EVAL = _data(0, N_TRAIN), _data(1, N_EVAL)


def _fresh_state():
    k1, k2 = jax.random.split(jax.random.key(42))
    params = {
        "w1": jax.random.normal(k1, (FEATURES, HIDDEN)) * 0.5,
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) * 0.5,
    }
    return STEP.init(params, key=jax.random.key(7))


def _fit(step=STEP, **kwargs):
    kwargs.setdefault("key", jax.random.key(3))
    kwargs.setdefault("progress", False)
    return fnn.fit(step, _fresh_state(), TRAIN, batch_size=BATCH, **kwargs)


def _assert_states_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    np.testing.assert_array_equal(
        jax.random.key_data(a.key), jax.random.key_data(b.key)
    )
    for x, y in zip(
        jax.tree.leaves(a._replace(key=None)), jax.tree.leaves(b._replace(key=None))
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _crash_after(calls):
    count = [0]

    def step(ts, batch):
        count[0] += 1
        if count[0] > calls:
            raise RuntimeError("simulated crash")
        return STEP(ts, batch)

    return step


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_resume_after_a_step_limit_is_bit_exact(tmp_path, steps_per_call):
    step = _step(steps_per_call)
    common = dict(epochs=3, checkpoint_every=2)
    full, full_history = _fit(step, checkpoint_dir=tmp_path / "a", **common)
    _, first_history = _fit(
        step, checkpoint_dir=tmp_path / "b", **{**common, "steps": 7}
    )
    chex.assert_equal(first_history[-1]["step"], 7)
    resumed, history = _fit(step, checkpoint_dir=tmp_path / "b", **common)
    _assert_states_equal(full, resumed)
    chex.assert_equal(int(resumed.step), 3 * PER_EPOCH)
    chex.assert_equal(history, full_history)


def test_resume_after_a_crash_is_bit_exact(tmp_path):
    full, full_history = _fit(epochs=2, checkpoint_dir=tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(
            _crash_after(6), epochs=2, checkpoint_dir=tmp_path / "b", checkpoint_every=3
        )
    with fnn.Checkpointer(tmp_path / "b") as ckpt:
        chex.assert_equal(ckpt.latest_step(), 6)
    resumed, history = _fit(epochs=2, checkpoint_dir=tmp_path / "b", checkpoint_every=3)
    _assert_states_equal(full, resumed)
    chex.assert_equal(history, full_history)


def test_half_written_checkpoint_is_ignored_on_resume(tmp_path):
    full, _ = _fit(epochs=2)
    _fit(steps=4, checkpoint_dir=tmp_path)
    leftover = tmp_path / "8.orbax-checkpoint-tmp-1700000000"
    (leftover / "tree").mkdir(parents=True)
    (leftover / "tree" / "partial").write_bytes(b"\x00\x01")
    resumed, _ = _fit(epochs=2, checkpoint_dir=tmp_path)
    _assert_states_equal(full, resumed)


def test_steps_per_call_sees_the_same_batches(tmp_path):
    one, h1 = _fit(epochs=3, log_every=PER_EPOCH)
    # 15 steps in calls of 4 cross epoch ends; the history grid shortens calls.
    four, h4 = _fit(_step(4), epochs=3, log_every=PER_EPOCH)
    chex.assert_trees_all_close(one.params, four.params, rtol=STEPS_PER_CALL_RTOL)
    chex.assert_equal([e["step"] for e in h4], [5, 10, 15])
    chex.assert_equal(int(four.step), int(one.step))


def test_progress_refresh_does_not_shorten_calls():
    traces = [0]

    def counting_loss(params, batch, key):
        traces[0] += 1  # once per trace: of the scanned step, of a single step
        return _loss_fn(params, batch, key)

    step = _step(4, counting_loss)
    _, history = _fit(step, steps=16, log_every=16, progress_every=3)
    chex.assert_equal(traces[0], 1)  # four 4-step calls, one trace, no single steps
    chex.assert_equal([e["step"] for e in history], [16])


def _numpy_eval(params):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    logits = np.tanh(EVAL["x"] @ p["w1"] + p["b1"][None, :]) @ p["w2"]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -logp[np.arange(N_EVAL), EVAL["y"]].mean()
    return loss, (logits.argmax(-1) == EVAL["y"]).mean()


def test_eval_every_and_history_files(tmp_path):
    json_path, csv_path = tmp_path / "h.jsonl", tmp_path / "h.csv"
    common = dict(epochs=2, eval_step=EVAL_STEP, eval_data=EVAL, eval_every=4)
    ts, history = _fit(history_path=json_path, eval_batch_size=5, **common)
    _, history_csv = _fit(history_path=csv_path, eval_batch_size=5, **common)
    # Entries at each epoch end (5, 10) and each eval point (4, 8), plus the end.
    chex.assert_equal([e["step"] for e in history], [4, 5, 8, 10])
    evaluated = [e["step"] for e in history if "eval_loss" in e]
    chex.assert_equal(evaluated, [4, 8, 10])
    loss, accuracy = _numpy_eval(ts.params)
    np.testing.assert_allclose(history[-1]["eval_loss"], loss, rtol=EVAL_RTOL)
    np.testing.assert_allclose(history[-1]["eval_accuracy"], accuracy, rtol=EVAL_RTOL)
    with open(json_path) as f:  # one JSON object per line
        chex.assert_equal([json.loads(line) for line in f], history)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    chex.assert_equal(list(rows[0]), list(history[0]))  # step 4 has every key
    assert {"loss", "accuracy", "eval_loss", "eval_accuracy"} <= set(rows[0])
    chex.assert_equal(rows[1]["eval_loss"], "")  # step 5 was not evaluated
    for row, entry in zip(rows, history_csv):
        for k, v in entry.items():
            np.testing.assert_allclose(float(row[k]), v, rtol=0)


def test_train_loss_is_the_example_weighted_mean():
    # remainder="pad": the last batch of each epoch has 4 real rows of 8.
    _, history = _fit(epochs=1, remainder="pad", log_every=PER_EPOCH + 1)
    ts, sums, weights, hits = _fresh_state(), [], [], []
    batches = fnn.data.batches(
        TRAIN, BATCH, key=jax.random.key(3), epoch=0, remainder="pad"
    )
    for batch in batches:
        ts, m = STEP(ts, batch)
        sums.append(float(m["loss"]) * float(m["weight"]))
        weights.append(float(m["weight"]))
        hits.append(float(m["accuracy"]) * float(m["weight"]))
    chex.assert_equal(weights[-1], N_TRAIN - (PER_EPOCH) * BATCH)
    np.testing.assert_allclose(history[-1]["loss"], sum(sums) / sum(weights), rtol=1e-6)
    np.testing.assert_allclose(
        history[-1]["accuracy"], sum(hits) / sum(weights), rtol=1e-6
    )


def _poison_from(step_number, what):
    count = [0]

    def step(ts, batch):
        count[0] += 1
        if count[0] >= step_number:
            if what == "loss":
                batch = {**batch, "x": batch["x"] * np.float32(np.nan)}
                return STEP(ts, batch)
            ts, m = STEP(ts, batch)
            params = jax.tree.map(lambda p: p * jnp.inf, ts.params)
            return ts._replace(params=params), m
        return STEP(ts, batch)

    return step


@pytest.mark.parametrize("checkpoint_every, last_good", [(1, 4), (3, 3)])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, checkpoint_every, last_good
):
    with pytest.raises(fnn.training.NonFiniteLossError, match=r"step 5") as info:
        _fit(
            _poison_from(5, "loss"),
            epochs=3,
            checkpoint_dir=tmp_path,
            checkpoint_every=checkpoint_every,
            log_every=1,
        )
    chex.assert_equal(info.value.step, 5)
    assert math.isnan(info.value.loss)
    chex.assert_equal(info.value.last_checkpoint, last_good)
    assert isinstance(info.value, FloatingPointError)
    with fnn.Checkpointer(tmp_path) as ckpt:
        chex.assert_equal(ckpt.latest_step(), last_good)
        for step in ckpt.all_steps():
            restored, meta = ckpt.restore(_fresh_state(), step=step)
            chex.assert_tree_all_finite(restored.params)
            chex.assert_tree_all_finite(restored.opt_state)
    with open(tmp_path / "history.jsonl") as f:
        entries = [json.loads(line) for line in f]
    chex.assert_equal([e["step"] for e in entries], list(range(1, last_good + 1)))
    assert all(math.isfinite(e["loss"]) for e in entries)


def test_nan_loss_without_checkpoints_says_so():
    with pytest.raises(
        fnn.training.NonFiniteLossError, match="No checkpoint was saved"
    ):
        _fit(_poison_from(2, "loss"), epochs=1)


def test_non_finite_params_are_never_saved(tmp_path):
    with pytest.raises(fnn.training.NonFiniteLossError, match="params") as info:
        _fit(
            _poison_from(3, "params"),
            epochs=1,
            checkpoint_dir=tmp_path,
            checkpoint_every=1,
        )
    chex.assert_equal((info.value.step, info.value.loss), (3, None))
    with fnn.Checkpointer(tmp_path) as ckpt:
        chex.assert_equal(ckpt.all_steps(), [1, 2])


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="epochs=, steps="):
        _fit()
    with pytest.raises(ValueError, match="needs key="):
        _fit(epochs=1, key=None)
    with pytest.raises(ValueError, match=r"\.jsonl \(JSON Lines\) or \.csv"):
        _fit(epochs=1, history_path=tmp_path / "h.txt")
    with pytest.raises(ValueError, match="eval_step and eval_data"):
        _fit(epochs=1, eval_step=EVAL_STEP)
    with pytest.raises(ValueError, match="batch_size to be a positive int"):
        fnn.fit(STEP, _fresh_state(), TRAIN, batch_size=0, epochs=1, progress=False)
    _fit(steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="resume=True"):
        _fit(steps=4, checkpoint_dir=tmp_path, resume=False)
    with pytest.raises(ValueError, match="batch_size=8 and 44 examples"):
        fnn.fit(
            STEP,
            _fresh_state(),
            TRAIN,
            batch_size=4,
            steps=4,
            key=jax.random.key(3),
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_batch_sizes_the_step_refuses_are_refused_before_training():
    step = fnn.make_train_step(_loss_fn, OPT, accum_steps=3)
    with pytest.raises(ValueError, match=r"the last batch of 8 .* = 3"):
        # 44 = 4 * 9 + 8: full batches of 9 split into 3, the last one of 8 not
        fnn.fit(step, _fresh_state(), TRAIN, batch_size=9, epochs=1,
                remainder="keep", key=jax.random.key(3), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"batch_size of 7 .*multiple of 3"):
        fnn.fit(step, _fresh_state(), TRAIN, batch_size=7, epochs=1,
                key=jax.random.key(3), progress=False)  # fmt: skip


def test_progress_bar_shows_loss_and_speed(capsys):
    _fit(epochs=1, progress=True, progress_every=2)
    err = capsys.readouterr().err
    assert "loss=" in err and "ex/s=" in err, err
    assert f"{PER_EPOCH}/{PER_EPOCH}" in err, err


def test_digits_example_quick_run_and_resume(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "digits.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as running the script does
    spec = importlib.util.spec_from_file_location("digits_example", path)
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    argv = ["--quick", "--no-progress", "--out", str(tmp_path / "d.png")]
    argv += ["--checkpoint-dir", str(tmp_path / "ckpt")]
    first = digits.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"test accuracy: 0\.\d{4}", lines[-1]), lines
    assert (tmp_path / "d.png").stat().st_size > 0
    with fnn.Checkpointer(tmp_path / "ckpt") as ckpt:
        chex.assert_equal(ckpt.latest_step(), 8)
    # The finished run resumes to its end at once and reports the same result.
    chex.assert_equal(digits.main(argv), first)


def _eval_losses(history):
    return [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]


def test_early_stopping_stops_at_the_right_step():
    common = dict(epochs=12, eval_step=EVAL_STEP, eval_data=EVAL, eval_every=1)
    _, full = _fit(**common)
    evals = _eval_losses(full)
    patience = 2
    best, waited, stop_at = math.inf, 0, None
    for step, loss in evals:  # the rule, replayed on the uninterrupted run
        if loss < best:
            best, waited = loss, 0
        else:
            waited += 1
            if waited == patience:
                stop_at = step
                break
    assert stop_at is not None and stop_at < evals[-1][0], evals
    stopper = fnn.callbacks.EarlyStopping("eval_loss", patience=patience)
    ts, history = _fit(callbacks=[stopper], **common)
    chex.assert_equal(int(ts.step), stop_at)
    chex.assert_equal(history[-1]["step"], stop_at)
    chex.assert_equal(_eval_losses(history), [e for e in evals if e[0] <= stop_at])


def test_best_checkpoint_holds_the_best_evaluation(tmp_path):
    common = dict(epochs=4, eval_step=EVAL_STEP, eval_data=EVAL, eval_every=2)
    best = fnn.callbacks.BestCheckpoint(tmp_path / "best", "eval_loss")
    calls = []

    class Recorder:
        def after_eval(self, run, metrics):
            calls.append((run.step, metrics["eval_loss"]))

    _, history = _fit(callbacks=[best, Recorder()], **common)
    step, loss = min(_eval_losses(history), key=lambda e: e[1])
    chex.assert_equal(calls, _eval_losses(history))
    chex.assert_equal((best.best_step, best.best), (step, loss))
    with fnn.Checkpointer(tmp_path / "best") as ckpt:
        chex.assert_equal(ckpt.all_steps(), [step])
        restored, meta = ckpt.restore(_fresh_state())
    chex.assert_equal(meta["eval_loss"], loss)
    batches = fnn.data.batches(EVAL, 5, shuffle=False, remainder="pad")
    got = fnn.evaluate(EVAL_STEP, restored, batches)
    np.testing.assert_allclose(got["loss"], loss, rtol=EVAL_RTOL)


def test_a_callback_can_stop_training_and_the_run_ends_cleanly(tmp_path):
    class StopAt:
        def after_step(self, run):
            if run.step == 3:
                run.stop("enough")

    ts, history = _fit(
        epochs=5, callbacks=[StopAt()], checkpoint_dir=tmp_path, log_every=2
    )
    chex.assert_equal(int(ts.step), 3)
    chex.assert_equal([e["step"] for e in history], [2, 3])
    with fnn.Checkpointer(tmp_path) as ckpt:
        chex.assert_equal(ckpt.latest_step(), 3)


def test_learning_rate_of_a_schedule_goes_into_the_history():
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    step = fnn.make_train_step(_loss_fn, opt)
    ts = step.init(_fresh_state().params, key=jax.random.key(7))
    _, history = fnn.fit(
        step, ts, TRAIN, batch_size=BATCH, epochs=2, key=jax.random.key(3),
        progress=False,
    )  # fmt: skip
    # the rate the entry's last step used: step t (from 1) used schedule(t - 1)
    for entry in history:
        np.testing.assert_allclose(entry["lr"], schedule(entry["step"] - 1), rtol=1e-6)
    assert "lr" not in _fit(epochs=1)[1][-1]  # plain adam holds no rate


def test_history_files_are_appended_and_checkpoints_hold_no_history(tmp_path):
    path = tmp_path / "h.jsonl"
    _, history = _fit(
        epochs=3, log_every=1, history_path=path, checkpoint_dir=tmp_path / "c",
        checkpoint_every=5,
    )  # fmt: skip
    lines = path.read_text().splitlines()
    chex.assert_equal([json.loads(line) for line in lines], history)
    with fnn.Checkpointer(tmp_path / "c") as ckpt:
        meta = ckpt.metadata()
    assert "history" not in meta and meta["history_entries"] == len(history)
    assert len(json.dumps(meta)) < 2000  # nothing in it grows with the run
    saved = (tmp_path / "c" / "history.jsonl").read_text().splitlines()
    chex.assert_equal([json.loads(line) for line in saved], history)


def test_resume_refuses_another_data_key_or_other_data(tmp_path):
    _fit(steps=3, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="data_key"):
        _fit(steps=6, checkpoint_dir=tmp_path, key=jax.random.key(4))
    other = {**TRAIN, "x": TRAIN["x"] + 1.0}  # same size, other values
    with pytest.raises(ValueError, match=r"another data stream \(data"):
        fnn.fit(
            STEP, _fresh_state(), other, batch_size=BATCH, steps=6,
            key=jax.random.key(3), checkpoint_dir=tmp_path, progress=False,
        )  # fmt: skip
