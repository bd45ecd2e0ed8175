"""A guard for every test and doctest: none may leave float64 on for the next."""

import jax
import pytest


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    assert not jax.config.jax_enable_x64, f"{item.nodeid} left jax_enable_x64 on"
