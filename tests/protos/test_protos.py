"""Generated protobuf code is never stale: regenerate into a temp dir and compare bytes."""

from pathlib import Path

import pytest

from kvmesh.protos import build


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = build.generate(tmp_path)
    assert fresh, "no protos/*.proto found"
    for path in fresh:
        committed = build.REPO_ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run `python -m protos.build`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run `python -m protos.build`"
        )


def test_no_orphaned_generated_files() -> None:
    expected = {name for proto in build.proto_files() for name in build.generated_names(proto)}
    committed = {
        p.relative_to(build.REPO_ROOT)
        for suffix in build.SUFFIXES
        for p in (build.REPO_ROOT / build.PROTO_DIR).glob("*" + suffix)
    }
    assert committed == expected


def test_version_guards_are_the_pyproject_floors(tmp_path: Path) -> None:
    build.generate(tmp_path)
    major, minor, patch = build.dependency_floor("protobuf")
    grpc_floor = ".".join(map(str, build.dependency_floor("grpcio")))
    pb2 = (tmp_path / "protos" / "gateway_pb2.py").read_text()
    grpc_py = (tmp_path / "protos" / "gateway_pb2_grpc.py").read_text()
    assert f"PUBLIC,\n    {major},\n    {minor},\n    {patch}," in pb2
    assert f"GRPC_GENERATED_VERSION = '{grpc_floor}'" in grpc_py


def test_dependency_floor_reads_a_floor_with_or_without_a_cap(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["protobuf>=5.28,<8", "grpcio >= 1.66.2", "grpcio-tools"]\n'
    )
    assert build.dependency_floor("protobuf", tmp_path) == (5, 28, 0)
    assert build.dependency_floor("grpcio", tmp_path) == (1, 66, 2)
    with pytest.raises(ValueError, match="grpcio-tools>=X.Y"):
        build.dependency_floor("grpcio-tools", tmp_path)  # no floor: the guard has no value


def test_public_contract_field_names() -> None:
    from kvmesh.protos import gateway_pb2 as pb

    request = pb.GenerateRequest(
        request_id="r",
        model="",
        prompt="hi",
        max_tokens=4,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=7,
        stop=["\n"],
        ignore_eos=True,
    )
    request.messages.add(role="user", content="hi")
    request.prompt_token_ids.extend([1, 2])
    assert request.HasField("seed") and not pb.GenerateRequest().HasField("seed")
    response = pb.GenerateResponse(
        request_id="r",
        token_ids=[5],
        text="x",
        finish_reason="length",
        usage=pb.Usage(prompt_tokens=2, completion_tokens=1),
    )
    assert pb.GenerateResponse.FromString(response.SerializeToString()) == response
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["Gateway"].methods] == [
        "Generate",
        "ListModels",
    ]
