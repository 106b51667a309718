"""The wheel and the dependency bounds: what `pip install kvmesh` gives a new user.

The wheel's only top-level name is `kvmesh`, it holds every file of the package folders (the
tuned table and the .proto files too) and nothing else; each runtime dependency has a floor and a
cap, and compose/constraints.txt pins versions inside them. The `fresh_venv` test installs the
wheel into a new venv with the newest releases the bounds allow, beside Hugging Face's `kernels`,
and serves a request from it: the next upstream release that breaks kvmesh fails here. It needs
PyPI and takes minutes; `-m "not fresh_venv"` leaves it out of a quick local run (CI runs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from meshproc import Proc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("kernels", "protos", "shared", "services")
CONSTRAINTS = ROOT / "compose" / "constraints.txt"
LOCAL_SH = ROOT / "compose" / "local.sh"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
PINNED_BY_LOCAL_SH = {"torch", "triton"}  # with torch's CUDA libraries, never in constraints.txt


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in pyproject()["project"]["dependencies"]]


def constraint_pins() -> dict[str, str]:
    """{canonical name: version} of compose/constraints.txt; every line must be `name==version`."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"not name==version: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def shell_default(path: Path, variable: str) -> str:
    """The default of `VARIABLE=${VARIABLE:-default}` (local.sh) or `ARG VARIABLE=default`."""
    text = path.read_text()
    match = re.search(rf"^{variable}=\$\{{{variable}:-([^}}]+)\}}", text, re.M) or re.search(
        rf"^ARG {variable}=(\S+)", text, re.M
    )
    assert match, f"{path.name} sets no default {variable}"
    return match.group(1)


def package_files() -> set[str]:
    """Every file of the package folders, as its path in the wheel (kvmesh/...)."""
    return {
        f"kvmesh/{p.relative_to(ROOT).as_posix()}"
        for folder in PACKAGE_FOLDERS
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the working tree (what the Dockerfile copies):
    an in-tree build would reuse build/lib, where files deleted from the tree live on."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp / "dist"), str(src)],
        check=True,
    )  # fmt: skip
    (built,) = (tmp / "dist").glob("kvmesh-*.whl")
    return built


# --------------------------------------------------------------------------- bounds


def test_every_runtime_dependency_has_a_floor_and_a_cap() -> None:
    for requirement in runtime_requirements():
        operators = sorted(spec.operator for spec in requirement.specifier)
        assert operators == ["<", ">="], f"{requirement}: want exactly `>=FLOOR,<CAP`"


def test_constraints_pin_every_dependency_inside_its_bounds() -> None:
    pins = constraint_pins()
    assert not PINNED_BY_LOCAL_SH & pins.keys(), "torch/triton are pinned by local.sh, not here"
    assert "kvmesh" not in pins and not any(n.startswith("nvidia-") for n in pins)
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        if name in PINNED_BY_LOCAL_SH:
            continue
        assert name in pins, f"{name} is a dependency but compose/constraints.txt has no pin"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )
    for test_tool in pyproject()["project"]["optional-dependencies"]["test"]:
        assert canonicalize_name(Requirement(test_tool).name) in pins, f"{test_tool} unpinned"


def test_local_sh_and_the_image_pin_the_same_torch_and_triton() -> None:
    bounds = {canonicalize_name(r.name): r.specifier for r in runtime_requirements()}
    for variable, name in (("TORCH_VERSION", "torch"), ("TRITON_VERSION", "triton")):
        version = shell_default(LOCAL_SH, variable)
        assert shell_default(DOCKERFILE, variable) == version
        assert bounds[name].contains(version), f"{name} {version} is outside {bounds[name]}"
    assert "-c compose/constraints.txt" in DOCKERFILE.read_text()
    assert "!compose/constraints.txt" in (ROOT / "compose" / "Dockerfile.dockerignore").read_text()


# --------------------------------------------------------------------------- the wheel


def test_packages_list_names_every_package_folder() -> None:
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    folders = {
        "kvmesh." + ".".join(d.relative_to(ROOT).parts)
        for folder in PACKAGE_FOLDERS
        for d in [ROOT / folder, *(ROOT / folder).rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert listed == folders, "pyproject.toml's [tool.setuptools] packages is stale"


def test_wheel_holds_kvmesh_alone_with_every_file_of_the_tree(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"kvmesh", dist_info}
    shipped = {n for n in names if n.startswith("kvmesh/")}
    assert "kvmesh/kernels/linear_tuned.json" in shipped
    assert {"kvmesh/protos/gateway.proto", "kvmesh/protos/worker.proto"} <= shipped
    tree = package_files()
    assert not tree - shipped, f"missing from the wheel: {sorted(tree - shipped)}"
    assert not shipped - tree, f"in the wheel but not in the tree: {sorted(shipped - tree)}"
    assert re.search(r"^kvmesh = kvmesh\.services\.cli:main$", entry_points, re.M)


def test_installed_wheel_reads_its_tuned_table(wheel: Path, tmp_path: Path) -> None:
    """From the installed wheel alone (no editable link farm: `-S` skips the .pth files), the
    tuned table resolves as a package resource and the linear kernel reads it."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True,
    )  # fmt: skip
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == [
        "bin",
        "kvmesh",
    ]
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    probe = f"""
import json, sys
sys.path[:0] = [{str(target)!r}]
sys.path += {site!r}
from importlib.resources import files
table = files("kvmesh.kernels") / "linear_tuned.json"
from kvmesh.kernels import linear
print(json.dumps([str(table), table.is_file(), str(linear.TUNED_FILE), len(linear.read_tuned())]))
"""
    out = subprocess.run(
        [sys.executable, "-S", "-P", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    resource, is_file, tuned_file, cards = json.loads(out.stdout.splitlines()[-1])
    expected = str(target / "kvmesh" / "kernels" / "linear_tuned.json")
    assert (resource, is_file, tuned_file) == (expected, True, expected)
    assert cards >= 1  # the measured table, not an empty one: no autotuning at start-up


def test_import_kernels_in_this_venv_is_hugging_faces() -> None:
    """Run from the checkout's root without -P (its folders first on sys.path), `kernels` is
    still Hugging Face's (transformers depends on it): the root folders are no packages."""
    out = subprocess.run(
        [sys.executable, "-c", "import kernels, transformers; transformers.AutoTokenizer; "
         "print(kernels.__file__)"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).is_relative_to(sysconfig.get_paths()["purelib"]), out.stdout


# --------------------------------------------------------------------------- newest releases

PROBE = """
import json, sysconfig
site = sysconfig.get_paths()["purelib"]
import kernels  # Hugging Face's, though the checkout (cwd) has a kernels/ folder
assert kernels.__file__ and kernels.__file__.startswith(site), kernels.__file__
import transformers
transformers.AutoTokenizer  # imports transformers' hub_kernels, which imports `kernels`
from kvmesh.kernels import linear
assert linear.read_tuned() and str(linear.TUNED_FILE).startswith(site), linear.TUNED_FILE
print("PROBE OK", kernels.__file__)
"""


def run_logged(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """Run argv; on failure, the assertion shows its output."""
    out = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{argv} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.fresh_venv
@pytest.mark.timeout(1200)
def test_wheel_serves_in_a_fresh_venv_with_the_newest_releases(wheel: Path, tmp_path: Path) -> None:
    from kvmesh.shared.model.fetch import default_model_path

    started = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip"]
    # torch pinned as local.sh pins it (an unpinned torch on Linux pulls GBs of CUDA libraries);
    # everything else: the newest releases pyproject.toml's bounds allow, no constraints
    install = [*pip, "install", "--quiet", "--no-compile"]
    run_logged([*install, f"torch=={shell_default(LOCAL_SH, 'TORCH_VERSION')}"])
    run_logged([*install, str(wheel), "kernels"])
    freeze = run_logged([*pip, "freeze"]).stdout
    print(f"fresh venv installed in {time.monotonic() - started:.0f} s:\n{freeze}")

    # a private cache: the tokenizer is converted by these transformers, not read from another's
    cache = tmp_path / "cache"
    cache.mkdir()
    model = default_model_path()
    (cache / model.name).symlink_to(model)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KVMESH_", "OTEL_", "PYTHON", "TRITON_")) and k != "REDIS_URL"
    }
    env |= {"KVMESH_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "VIRTUAL_ENV": str(venv)}

    # cwd = the checkout's root: its kernels/ folder must not shadow Hugging Face's `kernels`
    probe = subprocess.run(
        [python, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env
    )  # fmt: skip
    assert "PROBE OK" in probe.stdout, f"{probe.stdout}\n{probe.stderr}\n{freeze}"

    kvmesh = str(venv / "bin" / "kvmesh")
    mesh = Proc([kvmesh, "up", "--port", "0", "--prefill", "1", "--decode", "1"], env)
    try:
        line = mesh.wait_for("kvmesh is up: gateway at", timeout=300)
        address = line.split("gateway at ", 1)[1].split()[0]
        reply = subprocess.run(
            [kvmesh, "generate", "--addr", address, "--chat", "Name a color.", "--max-tokens", "8"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
        )  # fmt: skip
        assert reply.returncode == 0 and reply.stdout.strip(), (
            f"generate exited {reply.returncode}:\n{reply.stdout}\n{reply.stderr}\n"
            + "\n".join(mesh.lines[-40:])
        )
    finally:
        stopped = mesh.stop(signal.SIGINT, timeout=60)
    assert stopped == 0, "\n".join(mesh.lines[-40:])
    print(f"fresh venv test took {time.monotonic() - started:.0f} s")
