"""Suite-wide guard: every test must leave the process as it found it, so that no test depends on
another one having run before it (the suite runs in random order, in one or several processes).

Checked around each test: the jax options that change numerics or tracing (x64 above all: use
``with jax.enable_x64(True):``, never ``jax.config.update``), the environment variables and the
current directory. A test that changes one of them fails, and the state is restored for the next
test. (pytest itself restores the warnings filters after each test.) Libraries that set environment
variables when first imported are imported here, so that their import is no test's change.
"""

from __future__ import annotations

import os

import jax
import pytest
import sklearn  # noqa: F401  (sets KMP_* variables when first imported: done here, before any test)

JAX_OPTIONS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_numpy_rank_promotion",
    "jax_debug_nans",
    "jax_disable_jit",
)


def _global_state() -> dict:
    environ = dict(os.environ)
    environ.pop("PYTEST_CURRENT_TEST", None)  # pytest's own, set for each phase of each test
    return {
        "jax": {name: getattr(jax.config, name) for name in JAX_OPTIONS},
        "environ": environ,
        "cwd": os.getcwd(),
    }


def _restore(state: dict) -> None:
    for name, value in state["jax"].items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)
    for key in set(os.environ) - set(state["environ"]) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[key]
    os.environ.update(state["environ"])
    os.chdir(state["cwd"])


def _differences(before: dict, after: dict) -> list[str]:
    changes = [f"jax option {name}: {before['jax'][name]!r} -> {after['jax'][name]!r}"
               for name in JAX_OPTIONS if before["jax"][name] != after["jax"][name]]
    keys = set(before["environ"]) | set(after["environ"])
    changes += [f"environment variable {key}" for key in sorted(keys)
                if before["environ"].get(key) != after["environ"].get(key)]
    if before["cwd"] != after["cwd"]:
        changes.append("current directory")
    return changes


@pytest.fixture(autouse=True)
def _leaves_global_state_unchanged():
    before = _global_state()
    yield
    after = _global_state()
    changes = _differences(before, after)
    if changes:
        _restore(before)
        pytest.fail("the test changed global state that later tests would see: " + "; ".join(changes),
                    pytrace=False)
