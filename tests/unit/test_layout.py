"""The tree's promises: each subpackage exports exactly its modules' public names, every export
resolves, and importing a lane module does not build the worker's faust app."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAZY = ["pipeline.kafka", "pipeline.batching", "pipeline.features", "pipeline.inference",
        "pipeline.s3", "pipeline.clients", "pipeline.dev"]


def _module_all(path: Path) -> list[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
                getattr(target, "id", "") == "__all__" for target in node.targets):
            return list(ast.literal_eval(node.value))
    return []


@pytest.mark.parametrize("package", LAZY)
def test_package_exports_its_modules_public_names(package: str) -> None:
    folder = ROOT / package.replace(".", "/")
    want = {name for path in folder.glob("*.py") if path.name != "__init__.py"
            for name in _module_all(path)}
    module = importlib.import_module(package)
    assert set(module.__all__) == want, sorted(set(module.__all__) ^ want)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        module.nope  # noqa: B018


def test_importing_lanes_does_not_build_the_worker_app() -> None:
    code = ("import sys, agents.fraud, agents.reco, agents.history, agents.archive, agents.batch;"
            "print('agents.worker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "False"


def test_serverless_function_does_not_import_faust() -> None:
    out = subprocess.run([sys.executable, "-c",
                          "import sys, pipeline.serverless; print('faust' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
