"""mdx.runtime imports numpy, onnxruntime, pillow, einops and click only (docs/contract.md, layering).

Two checks: every runtime module imports in a fresh interpreter where torch, mdx.train and
mdx.export cannot be imported; and no runtime module imports anything else at module level
(gradio and pynvml are allowed inside functions only).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mdx.runtime

RUNTIME_DIR = Path(mdx.runtime.__file__).resolve().parent
ALLOWED_TOP_LEVEL = {"numpy", "onnxruntime", "PIL", "einops", "click", "mdx"}
ALLOWED_MDX = "mdx.runtime"
LAZY_ONLY = {"gradio", "pynvml"}
BLOCKED = ("torch", "mdx.train", "mdx.export")


def runtime_modules() -> list[str]:
    return sorted(f"mdx.runtime.{p.stem}" for p in RUNTIME_DIR.glob("*.py") if p.stem != "__init__")


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Imports executed when the module is imported: not inside a def (class bodies do run)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append(child.module)
            visit(child)

    visit(tree)
    return found


def test_runtime_modules_exist():
    names = runtime_modules()
    for expected in ("cli", "images", "pipeline", "samplers", "schedules", "session", "telemetry"):
        assert f"mdx.runtime.{expected}" in names


def test_module_level_imports_are_allowed():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for path in sorted(RUNTIME_DIR.glob("*.py")):
        for name in _module_level_imports(ast.parse(path.read_text(), str(path))):
            top = name.split(".")[0]
            if top in stdlib:
                continue
            if top not in ALLOWED_TOP_LEVEL or (top == "mdx" and not name.startswith(ALLOWED_MDX)):
                bad.append(f"{path.name}: import {name}")
    assert not bad, "runtime modules import outside numpy/onnxruntime/pillow/einops/click: " + "; ".join(bad)


BLOCKER = r"""
import importlib, importlib.abc, json, sys

BLOCKED = {blocked!r}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked for the runtime")
        return None

sys.meta_path.insert(0, Blocker())
for module in {modules!r}:
    importlib.import_module(module)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {lazy!r})))
"""


def test_every_runtime_module_imports_without_torch_train_export():
    code = BLOCKER.format(blocked=BLOCKED, modules=runtime_modules(), lazy=sorted(LAZY_ONLY))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lazily_loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert lazily_loaded == [], f"imported at module level: {lazily_loaded}"


def test_blocker_really_blocks():
    """The check above would pass vacuously if the blocker did not work."""
    code = BLOCKER.format(blocked=BLOCKED, modules=["mdx.train.model"], lazy=[])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "blocked for the runtime" in proc.stderr
