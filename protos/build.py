"""Regenerate the Python code of every protos/*.proto: `python -m protos.build` from the repo root.

For each `protos/NAME.proto` it writes `protos/NAME_pb2.py`, `NAME_pb2_grpc.py` and `NAME_pb2.pyi`
with grpc_tools.protoc, include root `.` (so generated imports read `from protos import X_pb2`).
tests/test_protos.py regenerates into a temporary directory and compares bytes, so committed
code is never stale. The output depends on the grpcio-tools version: regenerate after upgrading it.

Version guards. Both generated files refuse to import on a runtime older than the generator:
`*_pb2.py` calls `runtime_version.ValidateProtobufRuntimeVersion(<protoc version>)` and
`*_pb2_grpc.py` raises unless `grpcio >= GRPC_GENERATED_VERSION`. A GPU machine often carries an
older protobuf/grpcio (from its CUDA image) than the machine that generated the code, and would
then fail at import although the code works there. Pinning an old grpcio-tools instead would
force an old protobuf on every developer (grpcio-tools pins its protobuf major). So this script
lowers both guards to the floors pyproject.toml declares (`protobuf>=X`, `grpcio>=Y`): the guard
then states the real requirement of this project, and a runtime below the floor still fails
loudly. The generated constructs (builder, `_registered_method`, registered method handlers)
exist in every runtime at or above those floors; keep the floors there when raising them. The
rewrite is exact: if a future protoc changes the guard's shape, the build fails instead of
silently shipping a strict guard. Checked: the generated code imports and serves on
protobuf 5.28.0 + grpcio 1.66.0 and on today's 7.x + 1.85; protobuf 6.x imports it with a
UserWarning ("gencode exactly one major version older"), harmless.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import tomllib
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "protos"
PACKAGE = "kvmesh"  # the import package the checkout's folders form
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")

_PB2_GUARD = re.compile(r"(Domain\.PUBLIC,\n\s*)\d+,(\n\s*)\d+,(\n\s*)\d+,")
_GRPC_GUARD = re.compile(r"GRPC_GENERATED_VERSION = '[^']*'")
_GUARD_NOTE = "# kvmesh: version guard lowered to pyproject.toml's floor by protos/build.py\n"


def proto_files(root: Path = REPO_ROOT) -> list[Path]:
    """The .proto files to compile, relative to `root`, sorted."""
    return sorted(p.relative_to(root) for p in (root / PROTO_DIR).glob("*.proto"))


def generated_names(proto: Path) -> list[Path]:
    """The files generated for one .proto (paths relative to the output root)."""
    return [proto.with_name(proto.stem + suffix) for suffix in SUFFIXES]


def dependency_floor(package: str, root: Path = REPO_ROOT) -> tuple[int, int, int]:
    """(major, minor, patch) of `package>=X.Y[.Z][,<CAP]` in pyproject.toml's dependencies."""
    with open(root / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    floor = rf"{re.escape(package)}\s*>=\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\s*,\s*<\s*[\w.]+)?"
    for dep in deps:
        match = re.fullmatch(floor, dep)
        if match:
            major, minor, patch = match.groups()
            return int(major), int(minor), int(patch or 0)
    raise ValueError(f"pyproject.toml declares no '{package}>=X.Y[,<CAP]' dependency")


def _substitute_once(pattern: re.Pattern[str], repl: str, text: str, path: Path) -> str:
    new_text, count = pattern.subn(repl, text)
    if count != 1:
        raise RuntimeError(f"{path}: expected one version guard to rewrite, found {count}")
    return new_text


def lower_guards(out_root: Path, proto: Path, root: Path = REPO_ROOT) -> None:
    """Rewrite the version guards of one proto's generated files to pyproject's floors."""
    pb_major, pb_minor, pb_patch = dependency_floor("protobuf", root)
    pb2 = out_root / proto.with_name(proto.stem + "_pb2.py")
    text = pb2.read_text()
    text = _substitute_once(
        _PB2_GUARD, rf"\g<1>{pb_major},\g<2>{pb_minor},\g<3>{pb_patch},", text, pb2
    )
    guard_call = "_runtime_version.Validate"
    pb2.write_text(text.replace(guard_call, _GUARD_NOTE + guard_call))

    grpc_py = out_root / proto.with_name(proto.stem + "_pb2_grpc.py")
    grpc_floor = ".".join(map(str, dependency_floor("grpcio", root)))
    text = _substitute_once(
        _GRPC_GUARD,
        f"{_GUARD_NOTE}GRPC_GENERATED_VERSION = '{grpc_floor}'",
        grpc_py.read_text(),
        grpc_py,
    )
    grpc_py.write_text(text)


def generate(out_root: Path, root: Path = REPO_ROOT) -> list[Path]:
    """Compile every protos/*.proto under `root` into `out_root`; returns the written files."""
    include = str(resources.files("grpc_tools") / "_proto")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        stage, staged_out = Path(tmp) / "in", Path(tmp) / "out"
        for proto in proto_files(root):
            (stage / PACKAGE / proto.parent).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / proto, stage / PACKAGE / proto)
            staged_out.mkdir(exist_ok=True)
            args = [
                "grpc_tools.protoc",
                f"-I{stage}",
                f"-I{include}",
                f"--python_out={staged_out}",
                f"--grpc_python_out={staged_out}",
                f"--pyi_out={staged_out}",
                str(stage / PACKAGE / proto),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            (out_root / proto.parent).mkdir(parents=True, exist_ok=True)
            for name in generated_names(proto):
                shutil.move(staged_out / PACKAGE / name, out_root / name)
            lower_guards(out_root, proto, root)
            written += [out_root / name for name in generated_names(proto)]
    return written


def main() -> None:
    for path in generate(REPO_ROOT):
        print(path.relative_to(REPO_ROOT))


if __name__ == "__main__":
    main()
