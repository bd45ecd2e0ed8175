"""Strict settings for every test: rank promotion is an error, warnings are errors
(pyproject's filterwarnings), and float64 is available through ``jax.enable_x64``."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import jax.numpy as jnp

    import fnn

    doctest_namespace.update(jax=jax, jnp=jnp, fnn=fnn)


# Scripts run in subprocesses by the data-parallel tests; importing them here
# (for --doctest-modules) would run their module-level jax.config updates.
collect_ignore = ["parallel_scripts"]
