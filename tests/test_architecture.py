"""The layering the code relies on: the pure modules (math on numpy/torch) load no Ray and no I/O stack."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

PURE = ("f2m_ray.core.networks", "f2m_ray.core.losses", "f2m_ray.core.augment", "f2m_ray.core.step", "f2m_ray.core.mixing",
        "f2m_ray.core.metrics", "f2m_ray.labels", "f2m_ray.config")
HEAVY = ("ray", "fsspec", "s3fs", "pyarrow")
PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "f2m_ray"


def test_pure_modules_import_no_ray_and_no_io_stack():
    code = (f"import sys, json; import {', '.join(PURE)}; "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_pure_modules_do_not_import_the_rest_of_the_package():
    """Arrows point down: a pure module imports only other pure modules (and errors) of the package."""
    allowed = {m.rsplit(".", 1)[1] for m in PURE} | {"errors"}
    for name in PURE:
        tree = ast.parse((PACKAGE / f"{name.rsplit('.', 1)[1]}.py").read_text())
        used = {n.module.split(".")[1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("f2m_ray.")}
        assert used <= allowed, (name, used - allowed)
