"""The house's arrows point down: the CLI on top, then export/ and tools/, then the runtime, then devices and
kernels. Read from the source (every import, at the top of a module or inside a function), so an arrow
hidden in a function body counts as much as one at the top.

Imports under ``if TYPE_CHECKING:`` (annotations only) are not arrows. Rooms, top to bottom::

    vla_edge.edge.cli                       the command line: may import anything
    vla_edge.edge.serve                     the policy server (Ray Serve): the runtime never imports it
    vla_edge.tools, vla_edge.export         scripts; the exporter (reads the runtime to verify a bundle)
    vla_edge.edge (the runtime), .sim, .episodes
    vla_edge.edge.bundle                    the bundle format both export and the runtime reach
    vla_edge.firmware_bridge, vla_edge.kernels
"""

from __future__ import annotations

import ast
from pathlib import Path

import vla_edge

ROOT = Path(vla_edge.__file__).parent


def _source_root(package: str) -> Path:
    import importlib

    return Path(importlib.import_module(package).__path__[0])


def _modules() -> dict[str, Path]:
    """Every vla_edge module -> its source file (the editable install maps each subpackage to the checkout)."""
    out = {}
    for sub in ("edge", "export", "firmware_bridge", "kernels", "tools"):
        base = _source_root(f"vla_edge.{sub}")
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join(["vla_edge", sub, *parts])] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The vla_edge modules ``name`` imports (a name imported from a package counts as its submodule if one
    exists, else as the package)."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) in
                   ("TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: no arrow at run time
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vla_edge.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("vla_edge"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[1] == "edge" and len(parts) > 2 and parts[2] in ("cli", "sim", "episodes", "bundle", "serve"):
        return f"edge.{parts[2]}"
    return "runtime" if parts[1] == "edge" else parts[1]


def test_every_module_is_seen():
    assert len(MODULES) > 50 and "vla_edge.edge.loop" in MODULES and "vla_edge.edge.cli" in MODULES
    assert "vla_edge.export.pipeline" in GRAPH["vla_edge.edge.cli.bench"] or any(
        m.startswith("vla_edge.export") for m in GRAPH["vla_edge.edge.cli.bench"])


def test_only_the_cli_imports_export_tools_or_the_cli():
    bad = []
    for name, deps in GRAPH.items():
        room = _room(name)
        for dep in deps:
            if room in ("runtime", "edge.sim", "edge.episodes", "edge.bundle", "edge.serve", "firmware_bridge",
                        "kernels") and \
                    _room(dep) in ("export", "tools", "edge.cli"):
                bad.append(f"{name} -> {dep}")
            if room in ("export", "tools") and _room(dep) == "edge.cli":
                bad.append(f"{name} -> {dep}")
    assert not bad, "arrows pointing up:\n" + "\n".join(sorted(bad))


def test_lower_rooms_import_nothing_above_them():
    allowed = {
        "kernels": {"kernels"},
        "firmware_bridge": {"firmware_bridge"},
        "edge.bundle": {"edge.bundle", "kernels", "firmware_bridge"},
        "edge.episodes": {"edge.episodes", "edge.bundle", "kernels", "firmware_bridge", "runtime"},
        "runtime": {"runtime", "edge.bundle", "edge.episodes", "kernels", "firmware_bridge"},
        "edge.serve": {"edge.serve", "runtime", "edge.bundle", "kernels", "firmware_bridge"},
    }
    bad = [f"{name} -> {dep}" for name, deps in GRAPH.items() if _room(name) in allowed
           for dep in deps if _room(dep) not in allowed[_room(name)]]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    """Tarjan's strongly connected components over every import arrow: none with two modules or more."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_an_upward_arrow():
    """The checks above can fail: a made-up graph with a cycle and a runtime -> export arrow trips both."""
    saved = dict(GRAPH)
    try:
        GRAPH["vla_edge.edge.loop"] = GRAPH["vla_edge.edge.loop"] | {"vla_edge.edge.session", "vla_edge.export.demo"}
        import pytest

        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycle()
        with pytest.raises(AssertionError, match="arrows pointing up"):
            test_only_the_cli_imports_export_tools_or_the_cli()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
