"""fnn.check_step (fnn/gradcheck/step.py): each check catches the bug planted for
it, and fnn's own step passes every check, on a mesh too.

The model is tiny (3 -> 4 -> 3, a batch of 8) because each check compiles a
step or two; every planted bug runs only the checks it needs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.gradcheck.step import CHECKS

EXACT_F64 = 1e-12  # what fnn's step reaches against every reference
CAUGHT = 1e-3  # a planted bug is off by far more than that

NET = fnn.serial(fnn.Dense(4), fnn.Tanh(), fnn.Dense(3))
B = 8


def make_params():
    return NET.init(jax.random.key(0), (-1, 3))[1]


def make_batch():
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(B, 3)).astype(np.float32),
        "y": rng.integers(0, 3, B).astype(np.int32),
        "mask": np.ones(B, bool),
    }


def per_example(params, batch, key):
    logits = NET.apply(params, batch["x"], key=key)
    return fnn.losses.softmax_cross_entropy(logits, batch["y"], batch["mask"])


def loss_fn(params, batch, key):
    return fnn.losses.sum_and_weight(per_example(params, batch, key), batch["mask"])


def caught(info, check):
    failure = info.value.report.failures[0]
    assert failure.check == check
    assert failure.rel_err > CAUGHT
    assert f"the {check} check failed at {failure.where()}" in str(info.value)
    return failure


def test_fnn_step_passes_every_check_on_a_mesh():
    mesh = jax.make_mesh((1,), ("data",))
    report = fnn.check_step(loss_fn, make_params(), make_batch(), mesh=mesh)
    assert report.passed and report.skipped == ()
    assert [e.check for e in report.entries] == list(CHECKS)
    for e in report.entries[:-1]:  # exact up to float64 rounding
        assert e.rel_err < EXACT_F64, e
    assert "all 5 checks passed" in str(report)


def test_mean_of_means_is_caught_by_accumulation():
    def mean_loss(params, batch, key):
        loss_sum, weight = loss_fn(params, batch, key)
        return loss_sum / weight, 1.0

    with pytest.raises(fnn.GradientCheckError) as info:
        fnn.check_step(mean_loss, make_params(), make_batch(), checks=["accumulation"])
    assert caught(info, "accumulation").path.startswith("grad['")


def batch_size_weight(params, batch, key):
    """Normalises by the batch size instead of the weight."""
    loss_sum, _ = loss_fn(params, batch, key)
    return loss_sum, batch["mask"].shape[0]


def mask_after_mean(params, batch, key):
    """Applies the mask after a reduction over every row."""
    mask = batch["mask"]
    ce = fnn.losses.softmax_cross_entropy(NET.apply(params, batch["x"]), batch["y"])
    return jnp.mean(ce) * jnp.sum(mask), jnp.sum(mask)


@pytest.mark.parametrize("leaky", [batch_size_weight, mask_after_mean])
def test_a_leaking_mask_is_caught(leaky):
    with pytest.raises(fnn.GradientCheckError) as info:
        fnn.check_step(leaky, make_params(), make_batch(), checks=["mask"])
    caught(info, "mask")


def stepper(first_batch_only):
    """A ``make_step`` whose ``steps_per_call=K`` is a hand-written loop of
    single steps; with ``first_batch_only`` (the bug) every step sees the first
    batch. fnn's own ``steps_per_call`` passes in the first test."""

    def make_step(loss_fn, optimizer, *, steps_per_call=1, **options):
        single = fnn.make_train_step(loss_fn, optimizer, **options)
        if steps_per_call == 1:
            return single

        def many(ts, batches):  # no .init: check_step builds a fnn.TrainState
            metrics = []
            for i in range(steps_per_call):
                j = 0 if first_batch_only else i
                ts, m = single(ts, jax.tree.map(lambda x, j=j: x[j], batches))
                metrics.append(m)
            return ts, jax.tree.map(lambda *m: jnp.stack(m), *metrics)

        return many

    return make_step


def test_a_steps_per_call_bug_is_caught():
    with pytest.raises(fnn.GradientCheckError) as info:
        fnn.check_step(
            loss_fn,
            make_params(),
            make_batch(),
            make_step=stepper(first_batch_only=True),
            steps_per_call=3,
            checks=["steps_per_call"],
        )
    assert caught(info, "steps_per_call").path.startswith("params['")


def test_a_wrong_custom_gradient_in_the_loss_is_caught():
    @jax.custom_vjp
    def square(x):
        return x * x

    square.defvjp(lambda x: (x * x, x), lambda x, g: (g * x,))  # should be 2x

    def loss(params, batch, key):
        loss_sum, weight = loss_fn(params, batch, key)
        return loss_sum + square(params["2_dense"]["b"]).sum(), weight

    params = make_params()
    params["2_dense"]["b"] = jnp.array([0.5, -1.0, 2.0])  # 2x != x away from 0
    with pytest.raises(fnn.GradientCheckError) as info:
        fnn.check_step(loss, params, make_batch(), checks=["gradient"])
    assert caught(info, "gradient").path == "params['2_dense']['b']"


def test_a_loss_with_model_state_is_checked():
    model = fnn.with_state(NET)

    def stateful_loss(params, state, batch, key):
        logits, state = model.apply(params, state, batch["x"], key=key)
        ce = fnn.losses.softmax_cross_entropy(logits, batch["y"], batch["mask"])
        return fnn.losses.sum_and_weight(ce, batch["mask"]), state

    report = fnn.check_step(
        stateful_loss,
        make_params(),
        make_batch(),
        has_state=True,
        state={},
        checks=["accumulation"],
    )
    assert report.entries[0].rel_err < EXACT_F64


def test_skipped_checks_say_why_and_bad_arguments_are_errors():
    batch = {k: v for k, v in make_batch().items() if k != "mask"}
    report = fnn.check_step(
        loss_fn, make_params(), batch, checks=["mask", "mesh"], steps_per_call=1
    )
    assert report.entries == ()
    assert report.skipped == ("mask: the batch has no 'mask' entry", "mesh: no mesh")
    with pytest.raises(ValueError, match=r"unknown checks \['masks'\]"):
        fnn.check_step(loss_fn, make_params(), make_batch(), checks=["masks"])
    with pytest.raises(ValueError, match="a batch of 8 rows .* accum_steps=8"):
        fnn.check_step(loss_fn, make_params(), make_batch(), accum_steps=8)
