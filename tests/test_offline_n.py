"""`n` samples per prompt in `meshserve batch-generate`, through the real CLI on a tiny checkpoint: sample i of a
line is what a line of its own with seed + i gives, n = 1 keeps the flat output row, a bad n goes to the errors file
naming the field, the shared prompt is prefilled once (the summary's cached_prompt_tokens), and a kill -9 mid-job
resumes with every id written once, all n samples together."""

import json
import subprocess
import sys
import time

import pytest
from test_serving_support import GRID, env, make_checkpoint, meshserve, slow_decode

# Longer than the smallest prompt bucket (32 in GRID), so reusing it saves a bucket and the prefix cache is used.
PROMPT = "Q: 2+2? A: 4. Q: 3+3? A: 6. Q: 5+1? A: 6. Q: 7+"
FLAT_KEYS = {"id", "text", "tokens", "logprobs", "finish_reason"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _job(checkpoint, tmp_path, name: str, rows: list[dict]) -> tuple[dict, list[dict], list[dict]]:
    """Run batch-generate over `rows`; (summary, output rows, error rows)."""
    src, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = meshserve("batch-generate", str(src), "-o", str(out), "--checkpoint", str(checkpoint), *GRID, "--json")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), _lines(out), _lines(tmp_path / f"{name}.out.jsonl.errors.jsonl")


def test_n_samples_are_the_lines_with_consecutive_seeds_and_bad_n_is_refused(checkpoint, tmp_path):
    sampling = {"temperature": 0.9, "top_k": 50, "max_new_tokens": 8, "ignore_eos": True}
    bad = [0, 65, 2.5, "3", True]
    rows = [
        {"id": "many", "prompt": PROMPT, "n": 3, "seed": 5, **sampling},
        {"id": "alts", "prompt": "hi", "n": 2, "max_new_tokens": 3, "top_logprobs": 2, "ignore_eos": True},
        {"id": "plain", "prompt": "hello", "max_new_tokens": 4, "ignore_eos": True},
        {"id": "one", "prompt": "hello", "n": 1, "max_new_tokens": 4, "ignore_eos": True},
        *({"id": f"bad{i}", "prompt": "x", "n": v} for i, v in enumerate(bad)),
        {"id": "seed", "prompt": "x", "n": 2, "seed": 2**63 - 1},  # sample 1's seed would not be a valid seed
    ]
    summary, out, errors = _job(checkpoint, tmp_path, "n", rows)
    by_id = {r["id"]: r for r in out}
    assert [r["id"] for r in out].count("many") == 1 and set(by_id) == {"many", "alts", "plain", "one"}

    # n = 1, given or not: the flat row, no "choices".
    assert set(by_id["plain"]) == set(by_id["one"]) == FLAT_KEYS
    assert by_id["one"]["tokens"] == by_id["plain"]["tokens"] and len(by_id["one"]["tokens"]) == 4

    choices = by_id["many"]["choices"]
    assert set(by_id["many"]) == {"id", "choices"} and [c["index"] for c in choices] == [0, 1, 2]
    assert all(set(c) == FLAT_KEYS - {"id"} | {"index"} and len(c["tokens"]) == 8 for c in choices)
    assert len({tuple(c["tokens"]) for c in choices}) > 1  # different seeds sample differently
    alts = by_id["alts"]["choices"]
    assert all(len(c["top_logprobs"]) == 3 and all(len(a) == 2 for a in c["top_logprobs"]) for c in alts)

    # The same samples as three lines of their own with seeds 5, 6, 7 (another job: nothing shared with the first).
    singles = [{"id": s, "prompt": PROMPT, "seed": s, **sampling} for s in (5, 6, 7)]
    _, single_out, _ = _job(checkpoint, tmp_path, "singles", singles)
    single = {r["id"]: r for r in single_out}
    for c, s in zip(choices, (5, 6, 7), strict=True):
        assert c["tokens"] == single[s]["tokens"] and c["text"] == single[s]["text"]
        assert c["logprobs"] == pytest.approx(single[s]["logprobs"], abs=1e-4)

    # Bad n: one error line each, naming the field and the limit; the job went on.
    messages = {e["id"]: e["error"] for e in errors}
    assert set(messages) == {*(f"bad{i}" for i in range(len(bad))), "seed"}
    for i, v in enumerate(bad):
        assert messages[f"bad{i}"] == f"n must be an integer in [1, 64], got {json.dumps(v)}"  # JSON: true, "3"
    assert messages["seed"].startswith("seed + n - 1 must be below 2**63")

    # Lines count lines; tokens and samples count every sample; the shared prompt of "many" was prefilled once and
    # its other two samples reused it (all but its last token), while the short prompts are below any reuse.
    assert (summary["done"], summary["errors"], summary["samples"]) == (4, len(bad) + 1, 3 + 2 + 1 + 1)
    assert summary["tokens"] == 3 * 8 + 2 * 3 + 4 + 4
    assert summary["cached_prompt_tokens"] >= 2 * (len(PROMPT) - 1)


def test_a_killed_job_resumes_writing_each_id_once_with_all_its_samples(checkpoint, tmp_path):
    n, samples, tokens = 100, 4, 16
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # Distinct first characters in each run of 26 lines: a line's samples share its prompt, lines share little.
    prompts = [chr(65 + i % 26) + f"{i:03d} " + PROMPT for i in range(n)]
    src.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": p, "n": samples, "max_new_tokens": tokens, "ignore_eos": True,
                        "temperature": 1.0, "seed": i}) + "\n"
            for i, p in enumerate(prompts)
        )
    )  # fmt: skip
    cmd = meshserve("batch-generate", str(src), "-o", str(out), "--checkpoint", str(checkpoint), *GRID, "--json")
    # The killed run's decode steps take >= 10 ms more: its ~800 steps take >= 8 s, so the kill lands mid-job even
    # when this process is paused a while after the 3rd line (unslowed, a fast machine runs the job in ~0.5 s). The
    # rerun is the real CLI at full speed.
    slow = [sys.executable, "-c", slow_decode(0.01), *cmd[3:]]
    proc = subprocess.Popen(slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    deadline = time.monotonic() + 240
    while len(_lines(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: the lines in flight (some of their samples done) are lost with the process
    proc.wait()
    first = out.read_bytes().count(b"\n")
    assert 3 <= first < n, f"kill landed at {first} of {n} lines"
    with open(out, "a") as f:
        f.write('{"id": "r0", "choices": [{"index": 0, "te')  # what a kill in the middle of a write leaves behind

    done = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["skipped"], summary["done"], summary["errors"]) == (first, n - first, 0)
    assert summary["samples"] == samples * (n - first) and summary["tokens"] == samples * tokens * (n - first)
    # Every id once, each with all its samples: an id whose samples were cut off mid-way was redone whole.
    rows = _lines(out)
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(n))
    for r in rows:
        assert [c["index"] for c in r["choices"]] == list(range(samples))
        assert all(len(c["tokens"]) == tokens and c["finish_reason"] == "length" for c in r["choices"])
    # A line's last three samples reuse its first one's prompt, all but the last token of it (a few lose it when
    # the first one's slot is taken before they are placed: half is the floor here, ~95% was seen).
    most = (n - first) * (samples - 1) * len(prompts[0])
    assert most >= summary["cached_prompt_tokens"] >= most // 2


def test_include_stop_str_in_output_and_truncate_prompt_tokens(checkpoint, tmp_path):
    """A line's stop string ends the text before it, or with it when include_stop_str_in_output is true (vLLM's);
    the value must be a JSON boolean. truncate_prompt_tokens lets a prompt longer than the context through."""
    base = {"prompt": "hello", "max_new_tokens": 12, "ignore_eos": True}
    _, (full,), _ = _job(checkpoint, tmp_path, "full", [{"id": "full", **base}])
    text = full["text"]
    k = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2])  # a stop from the middle
    stop = text[k : k + 2]
    rows = [{"id": "cut", **base, "stop": [stop]},
            {"id": "kept", **base, "stop": [stop], "include_stop_str_in_output": True},
            {"id": "bad", **base, "include_stop_str_in_output": "yes"},
            {"id": "trunc", **base, "prompt": "hello " * 100, "truncate_prompt_tokens": -1},  # 601 tokens: too long
            {"id": "trunc-bad", **base, "truncate_prompt_tokens": 128},
            {"id": "trunc-type", **base, "truncate_prompt_tokens": "2"},
            {"id": "min", "prompt": "hello", "min_tokens": 70, "ignore_eos": True}]  # fmt: skip
    _, out, errors = _job(checkpoint, tmp_path, "stops", rows)
    by_id = {r["id"]: r for r in out}
    cut = text[: text.find(stop)]
    assert (by_id["cut"]["text"], by_id["cut"]["finish_reason"]) == (cut, "stop")
    assert (by_id["kept"]["text"], by_id["kept"]["tokens"]) == (cut + stop, by_id["cut"]["tokens"])
    assert [e["id"] for e in errors] == ["bad", "trunc-bad", "trunc-type"]
    assert errors[0]["error"] == 'include_stop_str_in_output must be true or false, got "yes"'
    # truncate_prompt_tokens (vLLM's): -1 keeps the prompt's end that leaves room for max_new_tokens.
    assert len(by_id["trunc"]["tokens"]) == 12
    assert errors[1]["error"] == "truncate_prompt_tokens must be -1 or in [1, 127] (0 = off), got 128"
    assert errors[2]["error"] == 'truncate_prompt_tokens must be an integer, got "2"'
    assert len(by_id["min"]["tokens"]) == 70  # no max_new_tokens: the default 64 stretches to min_tokens
