"""`meshserve convert --from-hf` as a user bringing their own model meets it: what transformers does, or a one-line
refusal, never a traceback or a silently different model.

- generation_config.json's eos ids stop generation as they stop transformers' `generate` (instruct models end a turn
  with a token config.json may not list): the tokens, the stop included, equal transformers' own; the chat
  template's eos token stops too (as in vLLM);
- no tokenizer: refused (text would be encoded as raw bytes), --no-tokenizer converts anyway; a checkpoint whose
  tokenizer file went missing is refused at load;
- safetensors: an index that maps a tensor to a shard without it, two shards holding one name, a stale file beside
  model.safetensors (ignored, as transformers ignores it); pre-quantized checkpoints refused by name;
- Ctrl-C / SIGTERM while the checkpoint is written leaves neither the checkpoint nor its temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from meshserve.model.checkpoint import CheckpointError, read_checkpoint_info, save_checkpoint
from meshserve.model.hf_import import load_hf
from meshserve.serving.cli import main
from test_hf_import import _convert_error, prompts
from test_hf_llama import _word_tokenizer, hf_generate, make_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> tuple[Path, object]:
    """A tiny Llama (tests/test_hf_llama.py make_model) with its word-level tokenizer."""
    hf = tmp_path_factory.mktemp("qa") / "llama"
    model = make_model(hf, "llama")
    _word_tokenizer(hf, adds_bos=True)
    return hf, model


def _copy(hf: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(hf, to)
    return to


def test_generation_config_eos_stops_as_transformers_does(hf_llama, tmp_path, capsys):
    source, model = hf_llama
    hf = _copy(source, tmp_path / "hf")
    prompt = [int(t) for t in prompts()[0]]
    greedy = hf_generate(model, prompt, 8)
    # The first greedy token after the first that is new and not bos/eos: generation must stop right there.
    at = next(i for i in range(1, 8) if greedy[i] not in greedy[:i] and greedy[i] not in (1, 2))
    (hf / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, greedy[at]]}))
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :]
    assert expected.tolist() == greedy[: at + 1]  # transformers itself stops on generation_config.json's eos

    out = tmp_path / "ck"
    assert main(["convert", "--from-hf", str(hf), "--out", str(out)]) == 0
    assert read_checkpoint_info(out).config.extra_eos_ids == (greedy[at],)
    capsys.readouterr()
    tokens = ",".join(map(str, prompt))
    assert main(["generate", "--checkpoint", str(out), "--tokens", tokens, "--max-new-tokens", "8", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["tokens"] == expected.tolist() and answer["finish_reason"] == "stop"

    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 96]}))  # VOCAB is 96
    assert "generation_config.json: eos_token_id 96 is not a token id" in _convert_error(capsys, hf, tmp_path / "o")


def test_the_chat_templates_eos_token_stops_too(hf_llama, tmp_path):
    """tokenizer_config.json's eos_token (what the template ends a turn with; vLLM stops on it) joins the stop ids."""
    hf = _copy(hf_llama[0], tmp_path / "hf")
    settings = {"eos_token": "w7", "chat_template": "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}
    (hf / "tokenizer_config.json").write_text(json.dumps(settings))
    config = load_hf(hf).config
    assert (config.eos_id, config.extra_eos_ids) == (2, (7,))


def test_a_directory_without_a_tokenizer_is_refused_unless_asked(hf_llama, tmp_path, capsys):
    hf = _copy(hf_llama[0], tmp_path / "hf")
    # A checkpoint whose meshserve.json names a tokenizer that is gone is refused, not read with raw bytes.
    assert main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "with")]) == 0
    (tmp_path / "with" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="names tokenizer 'tokenizer.json', which is missing"):
        read_checkpoint_info(tmp_path / "with")
    (hf / "tokenizer.json").unlink()
    out = tmp_path / "ck"
    err = _convert_error(capsys, hf, out)
    assert "has no tokenizer.json or tokenizer.model" in err and "--no-tokenizer" in err
    assert main(["convert", "--from-hf", str(hf), "--out", str(out), "--no-tokenizer"]) == 0
    assert read_checkpoint_info(out).tokenizer_path is None
    (hf / "tokenizer.json").write_text("{not json")  # a damaged tokenizer fails the convert, not every later load
    assert "cannot read tokenizer" in _convert_error(capsys, hf, tmp_path / "ck2")


def test_safetensors_layouts(hf_llama, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    hf = _copy(hf_llama[0], tmp_path / "hf")
    out = tmp_path / "ck"
    tensors = load_file(hf / "model.safetensors")
    # Mistral's own-format consolidated.safetensors beside model.safetensors is not read (transformers reads
    # model.safetensors only); it was refused as "tensors not used by this architecture".
    save_file({"tok_embeddings.weight": tensors["model.embed_tokens.weight"]}, hf / "consolidated.safetensors")
    np.testing.assert_array_equal(load_hf(hf).params["embed"], tensors["model.embed_tokens.weight"])
    (hf / "consolidated.safetensors").unlink()
    # Without model.safetensors, two files holding one tensor are refused (which one is meant is unknown).
    (hf / "model.safetensors").rename(hf / "model-a.safetensors")
    save_file({k: np.zeros_like(v) for k, v in tensors.items()}, hf / "model-b.safetensors")
    assert "is in both model-a.safetensors and model-b.safetensors" in _convert_error(capsys, hf, out)
    # An index that maps a tensor to a shard that does not hold it: one line, not safetensors' traceback.
    index = {name: "model-a.safetensors" for name in tensors}
    save_file({"other": tensors["model.norm.weight"]}, hf / "model-b.safetensors")
    index["model.norm.weight"] = "model-b.safetensors"
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    err = _convert_error(capsys, hf, out)
    assert "maps tensor model.norm.weight to model-b.safetensors, which does not hold it" in err
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    assert "'weight_map' is empty" in _convert_error(capsys, hf, out)


def test_pre_quantized_checkpoints_are_refused_by_name(hf_llama, tmp_path, capsys):
    hf = _copy(hf_llama[0], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (hf / "config.json").write_text(json.dumps(config))
    assert 'quantization_config.quant_method="awq"' in _convert_error(capsys, hf, tmp_path / "ck")


def test_a_signal_while_writing_leaves_nothing(hf_llama, tmp_path):
    """SIGTERM sent as soon as the temporary directory appears: the write finishes, everything is removed, and the
    signal is raised again under the process's own handler, restored (SIGTERM's default then ends a CLI with 143, as
    a supervisor expects; before, it became a KeyboardInterrupt, exit 130). A handler that returns (this test's)
    gets a CheckpointError: nothing was written."""
    imported = load_hf(hf_llama[0])
    out = tmp_path / "ck"
    late: list[int] = []

    def record(signum: int, frame: object) -> None:  # a late SIGTERM must never kill pytest
        late.append(signum)

    previous = signal.signal(signal.SIGTERM, record)

    def send_when_writing() -> None:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".ck.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_when_writing)
    try:
        sender.start()
        with pytest.raises(CheckpointError, match="signal 15 while writing .*: nothing was written"):
            save_checkpoint(out, imported.config, imported.params, "f32", imported.tokenizer_file)
        sender.join()
        assert late == [signal.SIGTERM]  # held while writing, then raised once under the restored handler
        assert not out.exists() and not list(tmp_path.iterdir())
        assert signal.getsignal(signal.SIGTERM) is record
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_empty_paths_are_refused(tmp_path, capsys, monkeypatch):
    """ "" is Path("."): --from-hf "" crashed (TypeError traceback), --checkpoint "" silently loaded the demo model."""
    from meshserve.model.loading import load_model

    monkeypatch.chdir(tmp_path)
    for argv, flag in (
        (["--from-hf", "", "--out", "ck"], "--from-hf"),
        (["--checkpoint", "", "--out", "ck", "--weights", "f32"], "--checkpoint"),
        (["--from-hf", "hf", "--out", " "], "--out"),
    ):
        assert main(["convert", *argv]) == 2
        assert capsys.readouterr().err.strip() == f"meshserve convert: error: {flag} is empty: give a directory"
    with pytest.raises(CheckpointError, match="checkpoint path is empty"):
        load_model("")
    assert list(tmp_path.iterdir()) == []


def test_too_little_disk_is_refused_before_writing(hf_llama, tmp_path, monkeypatch):
    """Orbax's writers on a full disk log a traceback per thread; the free space is checked first (the disk's free
    space is what is faked here: filling a real disk is not something a test may do)."""
    import shutil

    from meshserve.model import checkpoint_files

    imported = load_hf(hf_llama[0])
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(checkpoint_files.shutil, "disk_usage", lambda path: free)
    with pytest.raises(CheckpointError, match=r"needs about 0\.\d MiB and .* has 0\.0 MiB free"):
        save_checkpoint(tmp_path / "ck", imported.config, imported.params, "f32", imported.tokenizer_file)
    assert list(tmp_path.iterdir()) == []


def test_a_layer_count_typo_fails_at_once(hf_llama, tmp_path, capsys):
    """num_hidden_layers=20000000 listed a plan row per tensor of every layer before checking any (8 GB, > 60 s);
    rows are checked as generated now, so the first missing layer ends it."""
    hf = _copy(hf_llama[0], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["num_hidden_layers"] = 20_000_000
    (hf / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    assert "tensor model.layers.2.input_layernorm.weight is missing" in _convert_error(capsys, hf, tmp_path / "ck")
    assert time.monotonic() - start < 30


def test_model_name_of_a_hub_snapshot_and_a_symlink(hf_llama, tmp_path):
    """The name `serve` answers to by default: a Hub cache snapshot gave its commit hash, a symlink its target's name."""
    from meshserve.model.model_spec import hf_model_name

    snapshot = tmp_path / "models--meta-llama--Llama-3.1-8B" / "snapshots" / ("0e9e39f2" * 5)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(hf_llama[0], target_is_directory=True)
    (tmp_path / "my-llama").symlink_to(hf_llama[0], target_is_directory=True)
    assert hf_model_name(snapshot) == "Llama-3.1-8B" == load_hf(snapshot).config.name
    assert hf_model_name(tmp_path / "my-llama") == "my-llama"
    assert hf_model_name(tmp_path / "my-llama" / ".") == "my-llama"
