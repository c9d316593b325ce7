"""The package's layering: what each folder may import, no circles, and Ray only where it belongs."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "f2m_ray"
HEAVY = ("ray", "fsspec", "s3fs", "pyarrow")
RAY_ALLOWED = ("runtime", "data", "encode", "train", "synth", "evaluation")
# Rank of each room: a module imports only modules of its own rank or below (docs/design.md "The package").
RANK = {
    "errors": 0, "labels": 1, "config": 2, "core": 3,
    "storage": 4, "schema": 5, "croissant": 5, "dataset_card": 5, "pretrained": 6, "checkpoint": 6, "bank": 6,
    "model_choice": 6, "judge_model": 6, "synthetic_files": 6, "runtime": 7, "data": 8, "encode": 9,
    "export": 10, "evaluation": 10, "synth": 10, "train": 10, "synthetic": 11,
}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("f2m_ray", *parts)).removesuffix(".__init__")
        found[name] = path
    return found


def room(module: str) -> str:
    return module.split(".")[1] if module != "f2m_ray" else "f2m_ray"


def imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """(package modules it imports, top-level third-party names), module level and inside functions."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "f2m_ray":
                ours |= {f"f2m_ray.{a.name}" for a in node.names if a.name != "__version__"}
            elif node.module.startswith("f2m_ray."):
                ours.add(node.module)
                ours |= {f"{node.module}.{a.name}" for a in node.names}  # `from f2m_ray.core import images`
            else:
                others.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("f2m_ray.") else others).add(
                    alias.name if alias.name.startswith("f2m_ray.") else alias.name.split(".")[0])
    return ours, others


def test_core_imports_no_ray_and_no_io_stack():
    core = [m for m in modules() if m.startswith("f2m_ray.core.")]
    assert len(core) == 10, core
    code = (f"import sys, json; import {', '.join(core)}; "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_importing_the_package_never_imports_ray():
    """Ray is imported inside the functions that run Ray work, so a reader or a config never pays for it."""
    names = sorted(m for m in modules() if m != "f2m_ray")
    code = f"import sys, importlib; [importlib.import_module(m) for m in {names!r}]; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_ray_rooms_import_ray():
    offenders = sorted(m for m, p in modules().items() if "ray" in imports(p)[1] and room(m) not in RAY_ALLOWED)
    assert offenders == []


def test_every_import_points_down_or_sideways():
    known = modules()
    upward = []
    for module, path in known.items():
        if module == "f2m_ray":
            continue
        for target in imports(path)[0]:
            if target in known and target != "f2m_ray" and RANK[room(target)] > RANK[room(module)]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_workflows_are_siblings():
    """train, synth and evaluation import none of each other: what two of them share lives below them."""
    workflows = ("train", "synth", "evaluation")
    crossing = sorted(f"{module} -> {target}" for module, path in modules().items() if room(module) in workflows
                      for target in imports(path)[0]
                      if target.startswith("f2m_ray.") and room(target) in workflows and room(target) != room(module))
    assert crossing == []


def test_the_package_imports_its_own_modules_at_the_top():
    """No f2m_ray module imports another inside a function: the import graph is what the tops of the
    files say (only the command line, `cli/`, imports lazily, to start fast)."""
    inside = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("f2m_ray") or \
                            isinstance(sub, ast.Import) and any(a.name.startswith("f2m_ray") for a in sub.names):
                        inside.append(f"{module}.{node.name} (line {sub.lineno})")
    assert inside == []


def test_the_import_graph_has_no_circle():
    known = modules()
    graph = {m: sorted(t for t in imports(p)[0] if t in known and t != "f2m_ray" and t != m)
             for m, p in known.items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_every_room_is_ranked_and_documented():
    rooms = {room(m) for m in modules() if m != "f2m_ray"}
    assert rooms == set(RANK)
    readme = (PACKAGE.parent / "docs" / "design.md").read_text()
    package_map = readme.split("## The package", 1)[1].split("\n## ", 1)[0]
    for name in ("core/", "data/", "runtime/", "train/", "synth/", "evaluation/"):
        assert f"`{name}`" in package_map, name
