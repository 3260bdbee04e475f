"""Checkpoints: round trips in every dtype, restore into a sharding, atomic writes, clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from meshserve.model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info, save_checkpoint
from meshserve.model.config import get_config
from meshserve.model.params import cast_params, init_params
from meshserve.model.quant import QuantizedArray


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    return config, init_params(config, jax.random.key(0))


def _equal(a, b) -> bool:
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


@pytest.mark.parametrize("weights", ["f32", "bf16", "int8"])
def test_round_trip_keeps_every_weight_and_the_config(tmp_path, tiny, weights):
    config, params = tiny
    stored = cast_params(config, params, weights)
    save_checkpoint(tmp_path / "ck", config, stored, weights)
    info, restored = load_checkpoint(tmp_path / "ck")
    assert info.config == config and info.weights == weights
    assert _equal(stored, restored)
    if weights == "int8":
        assert isinstance(restored["layers"]["wq"], QuantizedArray)


def test_load_converts_dtype_on_request(tmp_path, tiny):
    config, params = tiny
    save_checkpoint(tmp_path / "ck", config, cast_params(config, params, "bf16"), "bf16")
    _, q = load_checkpoint(tmp_path / "ck", weights="int8")
    assert q["layers"]["w_up"].values.dtype == jnp.int8


def test_restore_straight_into_a_sharding(tmp_path, tiny):
    config, params = tiny
    save_checkpoint(tmp_path / "ck", config, cast_params(config, params, "int8"), "int8")
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)

    def shardings(abstract):
        # Shard every array's last dim over y when it divides, else replicate.
        def one(a):
            spec = [None] * len(a.shape)
            if a.shape and a.shape[-1] % 4 == 0:
                spec[-1] = "y"
            return NamedSharding(mesh, PartitionSpec(*spec))

        return jax.tree_util.tree_map(one, abstract)

    _, restored = load_checkpoint(tmp_path / "ck", shardings=shardings)
    wq = restored["layers"]["wq"].values  # [N, E, H, Q] = [2, 64, 8, 16]
    assert wq.sharding.spec == PartitionSpec(None, None, None, "y")
    assert wq.addressable_shards[0].data.shape == (2, 64, 8, 4)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, tiny):
    config, params = tiny
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "ck", config, params, "f32")
    with pytest.raises(CheckpointError, match=r"params leaf \['embed'\] is not an array"):
        save_checkpoint(tmp_path / "bad", config, dict(params, embed=object()), "f32")
    # Fails after the weights are written (the tokenizer file is missing): nothing may be left behind.
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*half: No such file .*missing\.json"):
        save_checkpoint(tmp_path / "half", config, params, "f32", tokenizer_file=tmp_path / "missing.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_missing_and_corrupt_checkpoints_give_clear_errors(tmp_path, tiny):
    config, params = tiny
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint_info(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a meshserve checkpoint"):
        read_checkpoint_info(tmp_path / "empty")
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    meta = tmp_path / "ck" / "meshserve.json"
    good = meta.read_text()
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        read_checkpoint_info(tmp_path / "ck")
    # A config that does not match the stored weights.
    wrong = json.loads(good)
    wrong["model"]["d_model"] = 32
    meta.write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match="cannot restore"):
        load_checkpoint(tmp_path / "ck")
    meta.write_text(good)
    shutil.rmtree(tmp_path / "ck" / "params")
    with pytest.raises(CheckpointError, match="no params/ directory"):
        load_checkpoint(tmp_path / "ck")


def test_restored_int8_model_computes_what_was_saved(tmp_path, tiny):
    from meshserve.model.generate import generate

    config, params = tiny
    q = cast_params(config, params, "int8")
    save_checkpoint(tmp_path / "ck", config, q, "int8")
    _, restored = load_checkpoint(tmp_path / "ck")
    a = generate(q, config, [[1, 2, 3]], max_new_tokens=6)[0]
    b = generate(restored, config, [[1, 2, 3]], max_new_tokens=6)[0]
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs)


def _convert(capsys, *argv):
    from meshserve.serving.cli import main

    code = main(["convert", *map(str, argv)])
    return code, capsys.readouterr().err


def test_convert_to_an_unwritable_out_is_one_line_exit_2(tmp_path, tiny, capsys):
    config, params = tiny
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    (tmp_path / "file").write_text("x")
    for out in ("/proc/nope/ck", tmp_path / "file" / "ck"):
        code, err = _convert(capsys, "--checkpoint", tmp_path / "ck", "--out", out, "--weights", "bf16")
        last = err.strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err and last.startswith("meshserve convert: error:"), err
        assert "is not a directory" in last or "cannot write checkpoint" in last, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "file"]  # nothing half-written


def test_save_into_an_impossible_parent_is_a_checkpoint_error(tmp_path, tiny):
    config, params = tiny
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint("/proc/nope/ck", config, params, "f32")


def test_overwrite_swaps_atomically_and_keeps_the_old_one_on_failure(tmp_path, tiny, monkeypatch):
    import meshserve.model.checkpoint as ck

    config, params = tiny
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    save_checkpoint(tmp_path / "ck", config, params, "bf16", overwrite=True)
    assert read_checkpoint_info(tmp_path / "ck").weights == "bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no backup or temporary left behind
    # The rename of the new checkpoint into place fails: the old one must still be there, whole.
    real_replace = ck.os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck", config, params, "f32", overwrite=True)
    monkeypatch.undo()
    assert read_checkpoint_info(tmp_path / "ck").weights == "bf16"
    _, restored = load_checkpoint(tmp_path / "ck")
    assert restored["embed"].dtype == jnp.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_overwrite_refuses_anything_but_a_checkpoint(tmp_path, tiny, capsys):
    config, params = tiny
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for target in ("file", "hf"):
        with pytest.raises(CheckpointError, match="is not a meshserve checkpoint"):
            save_checkpoint(tmp_path / target, config, params, "f32", overwrite=True)
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    for argv in (["--from-hf", tmp_path / "hf", "--out", tmp_path / "hf"],  # the source itself
                 ["--checkpoint", tmp_path / "ck", "--out", tmp_path / "file", "--weights", "bf16"],
                 ["--checkpoint", tmp_path / "ck", "--out", tmp_path / "hf", "--weights", "bf16"]):  # fmt: skip
        code, err = _convert(capsys, *argv, "--force")
        assert code == 2 and err.count("\n") == 1 and ("must differ" in err or "not a meshserve checkpoint" in err)
    assert (tmp_path / "file").read_text() == "keep me" and (tmp_path / "hf" / "config.json").exists()


def test_weights_of_another_shape_fail_in_one_line_without_tracebacks(tmp_path, tiny):
    """A config edited by hand (or weights from another model): one line naming the first weight that does not
    fit, exit 2, and nothing after it (a failed orbax restore used to print 'Event loop is closed' tracebacks)."""
    import subprocess
    import sys

    config, params = tiny
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    meta = tmp_path / "ck" / "meshserve.json"
    wrong = json.loads(meta.read_text())
    wrong["model"]["d_model"] = 32
    meta.write_text(json.dumps(wrong))
    cmd = [sys.executable, "-m", "meshserve.serving.cli", "generate", "--checkpoint", str(tmp_path / "ck"), "hi"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"meshserve generate: error: cannot restore {tmp_path / 'ck' / 'params'} as {config.name} (f32): embed is "
        "stored with shape (256, 64), the config needs (256, 32)"
    ]


def test_a_save_removes_the_temporary_directories_of_dead_writers_only(tmp_path, tiny):
    """kill -9 (or the OOM killer) mid-save leaves .NAME.tmp-HOST-PID-X beside NAME: a partial copy of the weights.
    The next save to NAME on this host removes those whose process is gone and that nothing wrote to for 10 minutes;
    it keeps a live process's, another host's, and a recently written one (a writer in another PID namespace under
    the same host name may still be at it). Before, they stayed forever."""
    import subprocess
    import sys
    import time

    from meshserve.model.checkpoint_files import _host

    config, params = tiny
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, host = int(gone.stdout), _host()
    leftovers = {
        "dead": tmp_path / f".ck.tmp-{host}-{dead}-0badc0de",
        "dead, written just now": tmp_path / f".ck.tmp-{host}-{dead}-0badbeef",
        "live": tmp_path / f".ck.tmp-{host}-{os.getpid()}-00c0ffee",
        "other host": tmp_path / f".ck.tmp-elsewhere-{dead}-0badf00d",
        "other name": tmp_path / f".ck2.tmp-{host}-{dead}-0badc0de",
    }
    old = time.time() - 1200
    for name, directory in leftovers.items():
        (directory / "params").mkdir(parents=True)
        (directory / "params" / "part").write_bytes(b"x" * 1000)
        if name != "dead, written just now":
            for p in (directory / "params" / "part", directory / "params", directory):
                os.utime(p, (old, old))
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    assert read_checkpoint_info(tmp_path / "ck").weights == "f32"
    kept = {name for name, directory in leftovers.items() if directory.exists()}
    assert kept == {"dead, written just now", "live", "other host", "other name"}


def test_an_old_checkpoint_left_aside_by_a_killed_save_is_removed_only_while_name_exists(tmp_path, tiny):
    """A save over NAME moves the old one to .NAME.old-HOST-PID-X and removes it after the new one is in place;
    killed in between, the old copy stays. The next save removes a dead writer's while NAME exists, and keeps it
    while NAME is missing (killed between the two renames: it is then the only copy)."""
    import subprocess
    import sys
    import time

    from meshserve.model.checkpoint_files import _host, remove_dead_writers

    config, params = tiny
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    backup = tmp_path / f".ck.old-{_host()}-{int(gone.stdout)}-0badc0de"
    (backup / "params").mkdir(parents=True)
    old = time.time() - 1200
    for p in (backup / "params", backup):
        os.utime(p, (old, old))
    remove_dead_writers(tmp_path / "ck")  # no ck: the old copy is all there is
    assert backup.exists()
    save_checkpoint(tmp_path / "ck", config, params, "f32")
    save_checkpoint(tmp_path / "ck", config, params, "f32", overwrite=True)  # ck exists now: the leftover goes
    assert not backup.exists() and read_checkpoint_info(tmp_path / "ck").weights == "f32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # and the second save's own backup is gone too
