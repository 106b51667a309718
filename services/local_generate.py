"""`kvmesh generate --local`: run the engine in this process and stream one completion."""

from __future__ import annotations

import sys
import time

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams


def generate_local(config: EngineConfig, prompt: str, chat: bool, params: SamplingParams) -> int:
    engine = Engine(config)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        print("this model has no tokenizer; use a GGUF or Hugging Face model", file=sys.stderr)
        return 2
    ids = (
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        if chat
        else tokenizer.encode(prompt)
    )
    engine.add_request("local", ids, params)
    start = time.perf_counter()
    first: float | None = None
    count = 0
    reason = None
    while engine.has_work:
        for out in engine.step():
            first = first or time.perf_counter()
            count += len(out.new_token_ids)
            sys.stdout.write(out.text)
            sys.stdout.flush()
            reason = out.finish_reason
    end = time.perf_counter()
    ttft = (first or end) - start
    tpot = (end - (first or end)) / max(count - 1, 1)
    print(
        f"\n[{count} tokens, finish={reason.value if reason else '?'}, "
        f"TTFT {ttft * 1e3:.0f} ms, TPOT {tpot * 1e3:.1f} ms]",
        file=sys.stderr,
    )
    return 0
