"""Test set-up: an 8-device CPU mesh stands in for a TPU slice (set before JAX starts), and one persistent XLA
compilation cache in the temp directory for every test and the servers they start (the CLIs would otherwise
default to ~/.cache/meshserve/xla; tests write nothing outside temp)."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"meshserve-test-xla-cache-{os.getuid()}")
)


@pytest.fixture
def restored_jax_cache():
    """For tests that point JAX's persistent cache elsewhere (tmp_path): restore its config afterwards, and make JAX
    re-open its cache from the restored directory."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    jax_cache.reset_cache()


@pytest.fixture(scope="module")
def client(server):
    """A Client of the test module's `server` fixture (a ServerProcess), once that server answers."""
    from meshserve.serving.client import Client

    with Client(server.target) as c:
        c.wait_ready()
        yield c
