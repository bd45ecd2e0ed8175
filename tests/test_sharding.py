"""Params placed by path rules: the rule table, its errors, the optimizer
state's specs, abstract states and the sharding table, in this process.

The rules are resolved against abstract meshes of any shape (nothing runs on
them); training on 8 devices, checkpoints across device counts and two
processes run in subprocesses, in tests/test_parallel.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fnn
from fnn.training import rules

MESH = AbstractMesh((4, 2), ("data", "tp"))
# The single-device step and a one-device mesh step sum in the same order.
F32_TOL = 1e-6


def params_of(**shapes):
    return {name: jnp.zeros(shape) for name, shape in shapes.items()}


NESTED = {
    "encoder": {"0_dense": params_of(w=(8, 4), b=(4,))},
    "head": params_of(w=(4, 2), b=(2,)),
}


def specs(table, params=NESTED, mesh=MESH):
    table = rules.check_rules("test", table, mesh)
    tree = rules.param_specs("test", params, table, mesh)
    return {
        rules.path_name(path): spec
        for path, spec in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_paths_are_keys_joined_by_slashes_and_patterns_are_fnmatch():
    got = specs({"*/w": P("data"), "encoder/*/b": P("tp")})
    assert got == {
        "encoder/0_dense/b": P("tp"),
        "encoder/0_dense/w": P("data"),  # * matches across '/'
        "head/b": P(),  # no rule: replicated
        "head/w": P("data"),
    }


def test_rules_that_agree_on_a_path_are_fine():
    got = specs({"*/w": P("data"), "head/w": P("data", None), "*/b": P()})
    assert got["head/w"] == P("data") and got["head/b"] == P()


def test_rules_that_disagree_on_a_path_are_an_error_naming_both():
    with pytest.raises(ValueError) as e:
        specs({"*/w": P("data"), "h*/w": P(None, "tp")})
    msg = str(e.value)
    assert msg.startswith("test: params path 'head/w' is matched by rules")
    assert "'*/w': P('data',)" in msg and "'h*/w': P(None, 'tp')" in msg


def test_a_dimension_that_does_not_divide_names_path_dimension_and_axis():
    with pytest.raises(ValueError) as e:
        specs({"head/w": P(None, "data")})
    assert str(e.value) == (
        "test: params path 'head/w' of shape (4, 2) has dimension 1 of size 2, "
        "which does not divide over mesh axis 'data' of size 4 (rule 'head/w': "
        "P(None, 'data')); change the rule or make that dimension a multiple of 4."
    )
    with pytest.raises(ValueError, match=r"axes \('data', 'tp'\) of size 8"):
        specs({"*/w": P(("data", "tp"))})


def test_a_spec_longer_than_the_rank_is_an_error():
    with pytest.raises(ValueError, match=r"rule '\*/b' gives params path "):
        specs({"*/b": P(None, "data")})


def test_a_rule_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"the rule '\*/kernel' matches no params"):
        specs({"*/kernel": P("data")})


def test_axes_the_mesh_lacks_or_repeats_and_bad_values_are_errors():
    with pytest.raises(ValueError, match=r"names the axis 'model', but the mesh"):
        specs({"*/w": P("model")})
    with pytest.raises(ValueError, match="uses a mesh axis twice"):
        specs({"*/w": P("data", "data")})
    with pytest.raises(TypeError, match="maps str patterns to"):
        specs({"*/w": ("data",)})
    with pytest.raises(TypeError, match="expected param_rules to be a dict"):
        specs([("*/w", P("data"))])
    with pytest.raises(ValueError, match="^make_train_step: param_rules place"):
        fnn.make_train_step(
            lambda p, b, k: (0.0, 1.0), optax.sgd(0.1), param_rules={"w": P()}
        )
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    with pytest.raises(ValueError, match="^make_train_step: rule '\\*/w': "):
        fnn.make_train_step(
            lambda p, b, k: (0.0, 1.0),
            optax.sgd(0.1),
            mesh=mesh,
            param_rules={"*/w": P("tp")},
        )


def test_the_optimizer_state_follows_its_params():
    params = params_of(w=(8, 4), b=(4,))
    table = {"w": P("data", "tp")}
    param_specs = rules.param_specs("test", params, table, MESH)
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    got = rules.opt_state_specs(adam, adam.init(params), params, param_specs)
    assert got[1][0].mu == {"b": P(), "w": P("data", "tp")}
    assert got[1][0].nu == got[1][0].mu and got[1][0].count == P()
    # Adafactor's factored statistics have their own shapes: replicated.
    ada = optax.adafactor(1e-3, min_dim_size_to_factor=4)
    got = rules.opt_state_specs(ada, ada.init(params), params, param_specs)
    factored = [s for s in jax.tree.leaves(got) if s != P()]
    assert factored == [], got


def loss_fn(params, batch, key):
    err = batch["x"] @ params["w"] + params["b"][None] - batch["y"]
    return jnp.sum(err**2), err.shape[0]


def test_a_one_device_mesh_with_rules_trains_as_the_plain_step():
    mesh = jax.make_mesh((1,), ("data",))
    params = params_of(w=(3, 2), b=(2,))
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(4, 3)).astype(np.float32),
        "y": rng.normal(size=(4, 2)).astype(np.float32),
    }
    kw = {"accum_steps": 2}
    plain = fnn.make_train_step(loss_fn, optax.adam(0.1), **kw)
    ruled = fnn.make_train_step(
        loss_fn, optax.adam(0.1), mesh=mesh, param_rules={"w": P("data")}, **kw
    )
    a = plain.init(params, key=jax.random.key(0))
    b = ruled.init(params, key=jax.random.key(0))
    for _ in range(3):
        a, _ = plain(a, batch)
        b, _ = ruled(b, batch)
    for x, y in zip(jax.tree.leaves(b.params), jax.tree.leaves(a.params)):
        np.testing.assert_allclose(x, y, rtol=F32_TOL, atol=F32_TOL)
    assert isinstance(b.params["w"].sharding, NamedSharding)
    assert not params["w"].is_deleted()  # init copied; donation is safe
    assert "param_rules={'w': P('data',)}" in repr(ruled)


def test_init_of_abstract_params_gives_shardings_and_allocates_nothing():
    mesh = jax.make_mesh((1,), ("data",))
    step = fnn.make_train_step(
        loss_fn, optax.adam(1e-3), mesh=mesh, param_rules={"w": P("data")}
    )
    abstract = jax.eval_shape(lambda: params_of(w=(1024, 256), b=(256,)))
    ts = step.init(abstract, key=jax.random.key(0))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ts))
    assert all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(ts))
    table = step.sharding_table(ts).splitlines()
    assert table[0].split() == [
        "path", "shape", "dtype", "rule", "spec", "bytes/device", "replicated"
    ]  # fmt: skip
    assert table[2].split()[:4] == ["w", "(1024,", "256)", "float32"]
    assert table[-4].split()[-2:] == ["1,049,600", "1,049,600"]  # params
    assert table[-3].split()[-2:] == ["2,099,204", "2,099,204"]  # mu, nu, count
    assert table[-1].startswith("total train state")
    # Without a mesh, abstract params give eval_shape's state.
    plain = fnn.make_train_step(loss_fn, optax.adam(1e-3))
    ts = plain.init(abstract, key=jax.random.key(0))
    assert ts.params["w"].shape == (1024, 256) and ts.params["w"].sharding is None


def test_a_state_the_rules_do_not_fit_is_an_error_at_the_first_call():
    mesh = jax.make_mesh((1,), ("data",))
    step = fnn.make_train_step(
        loss_fn, optax.sgd(0.1), mesh=mesh, param_rules={"v": P("data")}
    )
    ts = fnn.make_train_step(loss_fn, optax.sgd(0.1)).init(
        params_of(w=(3, 2), b=(2,)), key=jax.random.key(0)
    )
    batch = {"x": np.ones((2, 3), np.float32), "y": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match="^train step: the rule 'v' matches no"):
        step(ts, batch)


def test_the_python_blocks_of_docs_scale_run(tmp_path, monkeypatch):
    # On this process's devices (one, in the test run): the examples are
    # written for any device count.
    text = (Path(__file__).resolve().parents[1] / "docs" / "scale.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)  # the checkpoint example writes ./ckpt
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/scale.md block {i}", "exec"), namespace)
    spec = namespace["state"].params["0_dense"]["w"].sharding.spec
    # On one device the spec holds no mesh axis (written P() or P(None, None)).
    if jax.device_count() > 1:
        assert spec == P(None, "tp")
    else:
        assert all(s is None for s in spec), spec
