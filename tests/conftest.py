"""Test set-up: an 8-device CPU mesh stands in for a TPU slice (set before JAX starts), and one persistent XLA
compilation cache in the temp directory for the servers and CLIs the tests start as subprocesses (they would
otherwise default to ~/.cache/meshserve/xla; tests write nothing outside temp).

The pytest workers themselves compile without the persistent cache: in four of seven full runs one worker died of a
segfault inside jaxlib 0.10.2's CPU executable (de)serialization for that cache (`put_executable_and_time`, then
`get_executable_and_time`: a core dump shows a failed deserialization's C++ exception crashing in libgcc's unwinder,
`_Unwind_Find_FDE`), each time in a long-lived worker that had built and dropped hundreds of executables beside
torch; never in a server subprocess, and not reproduced by a stress script compiling from three threads."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"meshserve-test-xla-cache-{os.getuid()}")
)


def pytest_configure(config):
    """Before any fixture compiles: the cache directory JAX took from the environment is for subprocesses only."""
    import jax

    jax.config.update("jax_compilation_cache_dir", None)


def _compile_cache_config() -> tuple[str | None, float]:
    import jax

    return jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs


@pytest.fixture(autouse=True)
def no_compile_cache_in_the_test_process():
    """In-process compiles skip the persistent cache (see the module docstring); a test that turns it on (a CLI
    entry point run in-process, `setup_compile_cache`, a tmp_path cache) gets it turned off again afterwards, and
    JAX re-opens its cache state."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    saved = _compile_cache_config()
    yield
    if _compile_cache_config() != saved:
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
