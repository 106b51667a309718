"""Print pyproject.toml's dependency floors as exact pins, for the lowest-versions venv.

    python compose/floors.py               `name==FLOOR[; marker]` for every runtime dependency
    python compose/floors.py --test-tools  the `test` extra, less grpcio-tools

compose/local.sh (KVMESH_DEPS=lowest) installs the project with the first as constraints, so each
dependency resolves to its floor, and the test tools beside it. torch is left out: local.sh pins
it (TORCH_VERSION). grpcio-tools is left out because the generator requires a newer protobuf than
the runtime floor; only tests/protos needs it. Every runtime dependency must declare a floor
(`name>=X[,<CAP]`): a dependency without one makes this script fail, not silently float.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
PINNED_ELSEWHERE = {"torch"}
NOT_AT_FLOORS = {"grpcio-tools"}
_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?")
_FLOOR = re.compile(r">=\s*([0-9][0-9A-Za-z.]*)")


def project() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]


def floor_pins(dependencies: list[str]) -> list[str]:
    """`name==FLOOR` (with the requirement's marker) for each dependency but torch."""
    pins = []
    for dependency in dependencies:
        match = _REQUIREMENT.fullmatch(dependency.strip())
        if match is None:
            raise ValueError(f"unreadable dependency {dependency!r}")
        name, specifier, marker = match.groups()
        if name.lower() in PINNED_ELSEWHERE:
            continue
        floor = _FLOOR.search(specifier)
        if floor is None:
            raise ValueError(f"{name} has no floor (>=) in pyproject.toml: {dependency!r}")
        pins.append(f"{name}=={floor.group(1)}" + (f" {marker}" if marker else ""))
    return pins


def test_tools(extra: list[str]) -> list[str]:
    return [r for r in extra if _REQUIREMENT.fullmatch(r).group(1).lower() not in NOT_AT_FLOORS]


def main(argv: list[str]) -> None:
    spec = project()
    if argv == ["--test-tools"]:
        lines = test_tools(spec["optional-dependencies"]["test"])
    elif not argv:
        lines = floor_pins(spec["dependencies"])
    else:
        sys.exit(__doc__)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
