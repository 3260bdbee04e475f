"""The settings record of an offline job (score, batch-generate): how OUT was made, kept beside it as
OUT.settings.json (OUT's name + ".settings.json", e.g. out.jsonl.settings.json), so a resume with other settings
is refused instead of appending rows made differently.

The record, written atomically (a temporary file, then os.replace) just before a run's first result (one stopped
before any result leaves the old record, which still describes every line of OUT):
  {"format": 1,
   "settings": {compared on resume: see COMPARED},
   "info": {recorded, never compared: meshserve's version, the date, the model's name, mesh, layouts, ...},
   "created": ISO date, "unrecorded_lines": n (results OUT held when an older meshserve's OUT got its record),
   "changes": [{"date", "meshserve", "results_before", "from", "to"}, ...] (resumes with --allow-changed-settings)}

Resume (OUT holds result lines): every compared setting must equal the record's, else SettingsChanged (a UserError
naming each setting, both values and the ways out) before the model is loaded. OUT with results and no record (an
older meshserve) resumes with a warning and gets one; a record whose OUT is missing or empty is replaced; a record
that cannot be read is SettingsError naming the file.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.errors import UserError

__all__ = [
    "COMPARED",
    "JobSettings",
    "SettingsChanged",
    "SettingsError",
    "checkpoint_files",
    "differences",
    "plan_record",
    "read_record",
    "settings_from_args",
    "settings_path",
    "write_record",
]

FORMAT = 1
SUFFIX = ".settings.json"

# What changes a line's result, so is compared on resume; label: how the message names it (the flag that sets it).
#   command           score rows and batch-generate rows have different fields
#   model_config      the architecture (ModelConfig fields: a preset's or the checkpoint's meshserve.json)
#   checkpoint_files  the checkpoint's files: weights, tokenizer, chat template (None for a preset: its random
#                     weights are drawn from the config with seed 0, so the config is the whole model)
#   weights           f32 / bf16 / int8 weights give other logits (the effective dtype: --weights or the checkpoint's)
#   int8_activations  int8 weights only: MESHSERVE_INT8_MATMUL=w8a8 quantises the activations too (other logits);
#                     its other values (xla, pallas, rowsum) compute the same function up to rounding: recorded only
#   kv_cache_dtype    batch-generate only: int8 keys and values can flip a near tie; score reads no cache
#   reasoning_parser  batch-generate only: a chat row's <think> block moves to "reasoning" (another row shape)
# Not compared (recorded in "info"): --mesh, --layers and the buckets (--max-batch, --length-buckets,
# --decode-buckets, --prefill-chunk, --prefix-caching) change only how the same computation is laid out (float
# rounding, as between two buckets); --objective picks among those; --speculative-tokens keeps plain decoding's
# tokens; --warm-up only orders compiles; --max-context only bounds a line (one that does not fit is an error line;
# a default max_new_tokens is cut to the room left), and lowering it is how a resume fits less memory;
# MESHSERVE_DECODE_ATTENTION (xla or the Pallas kernel) computes the same attention in another order (float rounding).
COMPARED = {
    "command": "command",
    "model_config": "model config",
    "checkpoint_files": "checkpoint files",
    "weights": "--weights",
    "int8_activations": "int8 activations (MESHSERVE_INT8_MATMUL=w8a8)",
    "kv_cache_dtype": "--kv-cache-dtype",
    "reasoning_parser": "--reasoning-parser",
}
# Checkpoint files up to this size are fingerprinted by content (a reinstalled or recloned demo model is the same
# model), larger ones by mtime (reading gigabytes of weights to resume a job is not cheap).
HASHED_BYTES = 16 << 20
_MAX_FIELDS = 4  # config fields named in a refusal; another model usually differs in most of them
_KIND_ONLY = {"kv_cache_dtype": "batch-generate", "reasoning_parser": "batch-generate"}
# Compared settings an older record may lack (it then resumes unchecked on them, as `differences` skips them).
_ADDED_LATER = {"int8_activations"}
_INFO_ARGS = ("mesh", "objective", "layers", "max_batch", "max_context", "length_buckets", "decode_buckets",
              "prefill_chunk", "prefix_caching", "speculative_tokens", "warm_up")  # fmt: skip


class SettingsError(UserError):
    """A settings record that cannot be read (not JSON, another format, a missing setting)."""


class SettingsChanged(UserError):
    """A resume whose compared settings differ from OUT's record."""


@dataclass(frozen=True)
class JobSettings:
    """One run's settings: `compared` (COMPARED's keys for its command) and `info` (recorded only); JSON values."""

    compared: dict[str, Any]
    info: dict[str, Any]


def settings_path(out_path: Path) -> Path:
    """OUT's settings record: OUT's name + ".settings.json", in OUT's folder."""
    return out_path.with_name(out_path.name + SUFFIX)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so a fresh value compares equal to a recorded one."""
    return json.loads(json.dumps(value))


def checkpoint_files(path: Path) -> dict[str, Any]:
    """A cheap fingerprint of a checkpoint folder's files: each file's relative path and size, and its content's
    hash when it is at most HASHED_BYTES (configs, tokenizer, chat template, a small model's weights), else its
    mtime (ns): a large checkpoint costs one stat per weights file, no read. {"files", "bytes", "newest" (the
    latest mtime, ISO), "digest"}. A copy, reinstall or move of the same files keeps it when the large files keep
    their mtimes (cp -p, rsync -t); a rewrite of a large file, or any change to a small one, changes it."""
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = Path(root, name)
            try:
                st = file.stat()
                if st.st_size <= HASHED_BYTES:
                    stamp: int | str = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
                else:
                    stamp = st.st_mtime_ns
                entries.append((file.relative_to(path).as_posix(), st.st_size, stamp, st.st_mtime_ns))
            except OSError:  # a dangling link: listed, so it appearing or going changes the digest
                entries.append((file.relative_to(path).as_posix(), -1, 0, 0))
    newest = max((e[3] for e in entries), default=0)
    return {
        "files": len(entries),
        "bytes": sum(max(e[1], 0) for e in entries),
        "newest": datetime.datetime.fromtimestamp(newest / 1e9, datetime.UTC).isoformat(timespec="seconds"),
        "digest": hashlib.sha256(json.dumps([e[:3] for e in entries]).encode()).hexdigest()[:16],
    }


def settings_from_args(args: argparse.Namespace, kind: str) -> JobSettings:
    """The settings of `meshserve score | batch-generate` from its parsed flags, without loading the model: the
    model is named as serving/cli_model.load_for_serving -> model/loading.load_model names it (--model wins over
    --checkpoint; neither: the bundled demo), its config read from the preset or the checkpoint's meshserve.json.
    Raises what loading would (an unknown preset, a missing or corrupt checkpoint)."""
    from meshserve import __version__

    if args.model is not None:
        from meshserve.model.config import get_config

        config, files, weights = get_config(args.model), None, args.weights or "f32"
        name = f"preset {args.model} (random weights)"
    else:
        from meshserve.model.checkpoint import read_checkpoint_info
        from meshserve.model.loading import DEMO_CHECKPOINT

        path = Path(args.checkpoint or DEMO_CHECKPOINT).resolve()
        ck = read_checkpoint_info(path)
        config, files, weights = ck.config, checkpoint_files(path), args.weights or ck.weights
        name = f"checkpoint {path}"
    from meshserve.model.decode_attention import decode_attention_mode
    from meshserve.model.quant import int8_matmul_mode

    matmul = int8_matmul_mode()  # a bad MESHSERVE_INT8_MATMUL: the UserError loading would raise
    attention = decode_attention_mode()  # likewise a bad MESHSERVE_DECODE_ATTENTION
    compared = {
        "command": kind,
        "model_config": config.to_dict(),
        "checkpoint_files": files,
        "weights": weights,
        "int8_activations": weights == "int8" and matmul == "w8a8",
        "kv_cache_dtype": args.kv_cache_dtype,
        "reasoning_parser": getattr(args, "reasoning_parser", None),
    }
    compared = {k: v for k, v in compared.items() if _KIND_ONLY.get(k, kind) == kind}
    info = {"meshserve": __version__, "date": _now(), "model": name}
    info |= {k: getattr(args, k, None) for k in _INFO_ARGS} | {"int8_matmul": matmul, "decode_attention": attention}
    if kind == "score":
        info["kv_cache_dtype"] = args.kv_cache_dtype
    return JobSettings(_json(compared), _json(info))


def read_record(path: Path) -> dict | None:
    """The record at `path` (None when there is none), checked: an unreadable one raises SettingsError naming it."""
    if not path.exists():
        return None
    why = None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        why = f"not JSON ({e})"
    else:
        settings = record.get("settings") if isinstance(record, dict) else None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            why = f"not a format {FORMAT} settings record"
        elif not isinstance(settings, dict) or not isinstance(settings.get("command"), str):
            why = 'no "settings" object with a "command"'
        else:
            need = [k for k in COMPARED if _KIND_ONLY.get(k, settings["command"]) == settings["command"]
                    and k not in _ADDED_LATER]  # fmt: skip
            missing = [k for k in need if k not in settings]
            if missing:
                why = f"settings {', '.join(missing)} missing"
    if why is not None:
        raise SettingsError(
            f"settings record {path} cannot be read: {why}; remove it to record this run's settings anew (the lines "
            "already in the output are then of unknown settings), or write to a new -o"
        )
    return record


def write_record(path: Path, record: dict) -> None:
    """Write `record` to `path` whole or not at all: a temporary file in the same folder, fsynced, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _config_for_compare(fields: Any) -> Any:
    """A recorded config with the fields added since given their defaults (an upgrade that adds a field with a
    default is no change); one that no longer loads compares as written."""
    from meshserve.model.config import ModelConfig

    try:
        return _json(ModelConfig.from_dict(fields).to_dict())
    except (UserError, TypeError, ValueError):
        return fields


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict) and "digest" in value:
        # The digest too: a touch within the same second, or a renamed file, changes only it.
        files, size, newest = value.get("files"), value.get("bytes"), value.get("newest")
        return f"{files} files, {size} bytes, newest {newest}, digest {value['digest']}"
    return json.dumps(value) if not isinstance(value, str) else value


def differences(recorded: dict, current: dict, names: tuple[Any, Any] = (None, None)) -> list[str]:
    """One 'SETTING: recorded A, now B' per compared setting that differs (a config per field, the first
    _MAX_FIELDS of them). Settings one of the two lacks (the other command's) are skipped: the command then differs
    already. names: the models' names (recorded, now: info["model"]), said first when the model differs."""
    out = []
    for key, label in COMPARED.items():
        if key not in recorded or key not in current:
            continue
        was, now = recorded[key], current[key]
        if key == "model_config" and isinstance(was, dict) and isinstance(now, dict):
            was = _config_for_compare(was)
            fields = [f for f in sorted(set(was) | set(now)) if was.get(f) != now.get(f)]
            out += [f"{label} {f}: recorded {_show(was.get(f))}, now {_show(now.get(f))}"
                    for f in fields[:_MAX_FIELDS]]  # fmt: skip
            if len(fields) > _MAX_FIELDS:
                out.append(f"{len(fields) - _MAX_FIELDS} more config fields")
        elif was != now:
            out.append(f"{label}: recorded {_show(was)}, now {_show(now)}")
    model_changed = any(s.startswith((COMPARED["model_config"], COMPARED["checkpoint_files"])) for s in out)
    if model_changed and names[0] != names[1]:
        out.insert(0, f"model (--checkpoint / --model): recorded {_show(names[0])}, now {_show(names[1])}")
    return out


def _fresh(settings: JobSettings) -> dict:
    return {"format": FORMAT, "settings": settings.compared, "info": settings.info, "created": _now(), "changes": []}


def plan_record(
    out_path: Path, settings: JobSettings, results: int, allow_changed: bool, kind: str
) -> tuple[dict | None, str | None]:
    """Check a run's settings against OUT's record before anything is loaded: (the record to write when the run
    first writes to OUT, or None to keep the one there; a one-line note for stderr, or None). `results`: the result
    lines OUT holds. Raises SettingsChanged (a compared setting differs and not `allow_changed`) or SettingsError
    (the record cannot be read)."""
    path = settings_path(out_path)
    if results == 0:  # a fresh job, whatever a record left by an earlier OUT says
        return _fresh(settings), None
    record = read_record(path)
    if record is None:
        fresh = _fresh(settings) | {"unrecorded_lines": results}
        lines = f"{results} result{'s' * (results != 1)}"
        note = (f"meshserve {kind}: warning: {out_path} has {lines} but no settings record (an older meshserve?); "
                f"their settings are unknown, this run's are recorded in {path} with its first result")  # fmt: skip
        return fresh, note
    was = dict(record["settings"])
    if isinstance(was.get("model_config"), dict):
        was["model_config"] = _config_for_compare(was["model_config"])
    info = record.get("info") if isinstance(record.get("info"), dict) else {}
    diff = differences(was, settings.compared, (info.get("model"), settings.info.get("model")))
    if not diff:
        return None, None
    if not allow_changed:
        raise SettingsChanged(
            f"{out_path} was made with other settings than this run's (recorded in {path}): {'; '.join(diff)}. "
            "Appending would mix results made differently: write to a new -o, or pass --allow-changed-settings to "
            "append anyway (the change is recorded)"
        )
    change = {"date": _now(), "meshserve": settings.info.get("meshserve"), "results_before": results,
              "from": {k: was.get(k) for k in settings.compared if was.get(k) != settings.compared[k]},
              "to": {k: v for k, v in settings.compared.items() if was.get(k) != v}}  # fmt: skip
    changes = record.get("changes") if isinstance(record.get("changes"), list) else []
    updated = record | {"settings": settings.compared, "info": settings.info, "changes": [*changes, change]}
    note = (f"meshserve {kind}: appending with changed settings ({'; '.join(diff)}); recorded in {path} with the "
            "first result")  # fmt: skip
    return updated, note
