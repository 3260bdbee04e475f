"""The gRPC servicer: translates meshserve.v1 protos to engine requests and back. Proto types stop here.

Validation (serving/validation.py) happens before anything is queued: every bad field answers INVALID_ARGUMENT
with a message naming the field and its limit, so no input reaches the engine thread unchecked. A full queue answers RESOURCE_EXHAUSTED, a
draining server UNAVAILABLE. A client that goes away (or a deadline that passes) cancels its request; the engine
frees the slot at its next step.

GenerateRequest.n > 1 asks for n samples: n engine requests (sample i with seed + i, as batch-generate's "n"),
queued together, all or none, and cancelled together; the RPC is counted once in meshserve_requests_total. Unary
answers carry them in `choices` with only usage and timing flat; streams tag each chunk with its sample's index. With
n = 1 every reply is what it was before n existed (choices empty, index 0 and so never on the wire).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import grpc
from meshserve.errors import UserError
from meshserve.model.config import ModelConfig
from meshserve.protos import inference_pb2 as pb
from meshserve.protos import inference_pb2_grpc as pb_grpc
from meshserve.serving.detok import alternatives_with_text
from meshserve.serving.guided_requests import REGEX_FIELD, submit_error
from meshserve.serving.model_info import model_info
from meshserve.serving.openai_tools import call_stream, parse_calls
from meshserve.serving.openai_tools import finish_reason as finish_reason_of
from meshserve.serving.orchestrator import (
    GRACE_ENDED,
    Event,
    Orchestrator,
    RequestHandle,
    ScoreCancelledError,
    ShuttingDownError,
)
from meshserve.serving.plan import EnginePlan
from meshserve.serving.reasoning import ChatOptions
from meshserve.serving.requests import ClientGone, sample_events
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


@dataclass(eq=False)
class _Call:
    """One Generate / GenerateStream RPC: its n samples' handles (index order), the queue their events arrive on as
    (sample index, event), and whether its outcome was counted in the metrics (once per RPC, whatever n)."""

    handles: list[RequestHandle]
    events: queue.SimpleQueue
    counted: bool = False

    @property
    def first(self):
        """Sample 0's request: the prompt, deadline and arrival are the same for every sample."""
        return self.handles[0].request


# The client's deadline timer and the server's time the same timeout from about the same moment (the server's starts
# when the call arrives, one-way latency after the client's; the client's cancel takes that latency too), so a
# client's cancel at its deadline reaches the server a hair before the server's own deadline passes. A call ended
# within this margin of its deadline is counted as its deadline passing (seen: every such call counted CANCELLED).
DEADLINE_MARGIN_S = 0.05


def _past_deadline(deadline: float | None) -> bool:
    """Whether a request's deadline (time.monotonic(); None: none) has passed, up to DEADLINE_MARGIN_S."""
    return deadline is not None and time.monotonic() >= deadline - DEADLINE_MARGIN_S


def _tool_fields(calls: list, reason: str | None) -> dict:
    """A sample's tool calls as ToolCall protos, and its finish reason (the engine's `reason`): TOOL_CALLS when it
    called a tool and stopped by itself (as OpenAI's and vLLM's "tool_calls")."""
    finish = finish_reason_of(reason, calls)
    return {
        "tool_calls": [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls],
        "finish_reason": pb.FINISH_REASON_TOOL_CALLS
        if finish == "tool_calls"
        else FINISH_REASON.get(finish, pb.FINISH_REASON_CANCELLED),
    }


def _pick(f, values):
    """f (min or max) over the values that are set; None when none is."""
    values = [v for v in values if v is not None]
    return f(values) if values else None


class InferenceServicer(pb_grpc.InferenceServicer):
    """meshserve.v1.Inference over an orchestrator. `model` gives the tokenizer, config and stop ids."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        model,
        plan: EnginePlan,
        limits: Limits,
        mesh_info: dict,
        tool_parser: str | None = None,
        chat: ChatOptions | None = None,
    ):
        """tool_parser: serve --tool-call-parser (serving/openai_tools.py PARSERS): a chat with tools gets the calls
        parsed out of its text (GenerateResponse.tool_calls); None: its text comes back as generated. chat: the
        reasoning parser (GenerateResponse.reasoning) and default template variables (serving/reasoning.py)."""
        self.tool_parser = tool_parser
        self.chat = chat or ChatOptions()
        self.orch = orchestrator
        self.model = model
        self.config: ModelConfig = model.config
        self.plan = plan
        self.limits = limits
        self.parse = RequestParser(model, limits, tool_parser=tool_parser, chat=self.chat)
        self.mesh_info = mesh_info
        self.metrics = orchestrator.metrics
        self._count_lock = threading.Lock()  # the handler and the RPC-end callback race to count an outcome

    def _parses_tools(self, request) -> bool:
        """Whether this request's text is parsed for tool calls: a chat with tools, on a server with a parser."""
        return (
            self.tool_parser is not None
            and request.WhichOneof("input") == "messages"
            and bool(request.messages.tools_json)
            and request.messages.tool_choice != "none"  # the model was not told about the tools
        )

    def _splitters(self, request, handles) -> list | None:
        """Per sample, its ReasoningSplit: a chat on a server with --reasoning-parser; else None."""
        if self.chat.reasoning_parser is None or request.WhichOneof("input") != "messages":
            return None
        return [self.chat.splitter(h.request) for h in handles]

    # ----- RPCs -----

    def _start(self, request, context, method: str) -> _Call:
        try:
            requests, stop = self.parse.samples(request, context.time_remaining() if context is not None else None)
            handles, events = self.orch.submit_many(requests, stop)  # all n queued, or none
        except QueueFullError as e:
            self._abort(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ShuttingDownError as e:
            self._abort(context, method, grpc.StatusCode.UNAVAILABLE, str(e))
        except UserError as e:  # also a regex format past its bounds, found while its masks were prepared
            self._abort(context, method, grpc.StatusCode.INVALID_ARGUMENT, submit_error(str(e), REGEX_FIELD)[0])

        call = _Call(handles, events)

        def ended() -> None:
            # Runs when the RPC ends, however it ends: every sample still running is cancelled (their slots are
            # freed at the engine's next step). A client that cancels a stream ends it without the handler seeing a
            # last event (gRPC just stops pulling chunks), so the outcome is counted here too.
            self._cancel(call)
            self._count(call, method, "DEADLINE_EXCEEDED" if _past_deadline(call.first.deadline) else "CANCELLED")

        if not context.add_callback(ended):
            ended()  # the RPC already ended (client gone in between): the callback will never run
        return call

    def _cancel(self, call: _Call) -> None:
        for handle in call.handles:  # a finished one is a no-op
            self.orch.cancel(handle)

    def _count(self, call: _Call, method: str, code: str) -> None:
        """Count one RPC's outcome in meshserve_requests_total, once (the first caller wins)."""
        with self._count_lock:
            if call.counted:
                return
            call.counted = True
        self.metrics.count_request(method, code, call.handles)

    def _abort(self, context, method: str, code: grpc.StatusCode, message: str):
        self.metrics.count_request(method, code.name)
        context.abort(code, message)

    def _events(self, call: _Call, context, method: str):
        """(sample index, event) of every sample until each has had its last (requests.sample_events); stops early
        when the client is gone (cancelling every sample). A failed sample fails the RPC, which cancels the others."""
        try:
            yield from sample_events(call.events, len(call.handles), lambda: not context.is_active())
        except ClientGone:
            self._cancel(call)
        except UserError as e:  # this request's prefill batch was refused (the engine goes on)
            self._count(call, method, "INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except GeneratorExit:
            raise
        except BaseException as e:  # the engine thread failed (what it put on the queue)
            self._count(call, method, "INTERNAL")
            context.abort(grpc.StatusCode.INTERNAL, f"engine failed: {type(e).__name__}")

    def _usage_timing(self, call: _Call) -> tuple[pb.Usage, pb.Timing]:
        """Usage and timing of the whole request: the prompt once, generated and cached tokens summed over the
        samples; queue until the last sample's prefill started, first token of any sample, last token of all."""
        rs = [h.request for h in call.handles]
        arrival = call.first.arrival  # the same for every sample (submit_many)
        ms = lambda t: 0.0 if t is None else (t - arrival) * 1e3  # noqa: E731
        usage = pb.Usage(
            prompt_tokens=len(call.first.prompt),
            generated_tokens=sum(len(r.tokens) for r in rs),
            cached_prompt_tokens=sum(r.cached_tokens for r in rs),
        )
        timing = pb.Timing(
            queue_ms=ms(_pick(max, [r.prefill_start for r in rs])),
            time_to_first_token_ms=ms(_pick(min, [r.first_token_time for r in rs])),
            total_ms=ms(_pick(max, [r.finish_time for r in rs])),
        )
        return usage, timing

    def _done(self, context, method: str, call: _Call, reasons: list[str | None]) -> None:
        """Count the RPC's outcome once every sample ended (reasons: each sample's; None = never finished), or
        answer DEADLINE_EXCEEDED / UNAVAILABLE when the samples were cancelled by a deadline or the drain."""
        if "cancelled" in reasons and _past_deadline(call.first.deadline):
            self._count(call, method, "DEADLINE_EXCEEDED")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        if "cancelled" in reasons and self.orch.grace_passed and context.is_active():
            self._count(call, method, "UNAVAILABLE")
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                GRACE_ENDED,
            )
        self._count(call, method, "CANCELLED" if None in reasons or "cancelled" in reasons else "OK")

    def _top(self, alternatives) -> list[pb.TopLogprobs]:
        """Scheduler alternatives (ids, log-probs) per token -> TopLogprobs messages, each token decoded alone."""
        rows = alternatives_with_text(self.model.tokenizer, alternatives)
        return [
            pb.TopLogprobs(tokens=[a[0] for a in r], texts=[a[1] for a in r], logprobs=[a[2] for a in r]) for r in rows
        ]

    def Generate(self, request, context):
        call = self._start(request, context, "Generate")
        n = len(call.handles)
        tokens, logprobs, top = ([[] for _ in range(n)] for _ in range(3))
        reasons: list[str | None] = [None] * n
        event: Event
        for i, event in self._events(call, context, "Generate"):
            tokens[i].extend(event.tokens)
            logprobs[i].extend(event.logprobs)
            top[i].extend(event.top_logprobs)
            reasons[i] = event.finish_reason
        samples = [
            dict(
                tokens=tokens[i],
                text=h.text,
                logprobs=logprobs[i] if request.return_logprobs else [],
                finish_reason=FINISH_REASON.get(reasons[i], pb.FINISH_REASON_CANCELLED),
                top_logprobs=self._top(top[i]),
            )
            for i, h in enumerate(call.handles)
        ]
        if (splitters := self._splitters(request, call.handles)) is not None:
            for sample, split in zip(samples, splitters, strict=True):
                sample["reasoning"], sample["text"] = split.feed(sample["text"], last=True)
        if self._parses_tools(request):  # in the answer after any reasoning
            for sample, reason in zip(samples, reasons, strict=True):
                content, calls = parse_calls(sample["text"], self.tool_parser)
                sample.update(text=content or "", **_tool_fields(calls, reason))
        usage, timing = self._usage_timing(call)
        if n == 1:  # the flat reply, as before n existed
            reply = pb.GenerateResponse(**samples[0], usage=usage, timing=timing)
        else:
            reply = pb.GenerateResponse(
                usage=usage, timing=timing, choices=[pb.Choice(index=i, **s) for i, s in enumerate(samples)]
            )
        if None not in reasons and "cancelled" not in reasons:
            self._check_reply_size(context, reply, n)
        self._done(context, "Generate", call, reasons)
        return reply

    def _check_reply_size(self, context, reply: pb.GenerateResponse, n: int) -> None:
        """RESOURCE_EXHAUSTED naming what to lower when the reply exceeds gRPC's message limit (n samples of many
        tokens with top_logprobs can), instead of gRPC failing the send with a message that names nothing."""
        from meshserve.serving.server import MAX_MESSAGE_BYTES  # here: server.py imports this module

        size = reply.ByteSize()
        if size > MAX_MESSAGE_BYTES:
            self._abort(
                context,
                "Generate",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the reply ({size} bytes) exceeds the message limit of {MAX_MESSAGE_BYTES} bytes: lower n ({n}), "
                "max_new_tokens or top_logprobs, or use GenerateStream",
            )

    def GenerateStream(self, request, context):
        call = self._start(request, context, "GenerateStream")
        reasons: list[str | None] = [None] * len(call.handles)
        # With tools: each sample's text goes through the parser's holder (hermes: text from a <tool_call> on is held
        # back; llama3_json: an output that starts like a call is held to its end).
        held = [call_stream(self.tool_parser) for _ in call.handles] if self._parses_tools(request) else None
        splitters = self._splitters(request, call.handles)  # with --reasoning-parser: reasoning, then the answer
        for i, event in self._events(call, context, "GenerateStream"):
            reason = reasons[i] = event.finish_reason
            text, reasoning = event.text, ""
            if splitters is not None:
                reasoning, text = splitters[i].feed(text, last=reason is not None)
            chunk = pb.GenerateChunk(
                tokens=event.tokens,
                text=text if held is None else held[i].feed(text),
                reasoning=reasoning,
                logprobs=event.logprobs if request.return_logprobs else [],
                top_logprobs=self._top(event.top_logprobs),
                index=i,  # 0 with n = 1: proto3 leaves it off the wire
            )
            if reason is not None:
                chunk.finish_reason = FINISH_REASON[reason]
                if held is not None:
                    rest, calls = held[i].finish()
                    chunk.text += rest
                    fields = _tool_fields(calls, reason)
                    chunk.tool_calls.extend(fields["tool_calls"])
                    chunk.finish_reason = fields["finish_reason"]
                if None not in reasons:  # the last sample to finish: the stream's last chunk
                    self._done(context, "GenerateStream", call, reasons)
                    usage, timing = self._usage_timing(call)
                    chunk.usage.CopyFrom(usage)
                    chunk.timing.CopyFrom(timing)
            if chunk.tokens or chunk.text or chunk.reasoning or reason is not None:
                yield chunk
        if None in reasons:
            self._count(call, "GenerateStream", "CANCELLED")

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
            # The RPC ended before the job did. When its deadline had passed (on a loaded server it can pass before
            # the wait starts, and gRPC then ends the RPC, which cancels the job), that is the deadline, not the
            # client going away.
            left = context.time_remaining()
            if left is not None and left <= DEADLINE_MARGIN_S:
                self._abort(context, "Score", grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            self._abort(context, "Score", grpc.StatusCode.CANCELLED, str(e))
        except Exception as e:  # the engine thread died (orchestrator.error): answer instead of hanging
            self._abort(context, "Score", grpc.StatusCode.INTERNAL, f"engine failed: {type(e).__name__}")
        self.metrics.count_request("Score", "OK", items=len(pairs), tokens=total)
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
        return model_info(self.model, self.plan, self.limits, self.mesh_info)
