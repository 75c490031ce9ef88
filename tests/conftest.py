"""Fixtures shared by the tests (the environment is set in the root conftest.py)."""

import pytest

from tests import hf_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> directory of a random tiny HF model saved by transformers (fp32)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: hf_models.make_tiny_model(root / kind, kind) for kind in hf_models.KINDS}


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop JAX's compiled executables after each test module: the suite compiles
    thousands of programs, and keeping them all alive exhausts the process's
    memory mappings (vm.max_map_count) late in a full run."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
