"""The request log of `serve --log-requests`: one logfmt line per finished request, gRPC RPC or HTTP request.

    meshserve request: method=Generate code=OK samples=1 prompt_tokens=12 cached_tokens=0 generated_tokens=64
    finish=length queue_ms=0.4 ttft_ms=31.2 total_ms=402.8 id=17

Written where the request is counted in meshserve_requests_total (serving/metrics.py `count_request`), so the log
and the counter agree. Counts and times only: no prompt or generated text, no token ids, no error messages (they
can quote the request), so the log can be kept where the traffic itself may not be. Times are from the request's
arrival (time.monotonic) to its prefill start (queue), its first token (ttft) and the line (total).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["request_line"]


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1f}"
    text = str(v)
    return f'"{text}"' if (" " in text or not text) else text


def request_line(method: str, code: str, handles: Sequence[Any] = (), now: float | None = None, **extra: Any) -> str:
    """The log line of one request: its method ("Generate", "POST /v1/completions"), status code name, and from
    its samples' handles (each with `.request`: serving/requests.Request) the token counts, finish reasons and
    times; extra fields (Score's items and tokens) after them."""
    fields: dict[str, Any] = {"method": method, "code": code}
    requests = [h.request for h in handles]
    if requests:
        first = requests[0]
        now = time.monotonic() if now is None else now
        since = lambda t: (t - first.arrival) * 1e3  # noqa: E731
        starts = [r.prefill_start for r in requests if r.prefill_start is not None]
        firsts = [r.first_token_time for r in requests if r.first_token_time is not None]
        fields |= {
            "samples": len(requests),
            "prompt_tokens": len(first.prompt),
            "cached_tokens": sum(r.cached_tokens for r in requests),
            "generated_tokens": sum(len(r.tokens) for r in requests),
            "finish": ",".join(r.finish_reason or "none" for r in requests),
        }
        if starts:
            fields["queue_ms"] = since(max(starts))
        if firsts:
            fields["ttft_ms"] = since(min(firsts))
        fields["total_ms"] = since(now)
        fields["id"] = first.id
    fields |= extra
    return "meshserve request: " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
