"""`meshserve generate --model PRESET`: --seed is the sampling seed only; the preset's random weights stay fixed."""

import json

from meshserve.serving.cli import main


def _generate(capsys, *flags):
    assert main(["generate", "--model", "tiny", "--tokens", "5,6,7", "--max-new-tokens", "6", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_seed_changes_sampling_but_not_a_presets_weights(capsys):
    greedy = [_generate(capsys, "--seed", s) for s in ("1", "2")]
    assert greedy[0] == greedy[1]  # same weights: greedy tokens and log-probs do not depend on --seed
    sampled = [_generate(capsys, "--temperature", "1.0", "--seed", s) for s in ("1", "1", "2")]
    assert sampled[0] == sampled[1] and sampled[0]["tokens"] != sampled[2]["tokens"]
