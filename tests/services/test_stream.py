"""A stream behind the engine sends what queued up as one message (services/worker/stream.py)."""

from __future__ import annotations

from kvmesh.services.worker.stream import merged
from kvmesh.shared.engine.engine import RequestOutput
from kvmesh.shared.engine.sequence import FinishReason


def test_merged_outputs_keep_every_token_in_order_and_the_later_ending() -> None:
    a = RequestOutput("r", [5], " a", num_prompt_tokens=3, num_output_tokens=1, queue_seconds=0.2)
    b = RequestOutput("r", [6, 7], "bc", num_prompt_tokens=3, num_output_tokens=3,
                      finish_reason=FinishReason.LENGTH)  # fmt: skip
    out = merged(a, b)
    assert out.new_token_ids == [5, 6, 7] and out.text == " abc"
    assert out.num_output_tokens == 3 and out.finish_reason is FinishReason.LENGTH
    assert a.new_token_ids == [5] and b.new_token_ids == [6, 7]  # the inputs are left alone
