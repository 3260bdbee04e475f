"""The gRPC servicer: translates meshserve.v1 protos to engine requests and back. Proto types stop here.

Validation (serving/validation.py) happens before anything is queued: every bad field answers INVALID_ARGUMENT
with a message naming the field and its limit, so no input reaches the engine thread unchecked. A full queue answers RESOURCE_EXHAUSTED, a
draining server UNAVAILABLE. A client that goes away (or a deadline that passes) cancels its request; the engine
frees the slot at its next step.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import jax
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.model.sampling import TOP_LOGPROBS_MAX
from meshserve.protos import inference_pb2 as pb
from meshserve.protos import inference_pb2_grpc as pb_grpc
from meshserve.serving.detok import alternatives_with_text
from meshserve.serving.orchestrator import (
    Event,
    Orchestrator,
    RequestHandle,
    ScoreCancelledError,
    ShuttingDownError,
)
from meshserve.serving.plan import EnginePlan
from meshserve.serving.scheduler import QueueFullError
from meshserve.serving.validation import (
    DEFAULT_MAX_SCORE_TOKENS,
    Limits,
    RequestError,
    RequestParser,
    score_reply_bytes,
)

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


class InferenceServicer(pb_grpc.InferenceServicer):
    """meshserve.v1.Inference over an orchestrator. `model` gives the tokenizer, config and stop ids."""

    def __init__(self, orchestrator: Orchestrator, model, plan: EnginePlan, limits: Limits, mesh_info: dict):
        self.orch = orchestrator
        self.model = model
        self.config: ModelConfig = model.config
        self.plan = plan
        self.limits = limits
        self.parse = RequestParser(model, limits)
        self.mesh_info = mesh_info
        self.metrics = orchestrator.metrics
        self._count_lock = threading.Lock()  # the handler and the RPC-end callback race to count an outcome

    # ----- RPCs -----

    def _start(self, request, context, method: str) -> RequestHandle:
        try:
            r, stop = self.parse.generate(request, context.time_remaining() if context is not None else None)
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
        usage = pb.Usage(
            prompt_tokens=len(r.prompt), generated_tokens=len(r.tokens), cached_prompt_tokens=r.cached_tokens
        )
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
        rows = alternatives_with_text(self.model.tokenizer, alternatives)
        return [
            pb.TopLogprobs(tokens=[a[0] for a in r], texts=[a[1] for a in r], logprobs=[a[2] for a in r]) for r in rows
        ]

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
            pairs = [self.parse.score_item(i, item) for i, item in enumerate(request.items)]
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
