"""`kvmesh up`'s plan: which workers it starts, on which device, with what share of the card."""

from __future__ import annotations

import pytest

from kvmesh.services.cli import build_parser, pair_pools
from kvmesh.services.launcher import MeshPlan, WorkerSpec


def _plan(prefill: int, decode: int, aggregated: int, devices: list[str]) -> MeshPlan:
    return MeshPlan(prefill, decode, [], ["--model", "m"], devices, aggregated=aggregated,
                    gpu_memory_share=0.9)  # fmt: skip


def test_one_card_splits_its_share_evenly_among_every_process_on_it() -> None:
    workers = _plan(1, 1, 1, ["cuda:0"]).workers()
    assert workers == [
        WorkerSpec("prefill-0", "prefill", "cuda:0", pytest.approx(0.3)),
        WorkerSpec("decode-0", "decode", "cuda:0", pytest.approx(0.3)),
        WorkerSpec("aggregated-0", "aggregated", "cuda:0", pytest.approx(0.3)),
    ]


def test_workers_go_round_robin_and_each_card_is_split_among_its_own() -> None:
    workers = _plan(2, 2, 1, ["cuda:0", "cuda:1"]).workers()
    assert [(w.name, w.device) for w in workers] == [
        ("prefill-0", "cuda:0"), ("prefill-1", "cuda:1"), ("decode-0", "cuda:0"),
        ("decode-1", "cuda:1"), ("aggregated-0", "cuda:0"),
    ]  # fmt: skip
    shares = {w.device: [] for w in workers}
    for w in workers:
        shares[w.device].append(w.gpu_memory_share)
    assert shares["cuda:0"] == [pytest.approx(0.3)] * 3 and shares["cuda:1"] == [0.45] * 2
    assert all(sum(s) <= 0.9 + 1e-9 for s in shares.values())


def test_a_worker_gets_its_device_and_share_on_the_command_line() -> None:
    plan = _plan(1, 1, 0, ["cuda:0"])
    argv = plan.workers()[1].argv(plan)
    assert argv[-9:] == ["decode", "--model", "m", "--device", "cuda:0", "--host", "127.0.0.1",
                         "--gpu-memory-share", "0.450000"][-9:]  # fmt: skip
    args = build_parser().parse_args(argv[argv.index("decode") :])
    assert args.device == "cuda:0" and args.gpu_memory_share == 0.45


@pytest.mark.parametrize(
    "counts, message",
    [((1, 0, 0), "serve in pairs"), ((0, 2, 1), "serve in pairs"), ((0, 0, 0), "needs a")],
)
def test_plans_that_cannot_serve_are_refused(counts: tuple[int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _plan(*counts, ["cpu"])


@pytest.mark.parametrize(
    "flags, pools",
    [
        ([], (1, 1, 0)),
        (["--aggregated", "1"], (0, 0, 1)),
        (["--aggregated", "1", "--prefill", "1", "--decode", "1"], (1, 1, 1)),
        (["--prefill", "2"], (2, 1, 0)),
    ],
)
def test_up_sizes_the_pools_from_its_flags(flags: list[str], pools: tuple[int, int, int]) -> None:
    args = build_parser().parse_args(["up", *flags])
    assert (*pair_pools(args), args.aggregated) == pools
    assert args.gpu_memory_share == 0.9


def test_prefix_caching_is_on_unless_a_worker_is_told_otherwise() -> None:
    from kvmesh.services.cli import engine_config
    from kvmesh.shared.engine.engine import Role

    on = build_parser().parse_args(["decode"])
    off = build_parser().parse_args(["prefill", "--no-prefix-caching"])
    assert engine_config(on, Role.DECODE).prefix_caching
    assert not engine_config(off, Role.PREFILL).prefix_caching
