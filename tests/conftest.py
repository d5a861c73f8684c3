"""Shared test fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The experiment scripts cache compiled steps in ~/.cache by default; tests compile afresh
# (tests/test_compile_cache.py tests the cache in its own folders).
os.environ.setdefault("METAJAX_COMPILE_CACHE", "off")
# XLA:CPU generates code at LLVM -O0 here: compiling dominates the suite, and -O0 made it
# about 40% shorter (566 -> 323 s, 2-core Zen 4). The HLO passes (fusion, layouts, the
# native custom calls) are the same as users get; only LLVM's optimisation of the emitted
# loops is skipped. METAJAX_TEST_XLA_OPT=default tests with XLA's default code generation.
# (Set before any test imports jax's backend, which reads XLA_FLAGS once.)
if os.environ.get("METAJAX_TEST_XLA_OPT", "0") != "default":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()


# One CPU device per test process, as the tests' expected values assume, also where an
# experiment's "--cpu-devices auto" runs in-process before anything else started JAX. Tests
# of several devices run subprocesses that set their own count (tests/test_sharding.py).
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")


def shared_data_root() -> Path:
    """``$METAJAX_DATA`` if set, else ``<repo>/../shared/data``."""
    return Path(os.environ.get("METAJAX_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The data root holding ``omniglot/``; skips when the shared data is absent."""
    root = shared_data_root()
    if not (root / "omniglot" / "images_background.zip").is_file():
        pytest.skip(f"Omniglot zips not found under {root}/omniglot (set METAJAX_DATA to a data "
                    "root holding omniglot/images_background.zip and images_evaluation.zip)")
    return root


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory) -> Path:
    """A per-session cache directory for decoded Omniglot (shared by data and experiment tests)."""
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="session")
def omniglot_full(omniglot_root, omniglot_cache_dir):
    """Full Omniglot at 28x28, decoded once per test session into a temporary cache."""
    from metajax.data.omniglot import load_omniglot

    return load_omniglot(omniglot_root, cache_dir=omniglot_cache_dir)
