"""Test set-up: an 8-device CPU mesh stands in for a TPU slice (set before JAX starts), and one persistent XLA
compilation cache in the temp directory for every test and the servers they start (the CLIs would otherwise
default to ~/.cache/meshserve/xla; tests write nothing outside temp)."""

import os
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"meshserve-test-xla-cache-{os.getuid()}")
)
