"""The dependency rules of ARCHITECTURE.md ("Layout"), checked on the import graph of every
first-party module (parsed, not run; imports inside functions and under TYPE_CHECKING count):

    services -> shared -> kernels       kernels imports nothing of ours; shared no service
    protos                              imported only by services and shared/handoff
    services never import one another   the gateway and each worker service (prefill, decode,
                                        ...) are processes that talk over gRPC: what the worker
                                        services share is in services/worker, gRPC plumbing in
                                        services/rpc; only the command line (cli) imports the
                                        services' entry points, which it starts
    the gateway loads no model          nor kernel, engine or handoff code, also through what it
                                        imports (of the model and the engine: only the default
                                        model's name and fetch, and the tokenizer)
    no import cycles                    and no module imports the face (__init__) of a package
                                        it is inside of
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS, SHARED, SERVICES, PROTOS = (
    f"kvmesh.{p}" for p in ("kernels", "shared", "services", "protos")
)
HANDOFF = f"{SHARED}.handoff"
# the command line's helpers: each imports no service (the launcher starts them as processes)
TOOLS = {"launcher", "client", "status", "bench", "local_generate"}
# what the gateway may load of the model and the engine
GATEWAY_MAY_LOAD = {f"{SHARED}.model.fetch", f"{SHARED}.model.source", f"{SHARED}.engine.tokenizer"}


@cache
def modules() -> dict[str, Path]:
    """Every first-party module by name: the .py files of the packages pyproject.toml lists
    (the checkout's folders are the package kvmesh)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = {}
    for package in config["tool"]["setuptools"]["packages"]:
        folder = ROOT.joinpath(*package.split(".")[1:])
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _resolve(name: str) -> str | None:
    """The first-party module `name` names, or the nearest package above it; None if none."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> frozenset[str]:
    """The first-party modules `module` imports by name (explicit edges)."""
    path = modules()[module]
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    named: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            # `from package import module` names the module; `from module import name` the module
            named += [f"{base}.{alias.name}" for alias in node.names]
    return frozenset(m for m in map(_resolve, named) if m is not None and m != module)


def loads(module: str) -> set[str]:
    """What importing `module` runs: what it imports, and theirs, with the __init__ of every
    package above each (Python runs those first)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = [m.rsplit(".", i)[0] for i in range(1, m.count("."))]
        todo += [p for p in parents if p in modules()] + list(imports(m))
    return seen - {module}


def path_to(start: str, goal: str) -> list[str]:
    """A chain of imports from start to goal (for messages)."""
    previous: dict[str, str] = {}
    todo = [start]
    while todo:
        m = todo.pop(0)
        if m == goal:
            chain = [m]
            while chain[-1] != start:
                chain.append(previous[chain[-1]])
            return chain[::-1]
        parents = [m.rsplit(".", i)[0] for i in range(1, m.count("."))]
        for n in [p for p in parents if p in modules()] + sorted(imports(m)):
            if n not in previous and n != start:
                previous[n] = m
                todo.append(n)
    return [start, "?", goal]


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(sources: Iterable[str], bad: object) -> list[str]:
    """'a -> b' for every import of a module in `sources` that bad(a, b) says breaks the rule."""
    assert callable(bad)
    return [f"{m} -> {t}" for m in sorted(sources) for t in sorted(imports(m)) if bad(m, t)]


def cycles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module
    (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((n for n in edges if n in graph), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def service_unit(module: str) -> str:
    """The part of services a module belongs to: gateway, worker (what the worker services
    share), rpc, cli, a tool of the command line, or a worker service (prefill, decode, ...)."""
    return module.removeprefix(SERVICES + ".").split(".")[0]


# plumbing every part of services may import: gRPC (rpc), TLS (tls), throwaway certificates
# (certs); and what each of them imports
PLUMBING = {"rpc": {"tls"}, "tls": set(), "certs": {"tls"}}


def service_may_import(unit: str) -> set[str] | None:
    """The other parts of services a part may import (None: any)."""
    if unit == "cli":
        return None  # the command line starts every service
    if unit in PLUMBING:
        return PLUMBING[unit]
    if unit in ("gateway", "worker") or unit in TOOLS:
        return set(PLUMBING)
    return {"worker", *PLUMBING}  # a worker service


# ---- the checker itself


def test_the_graph_holds_imports_made_inside_functions() -> None:
    assert f"{SERVICES}.gateway.server" in imports(f"{SERVICES}.cli")  # imported in a function
    assert f"{HANDOFF}.nccl" in imports(f"{HANDOFF}.auto")  # a face: `from package import name`
    assert f"{HANDOFF}.nccl.binding" in imports(
        f"{HANDOFF}.nccl.pair"
    )  # `from package import module`
    assert f"{HANDOFF}.transport" in loads(f"{SERVICES}.prefill")


def test_cycles_finds_a_loop_and_only_the_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# ---- the rules


def test_kernels_import_nothing_of_ours() -> None:
    kernels = [m for m in modules() if under(m, KERNELS)]
    assert kernels
    assert violations(kernels, lambda m, t: not under(t, KERNELS)) == []


def test_shared_imports_no_service() -> None:
    shared = [m for m in modules() if under(m, SHARED)]
    assert violations(shared, lambda m, t: under(t, SERVICES)) == []


def test_only_services_and_the_handoff_import_protos() -> None:
    allowed = (SERVICES, HANDOFF, PROTOS)
    assert (
        violations(
            modules(), lambda m, t: under(t, PROTOS) and not any(under(m, a) for a in allowed)
        )
        == []
    )


def test_services_never_import_one_another() -> None:
    services = [m for m in modules() if under(m, SERVICES)]

    def bad(m: str, t: str) -> bool:
        if not under(t, SERVICES) or service_unit(t) == service_unit(m):
            return False
        allowed = service_may_import(service_unit(m))
        return allowed is not None and service_unit(t) not in allowed

    assert violations(services, bad) == []


def test_the_gateway_loads_no_model_kernel_engine_or_handoff_code() -> None:
    def forbidden(m: str) -> bool:
        if under(m, KERNELS) or under(m, HANDOFF):
            return True
        inside = m.startswith(f"{SHARED}.model.") or m.startswith(f"{SHARED}.engine.")
        return inside and m not in GATEWAY_MAY_LOAD

    gateway = [m for m in modules() if under(m, f"{SERVICES}.gateway")]
    assert gateway
    found = {
        " -> ".join(path_to(g, bad)) for g in gateway for bad in sorted(loads(g)) if forbidden(bad)
    }
    assert sorted(found) == []


def test_no_import_cycles() -> None:
    assert cycles({m: imports(m) for m in modules()}) == []


def test_no_module_imports_the_face_of_its_own_package() -> None:
    """A module inside a package imports its siblings by module, never through the package's
    __init__ (which imports them: loading the face would run into itself)."""
    assert violations(modules(), lambda m, t: m != t and m.startswith(t + ".")) == []
