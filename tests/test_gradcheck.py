"""Tests of fnn.check_grads: planted gradient bugs are caught, correct twins pass.

Every bug is planted through ``jax.custom_vjp`` or ``jax.custom_jvp``, next to a
bug-free twin with the same structure, and each pair is checked with float32 and
with float64 inputs. The ill-conditioned functions check that correct gradients
raise no false alarm.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fnn.gradcheck import (
    GradCheckReport,
    GradientCheckError,
    check_grads,
    check_layer,
)

DTYPES = [np.float32, np.float64]
SCALE_BUG = 1.001  # a 0.1% error
ELEMENT_BUG = 1.01  # a 1% error on a single element
BUG_INDEX = 417
BIG_BUG_INDEX = 7321


def rng(seed=0):
    return np.random.default_rng(seed)


def with_vjp(fun, grad_rule):
    """``fun`` with a custom VJP whose gradient is ``grad_rule(x, g)``."""
    wrapped = jax.custom_vjp(fun)
    wrapped.defvjp(lambda *a: (fun(*a), a), lambda a, g: grad_rule(*a, g))
    return wrapped


def expect_bug(f, args, **kw):
    with pytest.raises(GradientCheckError) as info:
        check_grads(f, args, **kw)
    assert isinstance(info.value, AssertionError)
    assert not info.value.report.passed
    return info.value.report


def expect_pass(f, args, **kw):
    report = check_grads(f, args, **kw)
    assert isinstance(report, GradCheckReport)
    assert report.passed and report.entries
    return report


# --- planted bugs, each next to its correct twin -------------------------------


def _sin(bug):
    factor = {"sign": -1.0, "scale": SCALE_BUG, None: 1.0}[bug]
    return with_vjp(jnp.sin, lambda x, g: (factor * g * jnp.cos(x),))


def _one_element(n, index, bug):
    def rule(x, g):
        grad = g * jnp.cos(x)
        return (grad.at[index].multiply(ELEMENT_BUG) if bug else grad,)

    return with_vjp(jnp.sin, rule)


def _elu(bug):
    def fun(x):
        return jnp.where(x > 0, x, jnp.expm1(x))

    def rule(x, g):
        neg = jnp.exp(x) * (SCALE_BUG if bug else 1.0)
        return (g * jnp.where(x > 0, 1.0, neg),)

    return with_vjp(fun, rule)


def _matvec(bug):
    m = jnp.asarray(rng(1).standard_normal((4, 4)))  # not symmetric

    def rule(x, g):
        return ((m if bug else m.T) @ g,)

    return with_vjp(lambda x: m @ x, rule)


def _product(bug):
    def rule(x, g):
        missing = 0.0 if bug else jnp.sin(x)
        return (g * (missing + x * jnp.cos(x)),)

    return with_vjp(lambda x: x * jnp.sin(x), rule)


def _centre(bug):
    axis = 0 if bug else 1

    def rule(x, g):
        return (g - jnp.mean(g, axis=axis, keepdims=True),)

    return with_vjp(lambda x: x - jnp.mean(x, axis=1, keepdims=True), rule)


def _softplus_tail(bug):
    def rule(x, g):
        # 1 - sigmoid(-x) equals sigmoid(x) but loses all precision for x << 0.
        grad = 1.0 - jax.nn.sigmoid(-x) if bug else jax.nn.sigmoid(x)
        return (g * grad,)

    return with_vjp(jax.nn.softplus, rule)


def _exp_residual(bug):
    exp = jax.custom_vjp(jnp.exp)

    def fwd(x):
        y = jnp.exp(x)
        return y, (y.astype(jnp.bfloat16) if bug else y)

    exp.defvjp(fwd, lambda y, g: (g * y,))
    return exp


CASES = {
    "wrong sign": (lambda bug: _sin("sign" if bug else None), lambda r: r((5,))),
    "0.1% scale": (lambda bug: _sin("scale" if bug else None), lambda r: r((5,))),
    "one of 1000 elements": (
        lambda bug: _one_element(1000, BUG_INDEX, bug),
        lambda r: r((1000,)),
    ),
    "negative inputs only": (
        _elu,
        lambda r: np.sign(r((6,))) * (0.5 + np.abs(r((6,)))),
    ),
    "transposed jacobian": (_matvec, lambda r: r((4,))),
    "missing product-rule term": (_product, lambda r: r((5,))),
    "reduction over wrong axis": (_centre, lambda r: r((3, 3))),
    "tiny gradient, large relative error": (
        _softplus_tail,
        lambda r: -30.0 + r((8,)),
    ),
    "bf16 residual": (_exp_residual, lambda r: r((5,))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_bug_caught_and_twin_passes(case, dtype):
    make, sample = CASES[case]
    x = sample(rng(2).standard_normal).astype(dtype)
    expect_pass(lambda v: make(False)(v), (x,))
    report = expect_bug(lambda v: make(True)(v), (x,))
    assert report.failures[0].path == "args[0]"
    assert report.failures[0].mode == "rev"


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_bug_is_named(dtype):
    x = rng(3).standard_normal(1000).astype(dtype)
    report = expect_bug(_one_element(1000, BUG_INDEX, True), (x,))
    assert report.failures[0].index == (BUG_INDEX,)


def test_one_element_bug_in_ten_thousand():
    n = 10_000
    x = rng(4).standard_normal(n).astype(np.float32)
    expect_pass(lambda v: jnp.sum(_one_element(n, BIG_BUG_INDEX, False)(v) ** 2), (x,))
    report = expect_bug(
        lambda v: jnp.sum(_one_element(n, BIG_BUG_INDEX, True)(v) ** 2), (x,)
    )
    assert report.failures[0].index == (BIG_BUG_INDEX,)


def _mlp_loss(bug):
    def forward(params, x):
        return jnp.tanh(x @ params["w"] + params["b"][None, :])

    def rule(params, x, g):
        h = forward(params, x)
        dz = g * (1.0 - h * h)
        db = jnp.sum(dz, axis=0) * (SCALE_BUG if bug else 1.0)
        return {"w": x.T @ dz, "b": db}, dz @ params["w"].T

    layer = with_vjp(forward, rule)
    return lambda params, x, y: jnp.mean((layer(params, x) - y) ** 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bug_in_one_leaf_of_several_arguments(dtype):
    r = rng(5)
    params = {
        "w": r.standard_normal((3, 4)).astype(dtype),
        "b": r.standard_normal(4).astype(dtype),
    }
    x, y = r.standard_normal((2, 3)).astype(dtype), r.standard_normal((2, 4))
    expect_pass(_mlp_loss(False), (params, x, y))
    report = expect_bug(_mlp_loss(True), (params, x, y))
    assert {e.path for e in report.failures} == {"args[0]['b']"}
    assert {e.path for e in report.entries if e.passed} >= {"args[0]['w']", "args[1]"}
    assert "args[0]['b']" in str(report)


def _sin_bad_second(bug):
    cos = jax.custom_jvp(jnp.cos)
    cos.defjvp(
        lambda p, t: (jnp.cos(p[0]), (1.0 if bug else -1.0) * jnp.sin(p[0]) * t[0])
    )
    sin = jax.custom_jvp(jnp.sin)
    sin.defjvp(lambda p, t: (jnp.sin(p[0]), cos(p[0]) * t[0]))
    return sin


@pytest.mark.parametrize("dtype", DTYPES)
def test_second_derivative_bug(dtype):
    x = rng(6).standard_normal(4).astype(dtype)
    expect_pass(_sin_bad_second(True), (x,))  # right at first order
    expect_pass(_sin_bad_second(False), (x,), order=2)
    report = expect_bug(_sin_bad_second(True), (x,), order=2)
    assert {e.order for e in report.failures} == {2}
    assert {e.mode for e in report.failures} == {"fwd", "rev"}


# --- correct but ill-conditioned functions: no false alarm ---------------------


def _layer_norm(x):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5)


def _conv(x, w):
    dims = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)


WELL_BEHAVED = {
    "logsumexp near 50": (jax.nn.logsumexp, lambda r: (50 + r((8,)),)),
    "softmax": (jax.nn.softmax, lambda r: (3 * r((6,)),)),
    "layer norm, std 0.01": (_layer_norm, lambda r: (1 + 0.01 * r((2, 16)),)),
    "exp near 10": (jnp.exp, lambda r: (10 + r((5,)),)),
    "1/x near 1e-3": (lambda x: 1 / x, lambda r: (1e-3 * (1.5 + 0.3 * r((5,))),)),
    "convolution": (_conv, lambda r: (r((1, 5, 5, 2)), r((3, 3, 2, 3)))),
    "mlp loss": (
        _mlp_loss(False),
        lambda r: ({"w": r((3, 4)), "b": r((4,))}, r((2, 3)), r((2, 4))),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(WELL_BEHAVED))
def test_no_false_alarm(case, dtype):
    fun, sample = WELL_BEHAVED[case]
    r = rng(7)
    args = jax.tree.map(lambda a: a.astype(dtype), sample(r.standard_normal))
    expect_pass(fun, args)


# --- behaviour ------------------------------------------------------------------


def test_custom_vjp_is_checked_in_reverse_mode_only():
    report = expect_pass(_sin(None), (np.ones(3),))
    assert {e.mode for e in report.entries} == {"rev"}
    assert any("custom_vjp" in n for n in report.notes)


def test_custom_jvp_is_checked_in_both_modes():
    report = expect_pass(_sin_bad_second(False), (np.ones(3),))
    assert {e.mode for e in report.entries} == {"fwd", "rev"}


def test_float32_only_function_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot be checked in float64"):
        check_grads(lambda x: jnp.sin(x.astype(jnp.float32)), (np.ones(3),))


def test_integer_leaves_and_argnums():
    def f(params, ids, scale):
        return jnp.sum(params["table"][ids] * scale)

    params = {"table": rng(8).standard_normal((4, 3)), "step": np.int32(3)}
    ids = np.array([0, 2, 2], np.int32)
    report = expect_pass(f, (params, ids, 2.0), argnums=0)
    assert {e.path for e in report.entries} == {"args[0]['table']"}
    assert any("args[0]['step']" in n for n in report.notes)


def test_mask_excludes_points_where_f_is_not_differentiable():
    x = np.array([-1.0, 0.0, 2.0])
    with pytest.raises(GradientCheckError):
        check_grads(jnp.abs, (x,))
    expect_pass(jnp.abs, (x,), mask=lambda x: (x != 0,))


def test_report_is_data_when_passing():
    report = expect_pass(lambda x: jnp.sum(x**3), (np.arange(1.0, 4.0),))
    for e in report.entries:
        assert e.passed and e.abs_err <= e.tol and e.checked > 0
        assert e.index is not None and e.path == "args[0]"
    assert "All" in str(report)


def _dense(features):
    def init(key, shape):
        w = jax.random.normal(key, (shape[-1], features))
        return (*shape[:-1], features), {"w": w, "b": jnp.zeros(features)}

    def apply(params, x, *, key=None):
        return jnp.tanh(x @ params["w"] + params["b"][None, :])

    return init, apply


def test_check_layer_params_and_input():
    report = check_layer(_dense(3), (-1, 4))
    assert {e.path for e in report.entries} == {"params['w']", "params['b']", "x"}


def test_check_layer_integer_and_multiple_inputs():
    def init(key, shapes):
        return shapes[1], {"table": jax.random.normal(key, (5, shapes[1][-1]))}

    def apply(params, inputs, *, key=None):
        ids, x = inputs
        return params["table"][ids] * x

    report = check_layer(
        (init, apply), ((-1,), (-1, 3)), input_dtype=(jnp.int32, jnp.float32)
    )
    assert {e.path for e in report.entries} == {"params['table']", "x[1]"}


def test_tiny_derivative_bug_is_caught_next_to_large_outputs():
    # The tail error at -30 must not hide behind the derivative of ~1 at +30.
    x = np.array([-30.0, -25.0, 0.0, 30.0])
    report = expect_bug(_softplus_tail(True), (x,))
    assert report.failures[0].index in ((0,), (1,))
    expect_pass(_softplus_tail(False), (x,))


def test_exactly_zero_gradient_is_no_false_alarm():
    # A bias before a normalization has a gradient of exactly 0 that reverse
    # mode rounds to a few ulps while the finite difference is exactly 0.
    def f(b, x):
        h = x + b[None]
        mu = jnp.mean(h, axis=0, keepdims=True)
        var = jnp.var(h, axis=0, keepdims=True)
        return jnp.sum(jnp.sin((h - mu) / jnp.sqrt(var + 1e-5)) * x)

    x = rng(3).normal(size=(4, 3))
    report = expect_pass(f, (np.zeros(3), x), argnums=(0,))
    assert max(abs(e.analytic) for e in report.entries) < 1e-12


def test_repeated_check_gives_the_same_report():
    # The second check of the same function reuses its compiled program.
    x = rng(9).standard_normal((2, 3, 5, 5))
    w = rng(10).standard_normal((4, 3, 3, 3))
    first = expect_pass(_conv_nchw, (x, w))
    again = expect_pass(_conv_nchw, (x, w))
    assert first.entries == again.entries


# --- convolutions: plain autodiff, and a planted bug --------------------------


def _conv_nchw(x, w):
    dims = ("NCHW", "OIHW", "NCHW")
    return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dims)


def _conv_kernel_bug(bug):
    def rule(x, w, g):
        _, pull = jax.vjp(_conv_nchw, x, w)
        dx, dw = pull(g)
        return dx, dw.at[1, 2, 0, 1].multiply(ELEMENT_BUG if bug else 1.0)

    return with_vjp(_conv_nchw, rule)


def test_convolution_kernel_bug_is_named():
    x = rng(11).standard_normal((2, 3, 6, 6))
    w = rng(12).standard_normal((4, 3, 3, 3))
    expect_pass(_conv_kernel_bug(False), (x, w))
    report = expect_bug(_conv_kernel_bug(True), (x, w))
    assert report.failures[0].path == "args[1]"
    assert report.failures[0].index == (1, 2, 0, 1)


# --- second order through custom_vjp: reverse over reverse ---------------------


def _gelu_vjp():
    def gelu(x):
        return jax.nn.gelu(x, approximate=False)

    def rule(x, g):
        cdf = 0.5 * (1.0 + lax.erf(x / np.sqrt(2.0)))
        pdf = jnp.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
        return (g * (cdf + x * pdf),)

    return with_vjp(gelu, rule)


def _silu_vjp(bug):
    """SiLU with a custom backward pass, right at first order for every ``bug``;
    a ``bug`` makes the backward pass's own derivative (the Hessian) wrong."""
    sigmoid = jax.nn.sigmoid
    if bug == "nested custom_vjp":
        # The derivative of the sigmoid inside the backward pass is doubled.
        sigmoid = with_vjp(
            jax.nn.sigmoid,
            lambda x, g: (2.0 * g * jax.nn.sigmoid(x) * jax.nn.sigmoid(-x),),
        )

    def rule(x, g):
        s = sigmoid(x)
        if bug == "stop_gradient":
            return (g * s * (1.0 + x * (1.0 - lax.stop_gradient(s))),)
        return (g * s * (1.0 + x * (1.0 - s)),)

    return with_vjp(jax.nn.silu, rule)


def test_second_order_custom_vjp_is_checked_reverse_over_reverse():
    x = np.linspace(-2.0, 2.0, 5)
    report = expect_pass(_gelu_vjp(), (x,), order=2)
    checked = {(e.of, e.mode) for e in report.entries}
    assert ("vjp(f)", "rev") in checked
    assert not any(e.of.startswith("jvp") for e in report.entries)


@pytest.mark.parametrize("bug", ["stop_gradient", "nested custom_vjp"])
def test_wrong_hessian_of_custom_vjp_is_caught(bug):
    x = np.linspace(-2.0, 2.0, 5)
    expect_pass(_silu_vjp(None), (x,), order=2)
    expect_pass(_silu_vjp(bug), (x,))  # right at first order
    report = expect_bug(_silu_vjp(bug), (x,), order=2)
    assert {e.order for e in report.failures} == {2}
    assert "rev" in {e.mode for e in report.failures}
    assert report.failures[0].of == "vjp(f)"


# --- points where f is not differentiable ---------------------------------------


def _round_straight_through():
    """Rounding with the identity as its gradient: wrong wherever it is checked."""
    return with_vjp(lambda x: jnp.round(x), lambda x, g: (g,))


JUMPS = {
    "floor at integers": (jnp.floor, np.array([1.0, 2.0]), {(0,), (1,)}),
    "sign at 0": (jnp.sign, np.array([-1.0, 0.0, 2.0]), {(1,)}),
    "floor at one integer of 100": (
        jnp.floor,
        np.r_[[0.5] * 57, 3.0, [0.5] * 42],
        {(57,)},
    ),
    "custom_vjp at a jump": (_round_straight_through(), np.array([0.5, 2.5]), None),
}


@pytest.mark.parametrize("case", sorted(JUMPS))
def test_jump_is_reported_as_a_discontinuity(case):
    fun, x, where = JUMPS[case]
    report = expect_bug(fun, (x,))
    worst = report.failures[0]
    assert worst.problem == "jump"
    assert worst.path == "args[0]"
    if where is not None:
        assert worst.index in where
    summary = report.summary()
    assert f"jumps at {worst.where()}" in summary and "mask=" in summary


def test_floor_away_from_its_jumps_passes():
    expect_pass(jnp.floor, (np.array([1.5, -0.25, 2.75]),))


def test_kink_failure_suggests_mask():
    x = np.array([-1.0, 0.0, 2.0])
    report = expect_bug(jax.nn.relu, (x,))
    worst = report.failures[0]
    assert worst.problem == "kink" and worst.where() == "args[0][1]"
    assert "mask=" in report.summary()
    expect_pass(jax.nn.relu, (x,), mask=lambda x: (x != 0,))


def test_infinite_derivative_says_not_finite():
    report = expect_bug(jnp.sqrt, (np.array([0.0, 1.0]),))
    worst = report.failures[0]
    assert worst.problem == "not finite" and worst.where() == "args[0][0]"
    summary = report.summary()
    assert "not finite at args[0][0]" in summary and "mask=" in summary
    assert "tolerance nan" not in summary


# --- arguments check_grads cannot use as they are -------------------------------


def _branchy(x):
    if x[0] > 0:  # Python control flow on a value: cannot be traced
        return jnp.sin(x)
    return jnp.cos(x)


def _branchy_vjp(bug):
    return with_vjp(
        _branchy, lambda x, g: ((SCALE_BUG if bug else 1.0) * g * jnp.cos(x),)
    )


def test_python_control_flow_falls_back_to_evaluation_without_jit():
    x = np.array([0.5, 1.0, 1.5])
    report = expect_pass(_branchy, (x,))
    assert any("could not be traced" in n for n in report.notes)
    assert {e.mode for e in report.entries} == {"fwd", "rev"}
    expect_pass(_branchy_vjp(False), (x,))
    failed = expect_bug(_branchy_vjp(True), (x,)).failures[0]
    assert failed.path == "args[0]" and failed.mode == "rev"


def test_empty_input_is_skipped_with_a_note():
    def f(x, y):
        return jnp.sum(x) + jnp.sum(y**2)

    report = expect_pass(f, (np.zeros((0, 3)), np.ones(3)))
    assert {e.path for e in report.entries} == {"args[1]"}
    assert any("empty" in n and "args[0]" in n for n in report.notes)
    with pytest.raises(ValueError, match="no non-empty floating-point inputs"):
        check_grads(jnp.sum, (np.zeros(0),))


def test_mask_that_leaves_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="mask leaves every element out"):
        check_grads(jnp.sin, (np.ones(3),), mask=(np.zeros(3, bool),))


def test_check_layer_with_state():
    def init(key, shape):
        features = (1, shape[-1])
        return shape, {"scale": jnp.ones(features)}, {"mean": jnp.zeros(features)}

    def apply(params, state, x, *, train):  # fails unless apply_kwargs arrive
        mean = jnp.mean(x, axis=0, keepdims=True) if train else state["mean"]
        return jnp.tanh((x - mean) * params["scale"]), state

    model = (init, apply)
    report = check_layer(model, (-1, 3), apply_kwargs={"train": True})
    assert {e.path for e in report.entries} == {"params['scale']", "x"}


def test_numpy_inside_f_is_a_clear_error():
    def f(x):
        return jnp.asarray(np.sin(np.asarray(x)))  # leaves JAX: not differentiable

    with pytest.raises(jax.errors.TracerArrayConversionError) as info:
        check_grads(f, (np.ones(2),))
    assert any("np.asarray" in note for note in info.value.__notes__)


def test_unchecked_arguments_are_not_fixed_in_the_reused_check():
    # The rule forgets the scale: right only while it is 1. The second check
    # reuses the first one's compiled program with the new scale.
    def f(x, scale):
        return jnp.sin(x) * scale

    buggy = with_vjp(f, lambda x, scale, g: (g * jnp.cos(x), jnp.zeros_like(scale)))
    x = np.array([0.3, 0.6])
    expect_pass(buggy, (x, np.ones(2)), argnums=0)
    report = expect_bug(buggy, (x, np.full(2, 2.0)), argnums=0)
    assert report.failures[0].path == "args[0]"
