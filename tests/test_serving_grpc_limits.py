"""The largest Score reply the serving limits allow fits gRPC's message limit (serving/server.py), without a server;
--max-score-tokens past that is refused. The real server's Score is tested in tests/test_serving_grpc.py."""

import pytest
from meshserve.protos import inference_pb2 as pb


def test_largest_valid_score_reply_fits_the_message_limit():
    from meshserve.serving.server import MAX_MESSAGE_BYTES, check_score_tokens
    from meshserve.serving.servicer import DEFAULT_MAX_SCORE_TOKENS, Limits, score_reply_bytes

    def reply(items, tokens_each, token_id):
        # Worst case per token: a 4-byte float and the largest int32 id (5-byte varint); nonzero log-probs.
        return pb.ScoreResponse(
            results=[
                pb.ScoreResult(logprob=-1.5, token_logprobs=[-0.5] * tokens_each, greedy=True,
                               continuation_tokens=[token_id] * tokens_each)
                for _ in range(items)
            ]
        ).ByteSize()  # fmt: skip

    n = Limits.max_score_items
    at_limit = reply(n, DEFAULT_MAX_SCORE_TOKENS // n, 2**31 - 1)
    assert at_limit <= score_reply_bytes(n, DEFAULT_MAX_SCORE_TOKENS) <= MAX_MESSAGE_BYTES
    assert reply(n, 2048, 2**31 - 1) > MAX_MESSAGE_BYTES  # the review's case: 256 x 2048 tokens need not fit
    check_score_tokens(DEFAULT_MAX_SCORE_TOKENS)
    with pytest.raises(ValueError, match="max_score_tokens must be in"):
        check_score_tokens(256 * 2048)
