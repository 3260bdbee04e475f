"""The persistent compilation cache the serving CLIs turn on by default: where it goes, how to turn it off, and
that an unusable directory never stops a server (default) but is an error when the user named it."""

from __future__ import annotations

import subprocess

import jax
import pytest
from meshserve.errors import UserError
from meshserve.serving.cli_serve import default_compile_cache, setup_compile_cache
from test_serving_support import env, meshserve

pytestmark = pytest.mark.usefixtures("restored_jax_cache")


def test_default_is_the_jax_variable_else_the_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_compile_cache() == tmp_path / "xdg" / "meshserve" / "xla"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert setup_compile_cache(None) == str(tmp_path / "xdg" / "meshserve" / "xla")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "meshserve" / "xla")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jaxvar"))
    assert setup_compile_cache(None) == str(tmp_path / "jaxvar")
    assert setup_compile_cache("off") is None and jax.config.jax_compilation_cache_dir is None


def test_an_unusable_directory_warns_by_default_and_is_an_error_when_named(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "a-file"  # a directory under a plain file cannot be made, even by root
    locked.write_text("")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(locked / "xla"))
    assert setup_compile_cache(None) is None
    assert "compilation cache off" in capsys.readouterr().err
    with pytest.raises(UserError, match="--compile-cache .*cannot write there"):
        setup_compile_cache(str(locked / "xla"))


def test_generate_fills_the_named_cache_and_a_second_run_reads_it(tmp_path):
    cache = tmp_path / "xla"
    cmd = meshserve("generate", "--model", "tiny", "--tokens", "1,2,3", "--max-new-tokens", "4", "--compile-cache",
                    str(cache), "--json")  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit__generate") for name in entries), entries
    second = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing new compiled: every step came from the cache
