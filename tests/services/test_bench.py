"""`kvmesh bench` against an in-process engine (CPU, synthetic SmolLM2 shape): what it reports."""

import asyncio

from kvmesh.services.bench import Workload, bench_engine, percentile
from kvmesh.shared.engine.engine import EngineConfig


def test_bench_engine_reports_the_workload_not_the_warmup():
    workload = Workload(requests=5, concurrency=3, prompt_tokens=12, new_tokens=4)
    report = asyncio.run(
        bench_engine(EngineConfig(model="synthetic:smollm2-135m"), workload, progress=False,
                     warmup=Workload(requests=2, concurrency=2, prompt_tokens=12, new_tokens=3))
    )  # fmt: skip
    assert report.errors == 0
    assert len(report.ttft) == len(report.tpot) == len(report.e2e) == 5
    assert report.output_tokens == 5 * 4
    assert all(0 < t <= e for t, e in zip(report.ttft, report.e2e, strict=True))
    assert report.seconds >= max(report.e2e)


def test_percentile_is_an_order_statistic():
    values = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert percentile(values, 0.0) == 0.1
    assert percentile(values, 0.5) == 0.3
    assert percentile(values, 0.99) == 0.5
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN
