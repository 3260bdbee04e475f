"""`meshserve generate --mesh ... --prefill-layout ... --decode-layout ... --attention ...`: the same --json output
as one device, and one-line errors (exit 2, nothing compiled) for meshes and layouts that cannot work."""

import json

import jax
import pytest
from cli_helpers import checkpoint_fixture, run_cli
from meshserve.model.checkpoint import save_checkpoint
from meshserve.model.config import get_config
from meshserve.model.params import init_params
from meshserve.serving.cli import main

checkpoint = checkpoint_fixture(seed=3, n_kv_heads=8)


def test_json_output_unchanged_under_a_mesh(capsys, checkpoint):
    base = ["generate", "--checkpoint", checkpoint, "--json", "--max-new-tokens", "8", "--tokens", "1,2,3,4,5",
            "--tokens", "9,8"]  # fmt: skip
    code, one_device, _ = run_cli(capsys, *base)
    assert code == 0
    flags = ["--mesh", "2x2x2", "--prefill-layout", "wg-xy", "--decode-layout", "ws2d", "--attention", "batch",
             "--collective-matmul"]  # fmt: skip
    code, on_mesh, err = run_cli(capsys, *base, *flags)
    assert code == 0, err
    a, b = ([json.loads(line) for line in out.splitlines()] for out in (one_device, on_mesh))
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] and len(a) == 2
    assert all(
        abs(x - y) < 1e-4
        for ra, rb in zip(a, b, strict=True)
        for x, y in zip(ra["logprobs"], rb["logprobs"], strict=True)
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mesh", "2x2x4"], "mesh 2x2x4 has 16 chips (x*y*z) but there are 8 devices"),
        (["--mesh", "2x2x2", "--prefill-layout", "ws1d"], "store weights differently"),
        (
            ["--mesh", "1x1x8", "--attention", "heads", "four-heads"],
            "n_heads H = 4 is not divisible by the ws2d split 8",
        ),
        (["--mesh", "2x2x2", "--decode-layout", "wg-x", "--collective-matmul"], "--collective-matmul needs"),
        (["--mesh", "2x2x2", "--prefill-layout", "wg-x", "--attention", "heads"], "means nothing under wg-x"),
    ],
)
def test_bad_mesh_or_layout_is_one_line_exit_2(capsys, checkpoint, tmp_path, flags, message):
    if "four-heads" in flags:  # a model whose 4 heads cannot split over the 8 chips of y·z
        flags = [f for f in flags if f != "four-heads"]
        config = get_config("tiny", n_heads=4)
        checkpoint = str(save_checkpoint(tmp_path / "h4", config, init_params(config, jax.random.key(0)), "f32"))
    argv = ["generate", "--tokens", "1,2,3", "--max-new-tokens", "2", *flags]
    code, _, err = run_cli(capsys, *argv, "--checkpoint", checkpoint)
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_malformed_mesh_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--tokens", "1,2,3", "--mesh", "2x2"])
    assert exit_.value.code == 2 and "mesh must be XxYxZ" in capsys.readouterr().err


def test_api_refuses_a_batch_smaller_than_its_split_before_compiling():
    import jax.numpy as jnp
    from meshserve.errors import UserError
    from meshserve.model import sharded
    from meshserve.partition.mesh import make_mesh
    from meshserve.partition.rules import Layout

    config = get_config("tiny")
    mesh = make_mesh("2x2x2")
    params = sharded.shard_params(init_params(config, jax.random.key(0)), config, mesh, "ws2d")
    tokens, lengths = jnp.ones((1, 4), jnp.int32), jnp.full((1,), 4)
    before = sharded._prefill._cache_size()  # other tests in this process may have compiled prefills already
    with pytest.raises(UserError, match=r"batch 1 cannot be split"):
        sharded.prefill(params, config, tokens, lengths, mesh=mesh, layout=Layout("ws2d", "batch"))
    with pytest.raises(UserError, match=r"batch B = 2 .* split 8"):
        sharded.init_cache(config, mesh, Layout("wg-xyz", "batch"), 2, 16)
    assert sharded._prefill._cache_size() == before  # nothing was traced or compiled


def test_bad_shapes_and_storage_are_layout_errors_before_compiling():
    import jax.numpy as jnp
    from meshserve.model import sharded
    from meshserve.partition.comm import LayoutError
    from meshserve.partition.mesh import make_mesh
    from meshserve.partition.rules import Layout

    with pytest.raises(LayoutError, match="no devices"):
        make_mesh("1x1x1", devices=[])
    config = get_config("tiny")
    mesh = make_mesh("2x2x2")
    layout = Layout("ws2d", "heads")
    params = init_params(config, jax.random.key(0))
    cache = sharded.init_cache(config, mesh, layout, 2, 8)
    k = jnp.zeros((config.n_layers, 2, 16, config.n_kv_heads, config.d_head), jnp.bfloat16)
    before = sharded._insert._cache_size(), sharded._decode._cache_size(), sharded._prefill._cache_size()
    with pytest.raises(LayoutError, match=r"T = 16 exceeds the cache length S = 8"):
        sharded.insert(cache, k, k, jnp.full((2,), 16), jnp.arange(2), config=config, mesh=mesh,
                       prefill_layout=layout, decode_layout=layout)  # fmt: skip
    with pytest.raises(LayoutError, match=r"shape \(4,\); the cache has batch B = 2"):
        sharded.decode_step(params, config, jnp.zeros((4,), jnp.int32), cache, mesh=mesh, layout=layout)
    one_d = sharded.shard_params(params, config, mesh, "ws1d")
    with pytest.raises(LayoutError, match=r"stored as .* not as the ws2d layout's .* shard_params"):
        sharded.decode_step(one_d, config, jnp.zeros((2,), jnp.int32), cache, mesh=mesh, layout=layout)
    with pytest.raises(LayoutError, match="ws2d layout"):
        sharded.prefill(one_d, config, jnp.ones((2, 4), jnp.int32), jnp.full((2,), 4), mesh=mesh, layout=layout)
    after = sharded._insert._cache_size(), sharded._decode._cache_size(), sharded._prefill._cache_size()
    assert after == before  # refused before anything was traced or compiled


def test_layout_is_checked_on_the_config_before_the_weights_are_read(capsys, tmp_path):
    import shutil

    config = get_config("tiny", n_heads=4)  # 4 heads cannot split over the 8 chips of y·z on 1x1x8
    path = save_checkpoint(tmp_path / "h4", config, init_params(config, jax.random.key(0)), "f32")
    shutil.rmtree(path / "params")  # no weights at all: only the config (meshserve.json) can be read
    argv = ["generate", "--tokens", "1,2,3", "--checkpoint", str(path), "--mesh", "1x1x8", "--attention", "heads"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "n_heads H = 4 is not divisible by the ws2d split 8" in err and "Traceback" not in err


def test_checkpoint_loads_straight_into_the_prefill_layout(monkeypatch, checkpoint):
    from meshserve.model import loading, sharded
    from meshserve.partition.mesh import make_mesh

    seen = {}
    real = loading.load_checkpoint

    def spy(path, weights=None, shardings=None):  # records what the CLI asked for, loads for real
        info, params = real(path, weights=weights, shardings=shardings)
        seen["wq"] = params["layers"]["wq"].sharding
        return info, params

    monkeypatch.setattr(loading, "load_checkpoint", spy)
    argv = ["generate", "--checkpoint", checkpoint, "--tokens", "1,2,3", "--max-new-tokens", "2", "--mesh", "2x2x2"]
    assert main(argv) == 0
    want = sharded.param_specs(get_config("tiny", n_kv_heads=8), "ws2d")["layers"]["wq"]
    assert seen["wq"].is_equivalent_to(jax.sharding.NamedSharding(make_mesh("2x2x2"), want), 4)
