"""The core: Dense, Embed, reshaping layers, combinators, named, summary, state;
no import cycle inside the package."""

import ast
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnn
from fnn.model.core import layer_name
from fnn.model.summary import count_params

from suite import check_layer_properties

RTOL_F32 = 1e-6
ATOL_F32 = 1e-6


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (fnn.Dense(3), (-1, 4)),
        (fnn.Dense(3, use_bias=False), (-1, 5, 4)),
        (fnn.Flatten(), (-1, 2, 3)),
        (fnn.Reshape((3, 2)), (-1, 6)),
        (fnn.model.Identity(), (-1, 3)),
        (fnn.serial(fnn.Dense(4), fnn.Dense(2)), (-1, 3)),
        (fnn.parallel(fnn.Dense(2), fnn.model.Identity()), ((-1, 3), (-1, 2))),
        (fnn.serial(fnn.fan_out(2), fnn.fan_in_sum()), (-1, 3)),
        (fnn.serial(fnn.fan_out(2), fnn.fan_in_concat()), (-1, 3)),
        (fnn.serial(fnn.fan_out(2), fnn.fan_in_concat(axis=1)), (-1, 3, 2)),
        (fnn.residual(fnn.Dense(3)), (-1, 3)),
        (fnn.named("x", fnn.Dense(2)), (-1, 3)),
    ],
    ids=lambda v: repr(v) if isinstance(v, fnn.Layer) else None,
)
def test_property_suite(layer, shape):
    check_layer_properties(layer, shape)


def test_embed_property_suite():
    def ids(key, shape):
        return jax.random.randint(key, shape, 0, 7)

    check_layer_properties(fnn.Embed(7, 3), (-1, 5), make_input=ids)


def test_dense_matches_numpy():
    layer = fnn.Dense(3)
    _, params = layer.init(jax.random.key(1), (-1, 4))
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    want = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    got = layer.apply(params, x)
    np.testing.assert_allclose(got, want, rtol=RTOL_F32, atol=ATOL_F32)


JVP_EPS_F64 = 1e-6  # central-difference step; truncation error ~ eps**2
JVP_RTOL_F64 = 1e-7
JVP_ATOL_F64 = 1e-9
LINEARIZE_RTOL_F64 = 1e-12
LINEARIZE_ATOL_F64 = 1e-12
VARIANCE_SIGMAS = 6  # tolerance in standard errors of a sample variance


def _normal_like(seed, tree):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return treedef.unflatten(
        [jnp.asarray(rng.normal(size=a.shape), jnp.float64) for a in leaves]
    )


def _jvp_network():
    return fnn.serial(
        fnn.Conv(4, (3,), padding="SAME"),
        fnn.Gelu(),
        fnn.LayerNorm(),
        fnn.MultiHeadAttention(2, causal=True),
        fnn.RNN(fnn.GRUCell(6)),
        fnn.RNN(fnn.LSTMCell(5)),
        fnn.Dense(3),
    )


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: fnn.Dense(3), (-1, 5, 4)), (_jvp_network, (-1, 5, 3))],
    ids=["dense", "network"],
)
def test_forward_mode_matches_central_differences_and_linearize(make, shape):
    """jax.jvp through Dense and through a network of the library's layers, in
    params and input together, against a central difference in float64."""
    layer = make()
    _, params = layer.init(jax.random.key(0), shape)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x = _normal_like(1, jnp.zeros((2,) + shape[1:]))
        t_params, t_x = _normal_like(2, params), _normal_like(3, x)

        def f(p, v):
            return layer.apply(p, v)

        def moved(h):
            p = jax.tree.map(lambda a, t: a + h * t, params, t_params)
            return f(p, x + h * t_x)

        _, tangent = jax.jit(jax.jvp, static_argnums=0)(f, (params, x), (t_params, t_x))
        numeric = (moved(JVP_EPS_F64) - moved(-JVP_EPS_F64)) / (2 * JVP_EPS_F64)
        np.testing.assert_allclose(
            tangent, numeric, rtol=JVP_RTOL_F64, atol=JVP_ATOL_F64
        )
        _, f_jvp = jax.linearize(f, params, x)
        np.testing.assert_allclose(
            f_jvp(t_params, t_x),
            tangent,
            rtol=LINEARIZE_RTOL_F64,
            atol=LINEARIZE_ATOL_F64,
        )


def test_dense_default_init_has_variance_one_over_fan_in():
    """LeCun normal: Var(w) = 1 / in_features, whatever the layout of ``w``
    (in != out, so a fan-out variance would be four times too small)."""
    n_in, n_out = 256, 1024
    _, params = fnn.Dense(n_out).init(jax.random.key(0), (-1, n_in))
    w = np.asarray(params["w"], np.float64)
    assert w.size == n_in * n_out
    # a sample variance of n normal draws has relative standard error sqrt(2 / n)
    tol = VARIANCE_SIGMAS * np.sqrt(2 / w.size)
    assert abs(w.var() * n_in - 1) < tol, w.var() * n_in
    assert abs(w.mean()) < VARIANCE_SIGMAS * w.std() / np.sqrt(w.size)


def test_embed_looks_up_rows_and_bad_ids_are_nan():
    layer = fnn.Embed(4, 2)
    _, params = layer.init(jax.random.key(0), (-1,))
    table = np.asarray(params["table"])
    got = layer.apply(params, jnp.array([3, 0, 4]))
    np.testing.assert_array_equal(got[:2], table[[3, 0]])
    assert np.isnan(np.asarray(got[2])).all()


def test_embed_negative_ids_are_nan_with_zero_gradient():
    layer = fnn.Embed(4, 2)
    _, params = layer.init(jax.random.key(0), (-1,))
    ids = jnp.array([-1, -4, 4, 1])  # -1 and -4 would wrap to rows 3 and 0
    got = np.asarray(layer.apply(params, ids))
    assert np.isnan(got[:3]).all()
    np.testing.assert_array_equal(got[3], np.asarray(params["table"])[1])
    grad = jax.grad(lambda t: jnp.nansum(layer.apply({"table": t}, ids)))(
        params["table"]
    )
    want = np.zeros((4, 2), np.float32)
    want[1] = 1.0
    np.testing.assert_array_equal(grad, want)


def test_embed_rejects_float_ids():
    layer = fnn.Embed(4, 2)
    _, params = layer.init(jax.random.key(0), (-1,))
    with pytest.raises(
        fnn.ShapeError, match=r"Embed\(.*\): expected integer token ids"
    ):
        layer.apply(params, jnp.ones(3))


def test_no_nonlinearity_collapses_to_one_linear_map():
    net = fnn.serial(fnn.Dense(5), fnn.Dense(3), fnn.Dense(2))
    _, p = net.init(jax.random.key(0), (-1, 4))
    w = p["0_dense"]["w"] @ p["1_dense"]["w"] @ p["2_dense"]["w"]
    b = (p["0_dense"]["b"] @ p["1_dense"]["w"] + p["1_dense"]["b"]) @ p["2_dense"][
        "w"
    ] + p["2_dense"]["b"]
    x = jax.random.normal(jax.random.key(1), (6, 4))
    np.testing.assert_allclose(net.apply(p, x), x @ w + b[None], rtol=1e-5, atol=1e-5)


def test_params_paths_read_like_the_network():
    net = fnn.serial(
        fnn.named("encoder", fnn.serial(fnn.Dense(4), fnn.Dense(4))),
        fnn.residual(fnn.Dense(4)),
        fnn.Dense(2),
    )
    _, params = net.init(jax.random.key(0), (-1, 3))
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    assert paths == [
        "['1_residual']['dense']['b']",
        "['1_residual']['dense']['w']",
        "['2_dense']['b']",
        "['2_dense']['w']",
        "['encoder']['0_dense']['b']",
        "['encoder']['0_dense']['w']",
        "['encoder']['1_dense']['b']",
        "['encoder']['1_dense']['w']",
    ]


def test_named_rejects_duplicates():
    with pytest.raises(ValueError, match=r"names must be unique, got \['a'\]"):
        fnn.serial(fnn.named("a", fnn.Dense(2)), fnn.named("a", fnn.Dense(2)))


def test_serial_rejects_uncalled_constructor():
    with pytest.raises(TypeError, match="did you forget to call it"):
        fnn.serial(fnn.Dense)


def test_init_error_names_layer_place_and_shapes():
    net = fnn.serial(fnn.Flatten(), fnn.Dense(10), fnn.Reshape((7,)))
    with pytest.raises(
        fnn.ShapeError,
        match=r"^Reshape\(\(7,\)\) at serial\[2\]: expected an input with 7 elements "
        r"per example, got shape \(-1, 10\)\.$",
    ):
        net.init(jax.random.key(0), (-1, 4, 4))


def test_apply_error_names_layer_place_and_shapes_under_jit():
    net = fnn.serial(fnn.Dense(8), fnn.serial(fnn.Dense(4), fnn.Dense(2)))
    _, params = net.init(jax.random.key(0), (-1, 3))
    with pytest.raises(
        fnn.ShapeError,
        match=r"^Dense\(features=8\) at serial\[0\]: expected input with last "
        r"dimension 3, got shape \(2, 5\)\.",
    ):
        jax.jit(net.apply)(params, jnp.ones((2, 5)))
    params["1_serial"]["1_dense"]["w"] = jnp.ones((5, 2))
    with pytest.raises(fnn.ShapeError, match=r"at serial\[1\]\.serial\[1\]"):
        net.apply(params, jnp.ones((2, 3)))


def test_foreign_errors_get_a_note_with_the_place():
    def init(key, shape):
        return shape, {}

    def apply(params, x, **kwargs):
        raise TypeError("boom")

    net = fnn.serial(fnn.model.Identity(), fnn.serial(fnn.Layer(init, apply)))
    _, params = net.init(None, (-1, 2))
    with pytest.raises(TypeError, match="boom") as info:
        net.apply(params, jnp.ones((1, 2)))
    notes = info.value.__notes__
    assert notes == [
        "fnn: raised in the layer at serial[1].serial[0] "
        "(params ['1_serial']['0_layer'])"
    ]


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (
            fnn.fan_in_sum(),
            ((-1, 3), (-1, 4)),
            r"fan_in_sum\(\): branch 0 has shape \(-1, 3\) but branch 1 has \(-1, 4\)",
        ),
        (
            fnn.fan_in_concat(),
            ((-1, 3, 2), (-1, 4, 2)),
            r"branch 0 has shape \(-1, 3, 2\) but branch 1 has \(-1, 4, 2\)",
        ),
        (
            fnn.parallel(fnn.Dense(2), fnn.Dense(2)),
            ((-1, 3),),
            r"parallel\(2 layers\): expected 2 inputs, got 1",
        ),
        (
            fnn.residual(fnn.Dense(5)),
            (-1, 3),
            r"residual\(Dense\(features=5\)\): the inner layer maps shape \(-1, 3\) to "
            r"\(-1, 5\)",
        ),
        (fnn.Dense(2), (-1, -1), r"last dimension of the input must be known"),
        (fnn.Dense(2), ((-1, 2), (-1, 2)), r"expected one input shape"),
        (fnn.Flatten(), (-1, -1, 2), r"only the batch dimension may be unknown"),
    ],
)
def test_init_errors(layer, shape, message):
    with pytest.raises(fnn.ShapeError, match=message):
        layer.init(jax.random.key(0), shape)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fnn.Dense(0),
        lambda: fnn.Embed(0, 3),
        lambda: fnn.Reshape((0,)),
        lambda: fnn.fan_out(0),
        lambda: fnn.named("", fnn.Dense(1)),
    ],
)
def test_constructor_argument_errors(make):
    with pytest.raises(ValueError, match="positive int|expected a non-empty"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda n: fnn.Dense(n),
        lambda n: fnn.Embed(n, n),
        lambda n: fnn.Conv(n, (n, n)),
        lambda n: fnn.Reshape((n, n)),
        lambda n: fnn.MaxPool((n,), strides=n),
        lambda n: fnn.repeat(fnn.model.Identity(), n),
    ],
)
def test_numpy_integers_are_accepted_and_bools_refused(make):
    np_layer, py_layer = make(np.int64(3)), make(3)
    chex.assert_equal(repr(np_layer), repr(py_layer))
    with pytest.raises(ValueError, match=r"positive int.*got \(?True"):
        make(True)


@pytest.mark.parametrize(
    ("make", "owner", "name"),
    [
        (lambda v: fnn.Dense(2, use_bias=v), "Dense", "use_bias"),
        (lambda v: fnn.Conv(2, (3,), use_bias=v), "Conv", "use_bias"),
        (lambda v: fnn.ConvTranspose(2, (3,), use_bias=v), "ConvTranspose", "use_bias"),
        (lambda v: fnn.LayerNorm(use_scale=v), "LayerNorm", "use_scale"),
        (lambda v: fnn.BatchNorm(use_bias=v), "BatchNorm", "use_bias"),
        (
            lambda v: fnn.AvgPool((2,), count_include_pad=v),
            "AvgPool",
            "count_include_pad",
        ),
        (lambda v: fnn.MultiHeadAttention(2, causal=v), "MultiHeadAttention", "causal"),
        (lambda v: fnn.RNN(fnn.GRUCell(2), reverse=v), "RNN", "reverse"),
        (lambda v: fnn.RNN(fnn.GRUCell(2), return_carry=v), "RNN", "return_carry"),
        (lambda v: fnn.fan_in_concat(axis=v), "fan_in_concat", "axis"),
    ],
)
def test_flags_and_axes_go_through_the_option_parser(make, owner, name):
    # "no" would be read as true, 1.0 as axis 1: both are refused
    bad = 1.0 if name == "axis" else "no"
    with pytest.raises(ValueError, match=rf"^{owner}: expected {name} to be an? "):
        make(bad)


def test_fan_in_concat_shapes():
    layer = fnn.fan_in_concat(axis=1)
    shape, _ = layer.init(None, ((-1, 3, 2), (-1, 4, 2)))
    assert shape == (-1, 7, 2)
    y = layer.apply({}, (jnp.ones((2, 3, 2)), jnp.zeros((2, 4, 2))))
    chex.assert_shape(y, (2, 7, 2))


def test_rng_keys_differ_per_child_and_none_stays_none():
    seen = []

    def init(key, shape):
        return shape, {}

    def apply(params, x, *, key=None, **kwargs):
        seen.append(key)
        return x

    probe = fnn.Layer(init, apply)
    net = fnn.serial(probe, probe)
    net.apply({"0_layer": {}, "1_layer": {}}, jnp.ones(2))
    # The first apply also checks the params against init, which traces the
    # apply of each layer that is not fnn's own (without a key) once.
    seen.clear()
    net.apply({"0_layer": {}, "1_layer": {}}, jnp.ones(2))
    assert seen == [None, None]
    seen.clear()
    net.apply({"0_layer": {}, "1_layer": {}}, jnp.ones(2), key=jax.random.key(0))
    a, b = (jax.random.key_data(k) for k in seen)
    assert not np.array_equal(a, b)


def test_kwargs_reach_every_child():
    seen = []

    def init(key, shape):
        return shape, {}

    def apply(params, x, *, flag=None, **kwargs):
        if flag is not None:  # not the trace of the params check, without flag
            seen.append(flag)
        return x

    probe = fnn.Layer(init, apply)
    fnn.serial(probe, fnn.parallel(probe)).apply(
        {"0_layer": {}, "1_parallel": {"0_layer": {}}}, (jnp.ones(1),), flag=3
    )
    assert seen == [3, 3]


def test_summary_counts_equal_leaf_sizes():
    net = fnn.serial(fnn.Dense(8), fnn.serial(fnn.Dense(4), fnn.Embed(3, 2)))
    text = fnn.summary(net, (-1, 3))
    _, params = net.init(jax.random.key(0), (-1, 3))
    total = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert text.splitlines()[-1].split() == ["total", str(total)]
    rows = {line.split()[0]: line.split()[-1] for line in text.splitlines()[1:-1]}
    assert rows["serial[0]"] == str(params["0_dense"]["w"].size + 8)
    assert rows["serial[1].serial[1]"] == str(
        params["1_serial"]["1_embed"]["table"].size
    )
    assert count_params(params) == total


def _counter():
    """A toy stateful layer: counts how often it was applied."""

    def init(key, shape):
        fnn.model.state.declare_state("Counter()", jnp.zeros((), jnp.int32))
        return shape, {}

    def apply(params, x, **kwargs):
        n = fnn.model.state.read_state("Counter()")
        fnn.model.state.write_state("Counter()", n + 1)
        return x

    return fnn.make_layer("counter", "Counter()", init, apply)


def test_state_threads_through_serial_with_paths_like_params():
    net = fnn.serial(fnn.Dense(2), fnn.serial(_counter()), _counter())
    model = fnn.with_state(net)
    _, params, state = model.init(jax.random.key(0), (-1, 3))
    assert jax.tree.map(int, state) == {"1_serial": {"0_counter": 0}, "2_counter": 0}
    step = jax.jit(model.apply)
    for _ in range(3):
        _, state = step(params, state, jnp.ones((1, 3)))
    assert jax.tree.map(int, state) == {"1_serial": {"0_counter": 3}, "2_counter": 3}


def test_stateful_layer_without_with_state_explains():
    net = fnn.serial(fnn.Dense(2), _counter())
    _, params = net.init(jax.random.key(0), (-1, 3))
    with pytest.raises(
        fnn.ShapeError, match=r"Counter\(\) at serial\[1\]: .*fnn.with_state"
    ):
        net.apply(params, jnp.ones((1, 3)))


def test_stateless_network_never_sees_state():
    net = fnn.serial(fnn.Dense(2), fnn.Dense(1))
    out = net.init(jax.random.key(0), (-1, 3))
    assert len(out) == 2
    assert net.apply(out[1], jnp.ones((1, 3))).shape == (1, 1)


@pytest.mark.parametrize(
    ("layer", "xs", "message"),
    [
        (
            fnn.fan_in_sum(),
            (jnp.ones((2, 3)), jnp.ones((2, 1))),
            r"fan_in_sum\(\) at serial\[1\]: branch 0 has shape \(2, 3\) but branch "
            r"1 has \(2, 1\)",
        ),
        (
            fnn.fan_in_concat(),
            (jnp.ones((2, 3)), jnp.ones((3, 1))),
            r"fan_in_concat\(axis=-1\) at serial\[1\]: branch 0 has shape \(2, 3\) "
            r"but branch 1 has \(3, 1\)",
        ),
        (
            fnn.fan_in_sum(),
            (),
            r"fan_in_sum\(\) at serial\[1\]: expected a tuple of inputs .*, got an "
            r"empty tuple",
        ),
    ],
)
def test_fan_in_checks_shapes_at_apply_under_jit(layer, xs, message):
    net = fnn.serial(fnn.model.Identity(), layer)
    with pytest.raises(fnn.ShapeError, match=message):
        jax.jit(net.apply)({"0_identity": {}, "1_" + layer_name(layer): {}}, xs)


def test_residual_checks_the_shape_at_apply():
    def init(key, shape):  # claims to keep the shape, returns one column
        return shape, {}

    def apply(params, x, **kwargs):
        return x[:, :1]

    block = fnn.residual(fnn.Layer(init, apply))
    with pytest.raises(
        fnn.ShapeError,
        match=r"residual\(layer\(\.\.\.\)\): the inner layer maps shape \(2, 3\) to "
        r"\(2, 1\)",
    ):
        block.apply({"layer": {}}, jnp.ones((2, 3)))


def test_residual_refuses_a_tuple_of_inputs():
    block = fnn.residual(fnn.parallel(fnn.model.Identity(), fnn.model.Identity()))
    with pytest.raises(fnn.ShapeError, match=r"expected one input shape"):
        block.init(None, ((-1, 2), (-1, 2)))


@pytest.mark.parametrize(
    ("dtype", "detail"),
    [
        (jnp.complex64, "expected a real input, got dtype complex64"),
        (jnp.int32, "expected a floating-point input, got dtype int32"),
        (jnp.bool_, "expected a floating-point input, got dtype bool"),
    ],
)
def test_dense_refuses_complex_and_integer_inputs(dtype, detail):
    net = fnn.serial(fnn.model.Identity(), fnn.Dense(2))
    _, params = net.init(jax.random.key(0), (-1, 3))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(net.apply)(params, jnp.ones((2, 3), dtype))
    assert str(e.value).startswith(f"Dense(features=2) at serial[1]: {detail}")


def _module_imports(path, name, modules):
    """The fnn modules ``path`` imports when it is imported (module level).

    ``from pkg import sub`` counts as importing ``pkg`` too, even when
    ``pkg.sub`` is a module, as cycle checkers read it.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If | ast.Try):
            if "TYPE_CHECKING" not in ast.unparse(getattr(node, "test", ast.Pass())):
                todo += node.body + node.orelse + getattr(node, "finalbody", [])
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found & set(modules)


def test_fnn_has_no_import_cycle():
    root = pathlib.Path(fnn.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = {m: _module_imports(p, m, modules) - {m} for m, p in modules.items()}
    # depth-first search; a module met again while on the path closes a cycle
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n) :] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "import cycles inside fnn:\n" + "\n".join(cycles)
