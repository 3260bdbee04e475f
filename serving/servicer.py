"""The gRPC servicer: translates meshserve.v1 protos to engine requests and back. Proto types stop here.

Validation happens before anything is queued: every bad field answers INVALID_ARGUMENT with a message naming the
field and its limit, so no input reaches the engine thread unchecked. A full queue answers RESOURCE_EXHAUSTED, a
draining server UNAVAILABLE. A client that goes away (or a deadline that passes) cancels its request; the engine
frees the slot at its next step.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass

import grpc
import jax
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.model.sampling import TOP_LOGPROBS_MAX, SamplingError, SamplingParams
from meshserve.protos import inference_pb2 as pb
from meshserve.protos import inference_pb2_grpc as pb_grpc
from meshserve.serving.orchestrator import (
    Event,
    Orchestrator,
    RequestHandle,
    ScoreCancelledError,
    ShuttingDownError,
)
from meshserve.serving.plan import EnginePlan
from meshserve.serving.scheduler import QueueFullError, Request

__all__ = [
    "InferenceServicer",
    "Limits",
    "RequestError",
    "FINISH_REASON",
    "score_reply_bytes",
    "DEFAULT_MAX_SCORE_TOKENS",
]

FINISH_REASON = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
DEFAULT_MAX_NEW_TOKENS = 64
# Prompt + continuation tokens over one Score's items: 256 items x 1024 tokens. Its largest reply,
# score_reply_bytes(256, 262144) ~ 2.4 MB, fits gRPC's 4 MiB send limit (serving/server.py MAX_MESSAGE_BYTES).
DEFAULT_MAX_SCORE_TOKENS = 262144


def score_reply_bytes(max_items: int, max_tokens: int) -> int:
    """An upper bound on the serialized ScoreResponse for `max_items` items of `max_tokens` tokens in all.

    Per continuation token: a packed float (4 bytes) and an int32 id as a varint (at most 5 bytes for ids < 2**31).
    Per item: the ScoreResult's tag and length (<= 6), logprob double (9), greedy (2), two packed fields' tags and
    lengths (<= 12): 32 bytes with room to spare.
    """
    return 9 * max_tokens + 32 * max_items


class RequestError(UserError):
    """An invalid request; the message names the field and its limit (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Limits:
    max_context: int
    max_batch: int
    max_new_tokens: int
    max_queue: int
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_score_items: int = 256
    max_text_chars: int = 0  # 0: 32 characters per context token (no tokenizer packs more into one token)
    max_score_tokens: int = DEFAULT_MAX_SCORE_TOKENS  # prompt + continuation tokens over one Score's items

    @property
    def text_chars(self) -> int:
        return self.max_text_chars or 32 * self.max_context


class InferenceServicer(pb_grpc.InferenceServicer):
    """meshserve.v1.Inference over an orchestrator. `model` gives the tokenizer, config and stop ids."""

    def __init__(self, orchestrator: Orchestrator, model, plan: EnginePlan, limits: Limits, mesh_info: dict):
        self.orch = orchestrator
        self.model = model
        self.config: ModelConfig = model.config
        self.plan = plan
        self.limits = limits
        self.mesh_info = mesh_info
        self.metrics = orchestrator.metrics
        self._count_lock = threading.Lock()  # the handler and the RPC-end callback race to count an outcome

    # ----- validation -----

    def _ids(self, field: str, ids) -> list[int]:
        """`ids` when every one is in the model's vocabulary. Also checks what the tokenizer made of a text field:
        a tokenizer may know more ids than the model embeds, and such an id must not reach the engine thread."""
        ids = list(ids)
        V = self.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise RequestError(f"{field}: token id {bad} outside the vocabulary [0, {V})")
        return ids

    def _text(self, field: str, text: str) -> str:
        if len(text) > self.limits.text_chars:
            raise RequestError(f"{field}: {len(text)} characters exceed the limit of {self.limits.text_chars}")
        return text

    def _request(self, req: pb.GenerateRequest, context) -> tuple[Request, list[str]]:
        which = req.WhichOneof("input")
        if which == "text":
            prompt = self._ids("text", self.model.encode_prompt(self._text("text", req.text))) if req.text else []
        elif which == "tokens":
            prompt = self._ids("tokens.ids", req.tokens.ids)
        else:
            prompt = []
        if not prompt:
            raise RequestError("input: empty prompt (set text or tokens.ids)")
        lim = self.limits
        room = lim.max_context - len(prompt)
        if room < 1:
            raise RequestError(
                f"input: {len(prompt)} prompt tokens leave no room in the context (max_context={lim.max_context})"
            )
        if req.HasField("max_new_tokens"):
            n = req.max_new_tokens
            if not 1 <= n <= lim.max_new_tokens:
                raise RequestError(f"max_new_tokens must be in [1, {lim.max_new_tokens}], got {n}")
            if n > room:
                raise RequestError(
                    f"max_new_tokens: {len(prompt)} prompt tokens + max_new_tokens {n} exceed the context limit "
                    f"max_context={lim.max_context}"
                )
        else:
            n = min(DEFAULT_MAX_NEW_TOKENS, room, lim.max_new_tokens)
        if not 0 <= req.top_logprobs <= TOP_LOGPROBS_MAX:  # a request field, checked before sampling's own fields
            raise RequestError(f"top_logprobs must be in [0, {TOP_LOGPROBS_MAX}] (0 = none), got {req.top_logprobs}")
        s = req.sampling
        top_p = s.top_p if s.HasField("top_p") else 1.0
        repetition = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
        try:
            sampling = SamplingParams(
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=top_p,
                seed=s.seed,
                repetition_penalty=repetition,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                min_p=s.min_p,
                top_logprobs=req.top_logprobs,
            )
        except SamplingError as e:
            raise RequestError(f"sampling.{e}") from None
        if len(req.stop) > lim.max_stop_strings:
            raise RequestError(f"stop: {len(req.stop)} stop strings exceed the limit of {lim.max_stop_strings}")
        for i, st in enumerate(req.stop):
            if not 1 <= len(st) <= lim.max_stop_length:
                raise RequestError(f"stop[{i}]: length must be in [1, {lim.max_stop_length}], got {len(st)}")
        remaining = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + remaining if remaining is not None else None
        stop_ids = frozenset() if req.ignore_eos else frozenset(self.model.stop_ids())
        return Request(prompt, n, sampling, stop_ids, deadline=deadline), list(req.stop)

    # ----- RPCs -----

    def _start(self, request, context, method: str) -> RequestHandle:
        try:
            r, stop = self._request(request, context)
            handle = self.orch.submit(r, stop)
        except QueueFullError as e:
            self._abort(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ShuttingDownError as e:
            self._abort(context, method, grpc.StatusCode.UNAVAILABLE, str(e))
        except UserError as e:
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))

        def ended() -> None:
            # Runs when the RPC ends, however it ends. A client that cancels a stream ends it without the handler
            # seeing a last event (gRPC just stops pulling chunks), so the outcome is counted here too.
            self.orch.cancel(handle)
            r = handle.request
            expired = r.deadline is not None and time.monotonic() >= r.deadline
            self._count(handle, method, "DEADLINE_EXCEEDED" if expired else "CANCELLED")

        if not context.add_callback(ended):
            ended()  # the RPC already ended (client gone in between): the callback will never run
        return handle

    def _count(self, handle: RequestHandle, method: str, code: str) -> None:
        """Count one RPC's outcome in meshserve_requests_total, once (the first caller wins)."""
        with self._count_lock:
            if handle.counted:
                return
            handle.counted = True
        self.metrics.requests.labels(method, code).inc()

    def _abort(self, context, method: str, code: grpc.StatusCode, message: str):
        self.metrics.requests.labels(method, code.name).inc()
        context.abort(code, message)

    def _events(self, handle: RequestHandle, context, method: str):
        """The request's events until its last; stops early when the client is gone."""
        while True:
            try:
                event = handle.events.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    self.orch.cancel(handle)
                    return
                continue
            if isinstance(event, UserError):  # this request's prefill batch was refused (the engine goes on)
                self._count(handle, method, "INVALID_ARGUMENT")
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(event))
            if isinstance(event, BaseException):
                self._count(handle, method, "INTERNAL")
                context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {type(event).__name__}")
            yield event
            if event.finish_reason is not None:
                return

    def _usage_timing(self, handle: RequestHandle) -> tuple[pb.Usage, pb.Timing]:
        r = handle.request
        ms = lambda t: 0.0 if t is None else (t - r.arrival) * 1e3  # noqa: E731
        usage = pb.Usage(prompt_tokens=len(r.prompt), generated_tokens=len(r.tokens))
        timing = pb.Timing(
            queue_ms=ms(r.prefill_start), time_to_first_token_ms=ms(r.first_token_time), total_ms=ms(r.finish_time)
        )
        return usage, timing

    def _done(self, context, method: str, handle: RequestHandle, reason: str | None) -> None:
        if (
            reason == "cancelled"
            and handle.request.deadline is not None
            and time.monotonic() >= handle.request.deadline
        ):
            self._count(handle, method, "DEADLINE_EXCEEDED")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if reason == "cancelled" and self.orch.grace_passed and context.is_active():
            self._count(handle, method, "UNAVAILABLE")
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server shut down: the request was cancelled when the drain's grace period (--grace) ended",
            )
        self._count(handle, method, "CANCELLED" if reason in (None, "cancelled") else "OK")

    def _top(self, alternatives) -> list[pb.TopLogprobs]:
        """Scheduler alternatives (ids, log-probs) per token -> TopLogprobs messages, each token decoded alone."""
        decode = self.model.tokenizer.decode
        return [pb.TopLogprobs(tokens=ids, logprobs=lps, texts=[decode([t]) for t in ids]) for ids, lps in alternatives]

    def Generate(self, request, context):
        handle = self._start(request, context, "Generate")
        tokens, logprobs, top, reason = [], [], [], None
        event: Event
        for event in self._events(handle, context, "Generate"):
            tokens.extend(event.tokens)
            logprobs.extend(event.logprobs)
            top.extend(event.top_logprobs)
            reason = event.finish_reason
        self._done(context, "Generate", handle, reason)
        usage, timing = self._usage_timing(handle)
        return pb.GenerateResponse(
            tokens=tokens,
            text=handle.text,
            logprobs=logprobs if request.return_logprobs else [],
            finish_reason=FINISH_REASON.get(reason, pb.FINISH_REASON_CANCELLED),
            usage=usage,
            timing=timing,
            top_logprobs=self._top(top),
        )

    def GenerateStream(self, request, context):
        handle = self._start(request, context, "GenerateStream")
        reason = None
        for event in self._events(handle, context, "GenerateStream"):
            reason = event.finish_reason
            chunk = pb.GenerateChunk(
                tokens=event.tokens,
                text=event.text,
                logprobs=event.logprobs if request.return_logprobs else [],
                top_logprobs=self._top(event.top_logprobs),
            )
            if reason is not None:
                self._done(context, "GenerateStream", handle, reason)
                usage, timing = self._usage_timing(handle)
                chunk.finish_reason = FINISH_REASON[reason]
                chunk.usage.CopyFrom(usage)
                chunk.timing.CopyFrom(timing)
            if chunk.tokens or chunk.text or reason is not None:
                yield chunk
        if reason is None:
            self._count(handle, "GenerateStream", "CANCELLED")

    def Score(self, request, context):
        lim = self.limits
        try:
            if not request.items:
                raise RequestError("items: no items to score")
            if len(request.items) > lim.max_score_items:
                raise RequestError(f"items: {len(request.items)} items exceed the limit of {lim.max_score_items}")
            pairs = [self._score_item(i, item) for i, item in enumerate(request.items)]
            total = sum(len(p) + len(c) for p, c in pairs)
            if total > lim.max_score_tokens:
                raise RequestError(
                    f"items: {total} prompt + continuation tokens in all exceed the limit of "
                    f"max_score_tokens={lim.max_score_tokens}; split the request"
                )
            # The client's deadline bounds the wait; a worker never blocks past it. Without a deadline gRPC
            # reports a huge remaining time (too large for a thread wait): wait without a timeout then.
            remaining = context.time_remaining()
            # A client that goes away stops the job at its next chunk (the callback also runs at a normal end).
            cancel = threading.Event()
            if not context.add_callback(cancel.set):
                cancel.set()
            out = self.orch.score(
                pairs, timeout=remaining if remaining is not None and remaining < 1e6 else None, cancel=cancel
            )
        except QueueFullError as e:
            self._abort(context, "Score", grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ShuttingDownError as e:
            self._abort(context, "Score", grpc.StatusCode.UNAVAILABLE, str(e))
        except UserError as e:
            self._abort(context, "Score", grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TimeoutError:
            self._abort(context, "Score", grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except ScoreCancelledError as e:
            self._abort(context, "Score", grpc.StatusCode.CANCELLED, str(e))
        except Exception as e:  # the engine thread died (orchestrator.error): answer instead of hanging
            self._abort(context, "Score", grpc.StatusCode.INTERNAL, f"engine failed: {type(e).__name__}")
        self.metrics.requests.labels("Score", "OK").inc()
        results = [
            pb.ScoreResult(
                logprob=float(lp.astype("float64").sum()),
                token_logprobs=lp.tolist(),
                greedy=bool(g.all()),
                continuation_tokens=cont,
            )
            for lp, g, (_, cont) in zip(out.token_logprobs, out.greedy, pairs, strict=True)
        ]
        return pb.ScoreResponse(results=results)

    def _score_item(self, i: int, item: pb.ScoreItem) -> tuple[list[int], list[int]]:
        if item.WhichOneof("prompt") == "prompt_text":
            field = f"items[{i}].prompt_text"
            prompt = self._ids(field, self.model.encode_prompt(self._text(field, item.prompt_text)))
        else:
            prompt = self._ids(f"items[{i}].prompt_tokens.ids", item.prompt_tokens.ids)
        if item.WhichOneof("continuation") == "continuation_text":
            field = f"items[{i}].continuation_text"
            cont = self._ids(field, self.model.tokenizer.encode(self._text(field, item.continuation_text)))
        else:
            cont = self._ids(f"items[{i}].continuation_tokens.ids", item.continuation_tokens.ids)
        if not prompt:
            raise RequestError(f"items[{i}]: empty prompt")
        if not cont:
            raise RequestError(f"items[{i}]: empty continuation")
        if len(prompt) + len(cont) > self.limits.max_context:
            raise RequestError(
                f"items[{i}]: {len(prompt)} prompt + {len(cont)} continuation tokens exceed the context limit "
                f"max_context={self.limits.max_context}"
            )
        return prompt, cont

    def GetModelInfo(self, request, context):
        c = self.config
        lim = self.limits
        return pb.ModelInfo(
            model=pb.ModelConfig(
                name=c.name,
                vocab_size=c.vocab_size,
                d_model=c.d_model,
                d_ff=c.d_ff,
                n_layers=c.n_layers,
                n_heads=c.n_heads,
                n_kv_heads=c.n_kv_heads,
                d_head=c.d_head,
                max_seq_len=c.max_seq_len,
                json=json.dumps(c.to_dict(), sort_keys=True),
            ),
            source=self.model.source,
            weights=self.model.weights,
            mesh=pb.Mesh(
                axis_names=list(self.plan.mesh_axes),
                axis_sizes=list(self.plan.mesh_axes.values()),
                device_kind=self.mesh_info.get("device_kind", jax.devices()[0].device_kind),
                device_count=self.mesh_info.get("device_count", 1),
            ),
            objective=self.plan.objective,
            plan=[
                pb.PhasePlan(
                    phase=s.phase,
                    batch=s.batch,
                    length=s.length,
                    ffn_layout=s.ffn_layout,
                    attention_layout=s.attention_layout,
                    predicted_ms=s.predicted_ms,
                )
                for s in self.plan.steps
            ],
            limits=pb.Limits(
                max_context=lim.max_context,
                max_batch=lim.max_batch,
                max_new_tokens=lim.max_new_tokens,
                max_queue=lim.max_queue,
                max_stop_strings=lim.max_stop_strings,
                max_stop_length=lim.max_stop_length,
                max_score_items=lim.max_score_items,
                max_text_chars=lim.text_chars,
                max_score_tokens=lim.max_score_tokens,
                max_top_logprobs=TOP_LOGPROBS_MAX,
            ),
            plan_json=self.plan.to_json(),
        )
