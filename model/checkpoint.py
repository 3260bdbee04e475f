"""Checkpoints: orbax-saved weights (f32, bf16 or int8) plus the model config and the tokenizer.

A checkpoint is a directory:
  meshserve.json     {"format": 1, "model": ModelConfig fields, "weights": "f32"|"bf16"|"int8", "tokenizer": file}
  params/            the weights, saved with orbax (int8 weights as {"values", "scale"} pairs)
  tokenizer.json | tokenizer.model   (optional)
  chat_template.jinja (optional)     the chat template from the Hugging Face source (model/chat.py); the special-token
                                     strings it uses are meshserve.json's "chat": {"bos_token", "eos_token"}
Saving writes to a temporary sibling directory and renames it at the end, so a crash never leaves a
half-written checkpoint; Ctrl-C or SIGTERM during the write removes the temporary directory too (kill -9 leaves it,
as `.NAME.tmp-HOST-PID-XXXXXXXX` beside NAME, never at NAME, and the next save to NAME on this host removes it once
that process is gone), and too little free disk is refused before writing. A meshserve.json that names a tokenizer
file the directory lacks is refused (not read as raw bytes). Restoring reads straight into the requested shardings:
every host reads only its own shards, which is how a model too large for one host is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from meshserve.errors import UserError
from meshserve.model.chat import TEMPLATE_FILE, ChatError, ChatTemplate, check_template
from meshserve.model.checkpoint_files import backup_name, remove_dead_writers, space_error, temporary_name
from meshserve.model.config import ConfigError, ModelConfig
from meshserve.model.params import FUSED_WEIGHTS, WEIGHT_DTYPES, Params, cast_params, init_params
from meshserve.model.quant import QuantizedArray
from meshserve.model.tokenizer import TOKENIZER_FILES

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_info",
    "CheckpointError",
    "CheckpointInfo",
    "abstract_params_for",
]

FORMAT = 1
META_FILE = "meshserve.json"
_INT8_KEY = "__int8__"
_STATUS = re.compile(r"[A-Z][A-Z_]+: ")  # a tensorstore / absl status code opening an error message


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not match its config."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: ModelConfig
    weights: str
    tokenizer_path: Path | None
    chat: ChatTemplate | None = None  # the chat template, when the checkpoint has one


def _to_plain(params: Params) -> dict:
    """Replace each QuantizedArray by {"__int8__": {"values", "scale"}} (plain dicts serialise anywhere)."""

    def plain(x: Any) -> Any:
        if not isinstance(x, QuantizedArray):
            return x
        if x.perm is not None:  # a checkpoint holds the declared layout, which loading assumes
            raise ValueError(
                "int8 weights stored contracted-axes-last cannot be saved: save them before "
                "unstack_layers(..., int8_rows=True)"
            )
        return {_INT8_KEY: {"values": x.values, "scale": x.scale}}

    return jax.tree_util.tree_map(plain, params, is_leaf=lambda x: isinstance(x, QuantizedArray))


def _from_plain(tree: Any) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_INT8_KEY}:
            return QuantizedArray(values=tree[_INT8_KEY]["values"], scale=tree[_INT8_KEY]["scale"])
        return {k: _from_plain(v) for k, v in tree.items()}
    return tree


def abstract_params_for(config: ModelConfig, weights: str) -> Params:
    """ShapeDtypeStructs of a model's weights in a given storage dtype (no allocation)."""
    return jax.eval_shape(lambda: cast_params(config, init_params(config, jax.random.key(0)), weights))


def save_checkpoint(
    path: str | Path,
    config: ModelConfig,
    params: Params,
    weights: str,
    tokenizer_file: str | Path | None = None,
    *,
    overwrite: bool = False,
    chat: ChatTemplate | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary directory, then rename); `chat`: the chat template to keep."""
    if weights not in WEIGHT_DTYPES:
        raise CheckpointError(f"weights must be one of {WEIGHT_DTYPES}, got {weights!r}")
    if config.true_kv_heads:  # replicated for a mesh at load (ModelConfig.replicate_kv_heads): not the model's own
        raise CheckpointError(
            f"config has its {config.true_kv_heads} kv heads replicated to {config.n_kv_heads} for a mesh; save the "
            "model as loaded, before replicate_kv_heads"
        )
    layers = params.get("layers")
    # Loading assumes the declared tree: unstack_layers' fused weights are not in it.
    if isinstance(layers, list) and (fused := sorted({n for layer in layers for n in FUSED_WEIGHTS if n in layer})):
        raise ValueError(f"fused weights ({', '.join(fused)}) cannot be saved: save the params before unstack_layers")
    path = Path(path).absolute()
    bad = [
        jax.tree_util.keystr(k)
        for k, x in jax.tree_util.tree_leaves_with_path(params)
        if not hasattr(x, "shape") or not hasattr(x, "dtype")
    ]
    if bad:  # refuse before touching the disk (orbax would fail on a background thread)
        raise CheckpointError(f"params leaf {bad[0]} is not an array")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite to replace it)")
    if path.exists() and not (path / META_FILE).is_file():
        # Overwrite replaces checkpoints only: never a file, a Hugging Face directory or anything else.
        raise CheckpointError(
            f"{path} exists and is not a meshserve checkpoint (no {META_FILE}); refusing to replace it"
        )
    remove_dead_writers(path)  # first: what a killed save left may be the space this one needs
    if error := space_error(path, params, tokenizer_file):
        raise CheckpointError(error)
    tmp = temporary_name(path)
    with _signals_held() as received:
        try:
            try:
                _write(tmp, path, config, params, weights, tokenizer_file, chat)
            except (OSError, ValueError) as e:
                # A full disk or a lost mount: OSError from our writes; orbax's tensorstore writers report it as a
                # ValueError starting with a status code (RESOURCE_EXHAUSTED: Error writing ...). Other ValueErrors
                # are bugs and keep their traceback.
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                if isinstance(e, ValueError) and not _STATUS.match(first):
                    raise
                reason = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else first[:300]
                raise CheckpointError(f"cannot write checkpoint {path}: {reason}") from None
            if not received:  # Ctrl-C or SIGTERM while writing: the user wants no checkpoint
                _swap_in(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if received:  # under the restored handlers, as it would have acted: SIGINT's KeyboardInterrupt, SIGTERM's exit
        signal.raise_signal(received[0])
        raise CheckpointError(f"signal {received[0]} while writing {path}: nothing was written")  # a handler returned
    return path


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold Ctrl-C and SIGTERM while a checkpoint is written (main thread only), yielding the list they land in.

    Raised at once, a KeyboardInterrupt lands while orbax's writer threads still fill the temporary directory: the
    removal below then races them (the directory was left behind, with a traceback from a thread). Held, the writer
    finishes, save_checkpoint sees the signal, removes the temporary directory whole and raises the signal again
    under the restored handlers. A second signal acts at once.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    # An ignored signal stays ignored (a job started with `&` or nohup ignores SIGINT by design); None: set outside Python.
    previous = {
        s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) not in (signal.SIG_IGN, None)
    }

    def hold(signum: int, frame: Any) -> None:
        if received:  # asked twice: stop now, as without this handler
            for s, handler in previous.items():
                signal.signal(s, handler)
            signal.raise_signal(signum)
            return
        received.append(signum)
        print(f"{signal.Signals(signum).name}: finishing the write to remove it whole; again to stop at once",
              file=sys.stderr, flush=True)  # fmt: skip

    for s in previous:
        signal.signal(s, hold)
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _write(
    tmp: Path,
    path: Path,
    config: ModelConfig,
    params: Params,
    weights: str,
    tokenizer_file: str | Path | None,
    chat: ChatTemplate | None,
) -> None:
    """Write every file of the checkpoint bound for `path` into the new directory `tmp`."""
    import orbax.checkpoint as ocp

    try:
        tmp.mkdir(parents=True)
    except OSError as e:  # a parent that cannot exist or be written (/proc/..., a file, no permission)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e} ({e.filename})") from None
    # StandardCheckpointer saves asynchronously: wait for the commit before the rename.
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / "params", _to_plain(params))
        checkpointer.wait_until_finished()
    tok_name = None
    if tokenizer_file is not None:
        tok_name = "tokenizer.model" if str(tokenizer_file).endswith(".model") else "tokenizer.json"
        shutil.copyfile(tokenizer_file, tmp / tok_name)
    meta = {"format": FORMAT, "model": config.to_dict(), "weights": weights, "tokenizer": tok_name}
    if chat is not None:
        (tmp / TEMPLATE_FILE).write_text(chat.template, encoding="utf-8")
        meta["chat"] = {"bos_token": chat.bos_token, "eos_token": chat.eos_token}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _swap_in(tmp: Path, path: Path) -> None:
    """Move the finished `tmp` to `path`; an old checkpoint there is renamed aside first and removed only after.

    At every moment `path` holds either the old or the new complete checkpoint (or, between the two renames, nothing
    with the old one at the backup name); a failed second rename puts the old one back.
    """
    if not path.exists():
        os.replace(tmp, path)
        return
    backup = backup_name(path)
    os.replace(path, backup)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The config, weight dtype and tokenizer of a checkpoint, without reading weights."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        config = ModelConfig.from_dict(meta["model"])
        weights = meta["weights"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a meshserve checkpoint (no {META_FILE})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {e}") from None
    if meta.get("format") != FORMAT or weights not in WEIGHT_DTYPES:
        raise CheckpointError(f"{meta_path}: unsupported format {meta.get('format')} / weights {weights!r}")
    tok = None
    named = meta.get("tokenizer")
    if named and not (path / str(named)).is_file():
        # Falling back to raw bytes would answer every text prompt with the wrong ids, silently.
        raise CheckpointError(f"{meta_path} names tokenizer {named!r}, which is missing from {path}: copy it back")
    for name in [named] if named else list(TOKENIZER_FILES):
        if (path / name).exists():
            tok = path / name
            break
    return CheckpointInfo(path=path, config=config, weights=weights, tokenizer_path=tok, chat=_read_chat(path, meta))


def _read_chat(path: Path, meta: dict) -> ChatTemplate | None:
    """The checkpoint's chat_template.jinja with meshserve.json's special-token strings; None without the file."""
    file = path / TEMPLATE_FILE
    if not file.is_file():
        return None
    try:
        template = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    try:
        check_template(template, file)  # a broken template fails the load in one line, not every chat request
    except ChatError as e:
        raise CheckpointError(str(e)) from None
    tokens = meta.get("chat") if isinstance(meta.get("chat"), dict) else {}
    bos, eos = tokens.get("bos_token"), tokens.get("eos_token")
    return ChatTemplate(template, bos if isinstance(bos, str) else None, eos if isinstance(eos, str) else None)


def _name(path) -> str:
    """A tree path as the weight's name: layers/wq/values."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _stored_mismatch(checkpointer, params_dir: Path, target: Any) -> str | None:
    """The first array whose stored shape is not what the config needs (or that one side lacks), as a
    message; None when everything matches or the stored metadata cannot be read (restore then reports).

    Checked before restoring because a failed orbax restore leaves tensorstore reads in flight whose callbacks
    later hit orbax's closed event loop and print tracebacks (RuntimeError: Event loop is closed) after our one-line
    error: a config edited by hand, or weights from another model, is a user mistake, not a crash."""
    try:
        stored_tree = checkpointer.metadata(params_dir)
        stored_tree = getattr(stored_tree, "item_metadata", stored_tree)  # StepMetadata in orbax >= 0.11
        stored = {_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(stored_tree)}
    except Exception:
        return None
    wanted = {_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for key, want in wanted.items():
        have = stored.get(key)
        if have is None:
            return f"{key} is not in the checkpoint"
        shape = tuple(getattr(have, "shape", ()))
        if shape != tuple(want.shape):  # dtypes may differ: restore casts to the target's
            return f"{key} is stored with shape {shape}, the config needs {tuple(want.shape)}"
    extra = sorted(set(stored) - set(wanted))
    return f"{extra[0]} is stored but the config has no such weight" if extra else None


def load_checkpoint(
    path: str | Path, *, weights: str | None = None, shardings: Callable[[Params], Any] | Any | None = None
) -> tuple[CheckpointInfo, Params]:
    """Restore a checkpoint's weights, optionally converted to another weight dtype.

    shardings: None (default device), one `jax.sharding.Sharding` for every array, or a function
    from the abstract params tree (as stored) to a matching tree of shardings. Arrays are read
    straight into those shardings.
    """
    import orbax.checkpoint as ocp

    info = read_checkpoint_info(path)
    abstract = abstract_params_for(info.config, info.weights)
    if callable(shardings):
        sharding_tree = shardings(abstract)
    else:
        default = shardings or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_tree = jax.tree_util.tree_map(lambda _: default, abstract)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        _to_plain(abstract),
        _to_plain(sharding_tree),
    )
    params_dir = info.path.absolute() / "params"
    if not params_dir.is_dir():
        raise CheckpointError(f"checkpoint {info.path} has no params/ directory")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            mismatch = _stored_mismatch(checkpointer, params_dir, target)
            if mismatch is None:
                restored = checkpointer.restore(params_dir, target)
    except Exception as e:  # orbax raises ValueError/KeyError/FileNotFoundError/... on mismatch or damage
        raise CheckpointError(
            f"cannot restore {params_dir} as {info.config.name} ({info.weights}): {str(e).splitlines()[0][:300]}"
        ) from None
    if mismatch is not None:
        raise CheckpointError(f"cannot restore {params_dir} as {info.config.name} ({info.weights}): {mismatch}")
    params = _from_plain(restored)
    if weights is not None and weights != info.weights:
        params = cast_params(info.config, params, weights)
    return info, params
