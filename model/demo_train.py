"""Train the bundled demo model (model/demo/) on text every Python install has.

    python -m meshserve.model.demo_train            # ~25 min on 2 CPU cores; writes model/demo/

Corpus: the standard library's own documentation. The pydoc topics (`pydoc_data.topics.topics`, the
language reference pages `help()` shows) and the module, class and function docstrings of every public
stdlib module, read with `ast` from the source files (nothing is imported, so no module runs). Documents
are ordered by key; a fixed ~5% of them (by a hash of the key, so the split does not move when a Python
release adds a module) is held out for perplexity and never seen by the tokenizer or the model.

Tokenizer: byte-level BPE (Hugging Face `tokenizers`), <pad>/<bos>/<eos> at ids 0/1/2 to match the demo
preset. Each document is `<bos> text <eos>`; the documents are concatenated and cut into rows of
seq_len + 1 tokens (inputs and next-token targets).

Model: the `demo` preset, trained with optax AdamW (warmup + cosine) on next-token cross-entropy. The
forward pass is `transformer.prefill(..., all_logits=True)` in float32, the very code that serves, so
there is no second model to drift. Saved in bf16 with `checkpoint.save_checkpoint`.

Shapes: B rows, T tokens per row, V vocab (alphabet of model/config.py).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import math
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Document",
    "stdlib_documents",
    "split_documents",
    "train_tokenizer",
    "pack",
    "heldout_rows",
    "evaluate",
    "main",
    "SPECIAL_TOKENS",
]

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2 (the demo preset's bos_id=1, eos_id=2)
HELDOUT_BUCKETS = 20  # 1 in 20 documents (~5%) is held out

# Stdlib folders that are not documentation of the library: tests, GUI demos, vendored installers,
# codec tables (encodings/), and pydoc_data itself (its topics are read separately).
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "__pycache__",
    "venv",
    "__phello__",
}
# Compiled modules that are test fixtures or codec tables, not library documentation.
_SKIP_COMPILED = ("_test", "xx", "_xx", "_ctypes_test", "_codecs_")


@dataclass(frozen=True)
class Document:
    key: str  # "topic:NAME" or "module:dotted.name"; orders the corpus and decides the split
    text: str

    @property
    def bucket(self) -> int:
        return zlib.crc32(self.key.encode()) % HELDOUT_BUCKETS

    @property
    def heldout(self) -> bool:
        """Reported perplexity only: never trained on, never used to choose anything."""
        return self.bucket == 0

    @property
    def validation(self) -> bool:
        """Not trained on; picks the best checkpoint during training (so the held-out number stays honest)."""
        return self.bucket == 1


def _pydoc_topics() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"topic:{name}", topics[name].strip())


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"{node.name}({ast.unparse(node.args)})"
    except Exception:  # unparse of exotic defaults; the name alone still reads
        return f"{node.name}(...)"


def _module_text(name: str, tree: ast.Module) -> str:
    """A module's docstrings as one readable page: module doc, then each public class/function with its doc."""
    parts = [f"Module {name}"]
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc)

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if node.name.startswith("_") and node.name != "__init__":
                continue
            doc = ast.get_docstring(node)
            if isinstance(node, ast.ClassDef):
                if doc:
                    parts.append(f"class {prefix}{node.name}:\n{doc}")
                visit(node.body, f"{prefix}{node.name}.")
            elif doc:
                parts.append(f"def {prefix}{_signature(node)}:\n{doc}")

    visit(tree.body, "")
    return "\n\n".join(parts)


def _stdlib_modules() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(p in _SKIP_DIRS or p.startswith((".", "config-")) for p in rel.parts[:-1]):
            continue
        if rel.name.startswith(("test_", "__")) and rel.name != "__init__.py":
            continue
        files.append(rel)
    for rel in sorted(files, key=str):
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):  # a broken or non-UTF-8 file is skipped, not fatal
            continue
        text = _module_text(name, tree)
        if text.count("\n") >= 2:  # a module with nothing but its name teaches nothing
            yield Document(f"module:{name}", text)


def _compiled_modules() -> Iterator[Document]:
    """Docstrings of the built-in and C-extension modules (math, itertools, builtins' str/list/dict, ...).

    These have no .py source, so they are imported; importing a compiled stdlib module runs no user code.
    """
    import importlib
    import inspect

    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    names = set(sys.builtin_module_names) | {p.name.split(".")[0] for p in dynload.glob("*.so")}
    for name in sorted(n for n in names if not n.startswith(_SKIP_COMPILED)):
        try:
            module = importlib.import_module(name)
        except Exception:  # e.g. _tkinter without a display library
            continue
        parts = [f"Module {name}"] + ([inspect.cleandoc(module.__doc__)] if module.__doc__ else [])
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isbuiltin(obj) or inspect.isclass(obj)) or not obj.__doc__:
                continue
            if getattr(obj, "__module__", None) not in (None, name, "builtins") and name != "builtins":
                continue  # re-exported from elsewhere; documented there
            kind = "class" if inspect.isclass(obj) else "def"
            parts.append(f"{kind} {attr}:\n{inspect.cleandoc(obj.__doc__)}")
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    doc = getattr(vars(obj)[meth], "__doc__", None)
                    if not meth.startswith("_") and isinstance(doc, str) and doc:
                        parts.append(f"def {attr}.{meth}:\n{inspect.cleandoc(doc)}")
        if len(parts) > 2:
            yield Document(f"compiled:{name}", "\n\n".join(parts))


def stdlib_documents() -> list[Document]:
    """Every corpus document, sorted by key (deterministic for a given Python install)."""
    return sorted([*_pydoc_topics(), *_stdlib_modules(), *_compiled_modules()], key=lambda d: d.key)


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document], list[Document]]:
    """(train, validation, heldout): the fixed hash split, ~90/5/5%."""
    train = [d for d in docs if not (d.heldout or d.validation)]
    return train, [d for d in docs if d.validation], [d for d in docs if d.heldout]


def train_tokenizer(docs: list[Document], vocab_size: int, path: Path) -> None:
    """Byte-level BPE with <pad>/<bos>/<eos> at ids 0/1/2, trained on `docs`, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} landed at id {tok.token_to_id(name)}, not {i}"
    tok.save(str(path))


def pack(docs: list[Document], tokenizer, seq_len: int) -> np.ndarray:
    """int32 [rows, seq_len + 1]: `<bos> doc <eos>` for every doc, concatenated, cut into rows; the tail is padded."""
    ids: list[int] = []
    for d in docs:
        ids += [BOS, *tokenizer.encode(d.text), EOS]
    rows = -(-len(ids) // (seq_len + 1))
    out = np.full(rows * (seq_len + 1), PAD, np.int32)
    out[: len(ids)] = ids
    return out.reshape(rows, seq_len + 1)


def heldout_rows(tokenizer, seq_len: int, max_rows: int | None = None) -> np.ndarray:
    """The held-out documents packed like training data: int32 [rows, seq_len + 1]."""
    _, _, heldout = split_documents(stdlib_documents())
    rows = pack(heldout, tokenizer, seq_len)
    return rows if max_rows is None else rows[:max_rows]


def _loss_fn(params, config, rows):
    """Mean next-token cross-entropy over real (non-pad) targets. rows: int32 [B, T+1]."""
    import jax
    import jax.numpy as jnp
    from meshserve.model import transformer

    x, y = rows[:, :-1], rows[:, 1:]
    B, T = x.shape
    logits, _, _ = transformer.prefill(params, config, x, jnp.full((B,), T, jnp.int32), all_logits=True)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]  # [B, T]
    real = (y != PAD).astype(jnp.float32)
    return jnp.sum(nll * real) / jnp.maximum(jnp.sum(real), 1.0)


@functools.cache
def _eval_step(config):
    """A jitted (params, rows [B, T+1]) -> (nll [B, T], argmax [B, T]), compiled once per config and shape."""
    import jax
    import jax.numpy as jnp
    from meshserve.model import transformer

    @jax.jit
    def step(params, rows):
        x, y = rows[:, :-1], rows[:, 1:]
        B, T = x.shape
        logits, _, _ = transformer.prefill(params, config, x, jnp.full((B,), T, jnp.int32), all_logits=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return step


def evaluate(params, config, rows: np.ndarray, batch: int = 8) -> dict[str, np.ndarray | float]:
    """Held-out statistics. rows: int32 [R, T+1].

    Returns {"perplexity": exp(mean NLL over real targets), "tokens": count, "argmax": int32 [R, T] top-1
    predictions, "real": bool [R, T] which targets are real}. The compute dtype follows the weights.
    """
    step = _eval_step(config)
    nlls, preds = [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        pad = batch - len(chunk)  # keep one compiled shape: pad the last chunk with pad rows, dropped below
        full = np.concatenate([chunk, np.full((pad, rows.shape[1]), PAD, np.int32)]) if pad else chunk
        nll, pred = step(params, full)
        nlls.append(np.asarray(nll)[: len(chunk)])
        preds.append(np.asarray(pred)[: len(chunk)])
    nll, pred = np.concatenate(nlls), np.concatenate(preds)
    real = rows[:, 1:] != PAD
    return {
        "perplexity": float(np.exp(nll[real].astype(np.float64).mean())),
        "tokens": int(real.sum()),
        "argmax": pred,
        "real": real,
    }


def lr_at(progress: float, peak: float, warmup: float = 0.05, final: float = 0.05) -> float:
    """Learning rate at `progress` in [0, 1] of the budget: linear warmup, then cosine down to final * peak."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t)))


def train(
    config,
    rows: np.ndarray,
    *,
    minutes: float,
    max_steps: int | None,
    batch: int,
    lr: float,
    seed: int,
    val_rows: np.ndarray | None = None,
    evals: int = 6,
) -> tuple[dict, dict]:
    """AdamW with warmup + cosine on random batches of `rows` [R, T+1]; float32 weights.

    The schedule runs over a wall-clock budget (`minutes`), or over `max_steps` when given: the CPUs this
    trains on are shared, so a step count cannot promise a finish time, and a cosine cut off early leaves
    the learning rate high. `evals` times over the run (and at the end) the validation perplexity is
    measured on `val_rows` and the best weights so far are kept: the corpus is small (~0.5 M tokens).
    Returns (best params, log with per-step losses and learning rates and the validation curve).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from meshserve.model.params import init_params
    from tqdm import tqdm

    params = init_params(config, jax.random.key(seed), jnp.float32)
    # Decay matrices only: norm scales (1-D per layer, 2-D when stacked [N, E]) stay undecayed.
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "norm" not in jax.tree_util.keystr(path), params
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),  # early steps on a fresh model can spike; clipping keeps them sane
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask),
    )
    opt_state = opt.init(params)

    @jax.jit
    def update(params, opt_state, batch_rows, learning_rate):
        opt_state[1].hyperparams["learning_rate"] = learning_rate
        loss, grads = jax.value_and_grad(_loss_fn)(params, config, batch_rows)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    log: dict = {"loss": [], "lr": [], "val": []}
    best = (math.inf, params, 0)
    start = time.monotonic()
    next_eval = 1.0 / evals
    bar = tqdm(desc="train", total=max_steps, file=sys.stderr, dynamic_ncols=True)
    step = 0
    while True:
        progress = step / max_steps if max_steps else (time.monotonic() - start) / (60 * minutes)
        if progress >= 1.0:
            break
        rate = lr_at(progress, lr)
        idx = rng.integers(0, len(rows), batch)
        params, opt_state, loss = update(params, opt_state, jnp.asarray(rows[idx]), jnp.float32(rate))
        log["loss"].append(float(loss))
        log["lr"].append(rate)
        step += 1
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(log['loss'][-10:]):.3f}", lr=f"{rate:.2e}", done=f"{progress:.0%}")
        done = (step / max_steps if max_steps else (time.monotonic() - start) / (60 * minutes)) >= 1.0
        if val_rows is not None and (progress >= next_eval or done):
            next_eval += 1.0 / evals
            ppl = evaluate(params, config, val_rows)["perplexity"]
            log["val"].append((step, ppl))
            bar.write(
                f"step {step}: train loss {np.mean(log['loss'][-50:]):.3f}, validation ppl {ppl:.2f}", file=sys.stderr
            )
            if ppl < best[0]:
                best = (ppl, jax.device_get(params), step)
    bar.close()
    log["best_step"] = best[2] if val_rows is not None else step
    return (best[1] if val_rows is not None else params), log


def main(argv: list[str] | None = None) -> int:
    from meshserve.model.loading import DEMO_CHECKPOINT

    parser = argparse.ArgumentParser(prog="python -m meshserve.model.demo_train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_CHECKPOINT, help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--preset", default="demo", help="model preset (default: demo)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training row (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    parser.add_argument(
        "--minutes", type=float, default=22.0, help="training budget in wall-clock minutes (default 22)"
    )
    parser.add_argument("--steps", type=int, help="a fixed number of steps instead of --minutes (reproducible)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--val-rows", type=int, default=48, help="validation rows used to pick the best step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="build corpus and tokenizer, report sizes, no training")
    parser.add_argument("--json", action="store_true", help="print the final statistics as one JSON line")
    args = parser.parse_args(argv)

    from meshserve.model.config import get_config
    from meshserve.model.tokenizer import HFTokenizer

    config = get_config(args.preset)
    t0 = time.monotonic()
    train_docs, val_docs, heldout_docs = split_documents(stdlib_documents())
    chars = [sum(len(d.text) for d in docs) / 1e6 for docs in (train_docs, val_docs, heldout_docs)]
    print(
        f"corpus: {len(train_docs)} train / {len(val_docs)} validation / {len(heldout_docs)} held-out documents, "
        f"{chars[0]:.2f} / {chars[1]:.2f} / {chars[2]:.2f} M characters",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        train_tokenizer(train_docs, config.vocab_size, tok_path)
        tokenizer = HFTokenizer(tok_path)
        train_rows = pack(train_docs, tokenizer, args.seq_len)
        val_rows = pack(val_docs, tokenizer, args.seq_len)
        eval_rows = pack(heldout_docs, tokenizer, args.seq_len)
        print(
            f"tokens: {train_rows.size / 1e6:.2f} M train ({len(train_rows)} rows of {args.seq_len + 1}), "
            f"{eval_rows.size / 1e6:.3f} M held-out; one epoch = {len(train_rows) / args.batch:.0f} steps",
            file=sys.stderr,
        )
        if args.dry_run:
            return 0
        params, log = train(
            config,
            train_rows,
            minutes=args.minutes,
            max_steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            val_rows=val_rows[: args.val_rows],
        )
        from meshserve.model.checkpoint import save_checkpoint
        from meshserve.model.params import cast_params

        bf16 = cast_params(config, params, "bf16")
        save_checkpoint(args.out, config, bf16, "bf16", tok_path, overwrite=True)
    stats = {
        "steps": len(log["loss"]),
        "best_step": log["best_step"],
        "train_loss_last50": float(np.mean(log["loss"][-50:])),
        "train_loss_at_best50": float(np.mean(log["loss"][max(0, log["best_step"] - 50) : log["best_step"]])),
        "validation_ppl": min(v for _, v in log["val"]),
        "heldout_tokens": int((eval_rows[:, 1:] != PAD).sum()),
        "heldout_ppl_f32": evaluate(params, config, eval_rows)["perplexity"],
        "heldout_ppl_bf16": evaluate(bf16, config, eval_rows)["perplexity"],
        "heldout_ppl_int8": evaluate(cast_params(config, bf16, "int8"), config, eval_rows)["perplexity"],
        "wall_minutes": (time.monotonic() - t0) / 60,
        "checkpoint_mb": sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file()) / 1e6,
    }
    print(
        json.dumps(stats)
        if args.json
        else "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items())
    )
    return 0 if math.isfinite(stats["heldout_ppl_bf16"]) else 1


if __name__ == "__main__":
    sys.exit(main())
