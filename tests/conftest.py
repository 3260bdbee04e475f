"""Test set-up: an 8-device CPU mesh stands in for a TPU slice (set before JAX starts), and one persistent XLA
compilation cache in the temp directory for every test and the servers they start (the CLIs would otherwise
default to ~/.cache/meshserve/xla; tests write nothing outside temp).

After each test module JAX's caches are cleared, so the executables the module compiled are freed: on the CPU
each one holds memory maps of its JIT code, and a long-lived xdist worker otherwise reached the kernel's limit
(vm.max_map_count, 65530): a core dump of a crashed worker held 65520 maps, and the next compile (or cache read)
failed and segfaulted in the unwinder while raising that error. The module teardown fails loudly instead if a
worker still holds more than MAX_MAPS after the clear."""

import gc
import os
import tempfile
from pathlib import Path

import pytest

# LLVM at -O0 (XLA's HLO passes, the sharding and the collectives are unchanged; only the CPU machine code is less
# optimized): the suite is compile-bound, and a tiny model's step compiles in about half the time.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"meshserve-test-xla-cache-{os.getuid()}")
)

# Well under vm.max_map_count's default (65530): a module that leaks this many maps past the clear fails its teardown.
MAX_MAPS = 30_000


@pytest.fixture(autouse=True, scope="module")
def freed_executables_after_each_module():
    """Clear JAX's compiled-function caches after the module and collect what only they kept: the engines and
    executables of a finished module go, with their memory maps (see the module docstring)."""
    yield
    import jax
    from meshserve.serving.map_budget import count_maps

    jax.clear_caches()
    gc.collect()
    held = count_maps() or 0  # 0: no /proc here
    assert held < MAX_MAPS, f"this test process holds {held} memory maps after clearing JAX's caches (limit 65530)"


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
