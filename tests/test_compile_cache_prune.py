"""The compile cache's size bound (serving/compile_cache.py): pruning deletes whole JAX entries, least recently used
first, stops once under the bound, never touches other files, survives a concurrent pruner, runs once at startup;
`meshserve cache` shows, clears and prunes; a process started after a prune recompiles what went and reads the rest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache
from meshserve.errors import UserError
from meshserve.serving import cli
from meshserve.serving.compile_cache import prune_compile_cache, scan_compile_cache, setup_compile_cache
from test_serving_support import env, meshserve

HASH = "0123456789abcdef" * 4  # JAX's keys end in a sha256 hex digest


pytestmark = pytest.mark.usefixtures("restored_jax_cache")


@pytest.fixture
def cache_cli(monkeypatch):
    """`meshserve cache ...` through the real dispatcher (cli.main), routed as the line for serving/cli.py would."""
    monkeypatch.setitem(cli.COMMANDS, "cache", ("meshserve.serving.compile_cache", "the persistent XLA compile cache"))
    return lambda *argv: cli.main(["cache", *argv])


def _entry(directory, name: str, size: int, used: float, atime_file: bool = False) -> str:
    """A cache entry as JAX names it, `size` bytes, last used at `used` (mtime = atime); returns its key."""
    key = f"{name}-{HASH}"
    (directory / f"{key}-cache").write_bytes(b"x" * size)
    os.utime(directory / f"{key}-cache", (used, used))
    if atime_file:
        (directory / f"{key}-atime").write_bytes(time.time_ns().to_bytes(8, "little"))
        os.utime(directory / f"{key}-atime", (used, used))
    return key


def _foreign(directory) -> dict[str, bytes]:
    """Files a user (or XLA's GPU autotuner) may keep in the directory: none is JAX's entry name."""
    files = {"notes.txt": b"mine", "model-cache": b"no hash", f"jit_f-{HASH}-cache.bak": b"backup", ".lockfile": b""}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (directory / "xla_gpu_per_fusion_autotune_cache_dir").mkdir()
    (directory / "xla_gpu_per_fusion_autotune_cache_dir" / f"jit_g-{HASH}-cache").write_bytes(b"autotune")
    return files


def _cache_keys(directory) -> set[str]:
    """The keys of the -cache files in `directory` (a user's `model-cache` is none)."""
    return {
        p.name.removesuffix("-cache") for p in directory.glob("*-cache") if re.search(r"-[0-9a-f]{64}-cache$", p.name)
    }


def test_real_entries_go_least_recently_used_first_and_pruning_stops_under_the_bound(tmp_path):
    cache = tmp_path / "xla"
    assert setup_compile_cache(str(cache), max_gb=0) == str(cache)
    jax_cache.reset_cache()  # JAX opens its cache once per process: make it open this one
    for n in (3, 5, 7, 11):  # four shapes: four real compiles, four entries
        jax.jit(lambda x: x * 2 + 1)(np.ones((n, n), np.float32)).block_until_ready()
    keys = sorted(_cache_keys(cache))
    assert len(keys) == 4 and all(re.fullmatch(r"jit__lambda-[0-9a-f]{64}", k) for k in keys), keys
    foreign = _foreign(cache)
    # A known order of last use: keys[i] used at t0 + 10 i; keys[0] also has an -atime file written later (JAX's
    # eviction stamp), which makes it the most recent.
    t0 = time.time() - 1000
    for i, key in enumerate(keys):
        os.utime(cache / f"{key}-cache", (t0 + 10 * i, t0 + 10 * i))
    (cache / f"{keys[0]}-atime").write_bytes(b"\0" * 8)
    os.utime(cache / f"{keys[0]}-atime", (t0 + 100, t0 + 100))
    order = [e.key for e in scan_compile_cache(cache)]
    assert order == keys[1:] + keys[:1]
    sizes = {e.key: e.nbytes for e in scan_compile_cache(cache)}
    total = sum(sizes.values())
    bound = total - sizes[keys[1]] - 1  # one byte too many without keys[1]: keys[2] must go too, nothing else
    result = prune_compile_cache(cache, bound)
    assert _cache_keys(cache) == {keys[0], keys[3]} and (cache / f"{keys[0]}-atime").exists()
    assert (result.removed_entries, result.removed_files) == (2, 2)
    assert result.removed_bytes == sizes[keys[1]] + sizes[keys[2]]
    assert result.kept_bytes == total - result.removed_bytes <= bound
    assert all((cache / name).read_bytes() == data for name, data in foreign.items())
    assert (cache / "xla_gpu_per_fusion_autotune_cache_dir" / f"jit_g-{HASH}-cache").exists()
    assert prune_compile_cache(cache, bound).removed_files == 0  # already under the bound: nothing more goes
    assert prune_compile_cache(cache, 0).removed_files == 3  # keys[0] with its -atime, keys[3]
    assert _cache_keys(cache) == set() and all((cache / name).exists() for name in foreign)


def test_a_cache_hit_counts_as_a_use_where_the_filesystem_records_reads(tmp_path):
    cache = tmp_path / "xla"
    setup_compile_cache(str(cache), max_gb=0)
    jax_cache.reset_cache()

    def f(x):
        return x * 3 - 1

    for n in (2, 4):
        jax.jit(f)(np.ones(n, np.float32)).block_until_ready()
    old, new = time.time() - 3000, time.time() - 2000
    for path in cache.glob("*-cache"):  # every entry written long ago, read never since (atime < mtime)
        os.utime(path, (old, new))
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    os.utime(probe, (old, new))
    probe.read_bytes()
    if probe.stat().st_atime <= new:
        pytest.skip("this filesystem does not record reads (noatime): only writes order the cache here")
    first = scan_compile_cache(cache)
    assert len(first) == 2 and {e.last_used for e in first} == {new}
    jax.clear_caches()  # forget the in-memory executables, so the next call reads the persistent cache
    jax_cache.reset_cache()
    jax.jit(f)(np.ones(2, np.float32)).block_until_ready()  # the shape-2 entry: a hit, not a compile
    after = scan_compile_cache(cache)
    assert [e.key for e in after] == [e.key for e in first if e.key != after[-1].key] + [after[-1].key]
    assert after[-1].last_used > new and after[0].last_used == new
    assert prune_compile_cache(cache, after[-1].nbytes).removed_entries == 1  # the unread entry went
    assert _cache_keys(cache) == {after[-1].key}


def test_two_concurrent_prunes_never_crash_and_remove_each_entry_once(tmp_path):
    now = time.time()
    for i in range(400):
        _entry(tmp_path, f"jit_f{i}", 100, now - i, atime_file=i % 2 == 0)
    results, errors = [], []

    def prune():
        try:
            results.append(prune_compile_cache(tmp_path, 0))
        except Exception as e:  # noqa: BLE001 (the assertion below reports it)
            errors.append(e)

    threads = [threading.Thread(target=prune) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and list(tmp_path.iterdir()) == []
    assert sum(r.removed_files for r in results) == 600  # 400 -cache + 200 -atime, each deleted by one of them
    assert sum(r.removed_bytes for r in results) == 400 * 100 + 200 * 8


def test_setup_prunes_at_startup_and_says_so_only_when_it_removed_something(tmp_path, capsys):
    now = time.time()
    keys = [_entry(tmp_path, f"jit_step{i}", 1 << 20, now - 100 * i) for i in range(4)]  # keys[3] least recent
    foreign = _foreign(tmp_path)
    assert setup_compile_cache(str(tmp_path), max_gb=0) == str(tmp_path)  # 0: no limit
    assert len(_cache_keys(tmp_path)) == 4 and capsys.readouterr().err == ""
    setup_compile_cache(str(tmp_path), max_gb=2.5 / 1024)  # 2.5 MiB: the two least recent go
    err = capsys.readouterr().err
    assert err == f"meshserve: compile cache: removed 2 entries (2.0 MiB), 2.0 MiB kept in {tmp_path}\n"
    assert _cache_keys(tmp_path) == set(keys[:2]) and all((tmp_path / n).exists() for n in foreign)
    setup_compile_cache(str(tmp_path), max_gb=2.5 / 1024)
    assert capsys.readouterr().err == ""  # nothing removed, nothing said
    for bad in (-1.0, float("nan")):
        with pytest.raises(UserError, match=r"--compile-cache-max-gb must be >= 0 \(GiB; 0 = no limit\)"):
            setup_compile_cache(str(tmp_path), max_gb=bad)


def test_cache_command_shows_prunes_and_clears_only_entries(tmp_path, cache_cli, capsys, monkeypatch):
    now = time.time()
    keys = [_entry(tmp_path, f"jit_step{i}", 1 << 20, now - 100 * i, atime_file=True) for i in range(3)]
    foreign = _foreign(tmp_path)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path))  # the default directory, as for serve
    assert cache_cli("--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"directory": str(tmp_path), "exists": True, "entries": 3, "bytes": 3 * ((1 << 20) + 8)}
    assert cache_cli("--max-gb", str(1.5 / 1024), "--json") == 0  # 1.5 MiB: keep only the newest
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["entries"] == 1 and pruned["removed_entries"] == 2 and _cache_keys(tmp_path) == {keys[0]}
    assert cache_cli("--compile-cache", str(tmp_path), "--clear") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"removed 1 entry (1.0 MiB), 0.0 MiB kept in {tmp_path}", f"{tmp_path}: 0 entries, 0.0 MiB"]
    assert not list(tmp_path.glob("*-atime")) and all((tmp_path / n).read_bytes() == d for n, d in foreign.items())
    assert cache_cli("--compile-cache", str(tmp_path / "never-made"), "--json") == 0  # shown as empty, not made
    assert json.loads(capsys.readouterr().out)["entries"] == 0 and not (tmp_path / "never-made").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-gb", "-1"], "--max-gb must be > 0"),
        (["--max-gb", "0"], "--max-gb must be > 0"),
        (["--compile-cache", "off"], "--compile-cache takes a directory here"),
        (["--compile-cache", "{file}"], "not a directory"),
        (["--max-gb", "abc"], "invalid float value"),
        (["--clear", "--max-gb", "1"], "not allowed with argument"),
    ],
)
def test_cache_command_refuses_bad_input_with_exit_2(tmp_path, cache_cli, capsys, argv, message):
    (tmp_path / "file").write_text("")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    try:
        code = cache_cli(*argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_serve_refuses_a_negative_bound_before_loading_anything():
    for value, message in (("-1", "--compile-cache-max-gb must be >= 0"), ("lots", "invalid float value")):
        done = subprocess.run(meshserve("serve", "--model", "tiny", "--compile-cache-max-gb", value),
                              capture_output=True, text=True, env=env(), timeout=120)  # fmt: skip
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_process_after_a_prune_recompiles_what_went_and_reads_the_rest(tmp_path):
    cache = tmp_path / "xla"
    cmd = meshserve("generate", "--model", "tiny", "--tokens", "1,2,3", "--max-new-tokens", "3", "--compile-cache",
                    str(cache), "--json")  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert first.returncode == 0, first.stderr
    entries = scan_compile_cache(cache)
    big = next(e for e in entries if e.key.startswith("jit__generate"))
    os.utime(big.files[0], (time.time() - 1000, time.time() - 1000))  # the whole-generation step: least recent
    result = prune_compile_cache(cache, sum(e.nbytes for e in entries) - big.nbytes)
    assert result.removed_entries == 1 and big.key not in _cache_keys(cache)
    kept = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert second.returncode == 0 and second.stdout == first.stdout, second.stderr
    assert _cache_keys(cache) == {e.key for e in entries}  # the pruned step compiled again and was written back
    assert all(cache.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # the rest: read
