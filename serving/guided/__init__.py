"""Guided decoding: constrain what a request may generate to a format (OpenAI's response_format json_object and
json_schema, tool_choice "required" or a named function), as vLLM's and TGI's structured outputs do.

The pieces (no JAX here; the engine applies the masks, serving/engine_steps.py):
- `GuideSpec`: what a request asks for (hashable; built by the protocol layers, serving/validation.py).
- `compile_spec(spec) -> Grammar`: the spec as a byte-level matcher (cached per spec). Raises GuideError naming the
  field and what is not supported.
- `TokenTable.of(tokenizer, vocab_size)`: each token id's bytes, built once per tokenizer, with the vocabulary's
  trie and the per-state mask cache.
- `Guide(grammar, table, stop_ids)`: one request's place in its grammar: `mask()` is the tokens it may sample next
  (packed uint32 [W], W = ceil(V / 32): token v is allowed iff bit v % 32 of word v // 32 is set), `advance(token)`
  moves past a sampled token, `done` says nothing but the end may follow (the request stops there).
"""

from __future__ import annotations

from meshserve.serving.guided.grammar import Grammar
from meshserve.serving.guided.masks import Guide, TokenTable
from meshserve.serving.guided.schema import compile_spec
from meshserve.serving.guided.spec import GuideError, GuideSpec

__all__ = ["GuideError", "GuideSpec", "Grammar", "Guide", "TokenTable", "compile_spec"]
