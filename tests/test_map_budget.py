"""The memory-map budget (serving/map_budget.py): a compile that would take the process past its map limit is
refused with an error that names the limit and what to change, before XLA fails; a deferred warm-up that runs into
it leaves those steps to the larger buckets that compiled, and the engine still answers as generate does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from engine_helpers import serve_requests
from meshserve.errors import UserError
from meshserve.model.config import get_config
from meshserve.model.generate import generate
from meshserve.model.params import init_params
from meshserve.model.sampling import SamplingParams
from meshserve.serving.engine import Engine
from meshserve.serving.map_budget import MapBudget, MapLimitError, count_maps, max_map_count
from meshserve.serving.plan import make_plan

CONFIG = get_config("tiny")
pytestmark = pytest.mark.skipif(count_maps() is None or max_map_count() is None, reason="needs Linux /proc")


def _engine():
    params = init_params(CONFIG, jax.random.key(3), jnp.float32)
    plan = make_plan(CONFIG, max_batch=4, max_context=64, length_buckets=(16, 64), decode_buckets=(1, 4),
                     weights="f32", prefix_caching=False)  # fmt: skip
    return params, Engine(params, CONFIG, plan)


def test_the_budget_reads_the_kernel_limit_and_learns_the_largest_step():
    budget = MapBudget()
    assert budget.limit == max_map_count() > 0
    held = budget.check("a step")
    assert held is not None and held > 0
    budget.record(held - 7)  # as if the compile had added 7 maps (and any the process mapped meanwhile)
    assert budget.largest_step >= 7
    tight = MapBudget(limit=int((held + 10) / 0.9), largest_step=50)
    with pytest.raises(MapLimitError) as refused:
        tight.check("decode b=4 C=64")
    message = str(refused.value)
    assert isinstance(refused.value, UserError)
    for part in ("decode b=4 C=64", "vm.max_map_count", "--length-buckets", "sysctl -w vm.max_map_count"):
        assert part in message, message


def test_a_warm_up_past_the_limit_is_refused_before_compiling():
    _, engine = _engine()
    engine._maps = MapBudget(limit=int(count_maps() / 0.9) - 1)  # already past: the first step is refused
    with pytest.raises(MapLimitError, match="release"):
        engine.warm_up(phases=("generate",))
    assert engine.compiled_steps() == 0


def test_a_deferred_warm_up_that_reaches_the_limit_serves_from_the_larger_buckets():
    params, engine = _engine()
    engine.warm_up(phases=("generate",), defer=True)
    covering, pending = engine.compiled_steps(), engine.pending_steps()
    assert covering > 0 and pending > 0
    engine._maps.limit = 1  # from here on every compile would pass it
    failed = engine.compile_pending()
    assert failed and all(isinstance(error, MapLimitError) for _, error in failed)
    assert engine.compiled_steps() == covering and engine.pending_steps() == 0
    cases = [([5, 1, 4], 6, SamplingParams()), ([9, 2, 6, 5] * 5, 5, SamplingParams())]
    for (prompt, n, _), received in zip(cases, serve_requests(engine, cases), strict=True):
        assert received.tokens == list(generate(params, CONFIG, [prompt], max_new_tokens=n)[0].tokens)
