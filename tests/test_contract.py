"""The contract checked where it breaks, with the layer and its place.

The outermost apply compares params (and, through ``fnn.with_state``, state)
with what init makes; keys are checked; combinators hold layers that are not
fnn's own to the output shape their init claims and to ``apply(params, x,
**kwargs)``. Each test feeds the mistake and asserts the parts of the message a
user needs.
"""

import jax
import jax.numpy as jnp
import pytest

import fnn


def _mlp(hidden):
    return fnn.serial(fnn.Dense(hidden), fnn.Relu(), fnn.Dense(1))


def test_params_of_another_network_are_refused_eagerly_and_under_jit():
    _, other = _mlp(8).init(jax.random.key(0), (-1, 3))
    net = _mlp(4)
    for apply in (net.apply, jax.jit(net.apply)):
        with pytest.raises(fnn.ShapeError) as e:
            apply(other, jnp.ones((2, 3)))
        message = str(e.value)
        assert message.startswith("serial(3 layers): the params do not fit")
        assert "params['0_dense']['b'] has shape (8,), expected (4,)" in message
        assert "(Dense(features=4) at serial[0]), and 2 more differ" in message


@pytest.mark.parametrize(
    ("edit", "parts"),
    [
        (lambda p: p.pop("1_relu"), ["missing params['1_relu']"]),
        (lambda p: p.update({"3_dense": {}}), ["extra params['3_dense']"]),
        (
            lambda p: p["2_dense"].update(c=jnp.ones(1)),
            ["extra params['2_dense']['c']"],
        ),
        (lambda p: p.clear(), ["missing params['0_dense'], params['1_relu']"]),
    ],
    ids=["missing", "extra", "extra_leaf", "empty"],
)
def test_missing_and_extra_params_are_named(edit, parts):
    net = _mlp(4)
    _, params = net.init(jax.random.key(0), (-1, 3))
    edit(params)
    with pytest.raises(fnn.ShapeError) as e:
        net.apply(params, jnp.ones((2, 3)))
    assert str(e.value).startswith("serial(3 layers): the params do not fit")
    for part in parts:
        assert part in str(e.value)


def test_params_none_is_named():
    with pytest.raises(fnn.ShapeError) as e:
        _mlp(4).apply(None, jnp.ones((2, 3)))
    assert "params is None, expected a dict with keys ['0_dense'" in str(e.value)


def test_wrong_input_still_gets_the_layers_own_error():
    net = _mlp(4)
    _, params = net.init(jax.random.key(0), (-1, 3))
    with pytest.raises(fnn.ShapeError) as e:
        net.apply(params, jnp.ones((2, 5)))
    assert str(e.value).startswith(
        "Dense(features=4) at serial[0]: expected input with last dimension 3"
    )


def test_params_check_traces_init_once_per_signature():
    calls = []

    def init(key, shape):
        calls.append(shape)
        return shape, {}

    def apply(params, x, **kwargs):
        return x

    net = fnn.serial(fnn.Dense(2), fnn.Layer(init, apply))
    _, params = net.init(jax.random.key(0), (-1, 3))
    calls.clear()
    for batch in (2, 2, 5):  # any batch size fits the params
        net.apply(params, jnp.ones((batch, 3)))
    assert calls == [(-1, 2)]
    with jax.enable_x64(True):  # float64 params fit a float32 network
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        net.apply(p64, jnp.ones((2, 3), jnp.float64))


def _stateful():
    return fnn.with_state(fnn.serial(fnn.Dense(3), fnn.BatchNorm()))


def test_with_state_names_swapped_params_and_state():
    model = _stateful()
    _, params, state = model.init(jax.random.key(0), (-1, 2))
    with pytest.raises(fnn.ShapeError) as e:
        jax.jit(model.apply)(state, params, jnp.ones((2, 2)))
    assert str(e.value).startswith(
        "with_state(serial(2 layers)): params and state are swapped"
    )


def test_with_state_checks_the_state_by_path():
    model = _stateful()
    _, params, _ = model.init(jax.random.key(0), (-1, 2))
    _, _, other = fnn.with_state(fnn.serial(fnn.Dense(5), fnn.BatchNorm())).init(
        jax.random.key(0), (-1, 2)
    )
    with pytest.raises(fnn.ShapeError) as e:
        model.apply(params, other, jnp.ones((2, 2)))
    # BatchNorm's own error compares its input with the statistics; the note
    # says which state does not fit the network
    assert str(e.value).startswith("BatchNorm() at serial[1]: expected input with")
    (note,) = [n for n in e.value.__notes__ if n.startswith("fnn: with_state")]
    assert note.startswith("fnn: with_state(serial(2 layers)): the state does not")
    assert "state['1_batchnorm']['mean'] has shape (5,), expected (3,)" in note
    assert "(BatchNorm() at serial[1])" in note


def _claims(out_shape):
    """A custom layer whose init claims ``out_shape``; its apply keeps one column."""

    def init(key, shape):
        return out_shape, {}

    def apply(params, x, **kwargs):
        return x[:, :1]

    return fnn.make_layer("first", "First()", init, apply)


def test_wrong_output_claim_is_blamed_on_the_custom_layer():
    net = fnn.serial(fnn.Dense(3), _claims((-1, 3)), fnn.Dense(2))
    with pytest.raises(fnn.ShapeError) as e:
        net.init(jax.random.key(0), (-1, 4))
    message = str(e.value)
    assert message.startswith("First() at serial[1]: init claims the output shape")
    assert "(-1, 3) but apply returns (2, 1)" in message
    fnn.serial(fnn.Dense(3), _claims((-1, 1))).init(jax.random.key(0), (-1, 4))


def test_check_layer_compares_the_claimed_output_shape():
    with pytest.raises(fnn.ShapeError) as e:
        fnn.check_layer(_claims((-1, 3)), (-1, 3))
    assert str(e.value).startswith("First(): init claims the output shape (-1, 3)")
    assert "apply returns (2, 1)" in str(e.value)


def test_summary_and_check_layer_take_a_model_with_state():
    model = _stateful()
    text = fnn.summary(model, (-1, 2))
    assert text.splitlines()[0].split()[-1] == "state"
    assert text.splitlines()[-1].split() == ["total", "15", "6"]
    assert fnn.check_layer(model, (-1, 2)).passed


def test_apply_without_kwargs_is_explained():
    def init(key, shape):
        return shape, {}

    def apply(params, x):
        return x

    net = fnn.serial(fnn.Dense(2), fnn.serial(fnn.Layer(init, apply)))
    _, params = net.init(jax.random.key(0), (-1, 3))
    with pytest.raises(TypeError) as e:
        net.apply(params, jnp.ones((1, 3)), key=jax.random.key(0))
    message = str(e.value)
    assert message.startswith("layer(...) at serial[1].serial[0]: its apply cannot")
    assert "unexpected keyword argument 'key'" in message
    assert "**kwargs" in message


@pytest.mark.parametrize(
    ("key", "what"),
    [
        (0, "the int 0"),
        (jnp.zeros(2), "an array of dtype float32 and shape (2,)"),
        (jax.random.split(jax.random.key(0)), "a batch of keys of shape (2,)"),
    ],
    ids=["int", "floats", "batch"],
)
def test_bad_keys_are_refused_at_the_root(key, what):
    net = fnn.serial(fnn.Dense(2), fnn.Dropout(0.5))
    _, params = net.init(jax.random.key(0), (-1, 3))
    with pytest.raises(fnn.ShapeError) as e:
        net.apply(params, jnp.ones((1, 3)), key=key)
    message = str(e.value)
    assert message.startswith("serial(2 layers): expected key to be a jax.random.key")
    assert f"got {what}" in message
    net.apply(params, jnp.ones((1, 3)), key=jax.random.PRNGKey(0))  # a raw key


def test_dropout_checks_its_key_inside_a_custom_combinator():
    def init(key, shape):
        return shape, {}

    def apply(params, x, **kwargs):  # passes on a bad key
        return fnn.Dropout(0.5).apply({}, x, key=1)

    net = fnn.serial(fnn.model.Identity(), fnn.Layer(init, apply))
    with pytest.raises(fnn.ShapeError) as e:
        net.apply({"0_identity": {}, "1_layer": {}}, jnp.ones((1, 3)), key=None)
    assert str(e.value).startswith("Dropout(0.5) at serial[1]: expected key")


def test_the_params_check_takes_dict_inputs_and_explains_an_untraceable_init():
    def init(key, shape):
        return (shape["x"][0], 2), {}

    def apply(params, x, **kwargs):
        return x["x"][:, :2]

    net = fnn.serial(fnn.Layer(init, apply), fnn.Dense(3))
    _, params = net.init(jax.random.key(0), {"x": (-1, 4)})
    assert net.apply(params, {"x": jnp.ones((2, 4))}).shape == (2, 3)

    def concrete_init(key, shape):  # float() needs a concrete key
        return shape, {"a": float(jax.random.normal(key))}

    net = fnn.serial(fnn.Layer(concrete_init, lambda p, x, **kw: x * p["a"]))
    _, params = net.init(jax.random.key(0), (-1, 4))
    with pytest.raises(jax.errors.ConcretizationTypeError) as e:
        net.apply(params, jnp.ones((2, 4)))
    assert any(
        n.startswith("fnn: raised by the init of serial(1 layers) under jax.eval_shape")
        for n in e.value.__notes__
    )
