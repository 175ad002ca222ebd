"""The base install (engines + service) never needs torch: a Jetson runs it without."""

from __future__ import annotations

import os
import subprocess
import sys

import tomllib

from .conftest import REPO


def test_base_dependencies_do_not_name_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [dep.lower() for dep in project["dependencies"]]
    assert not [dep for dep in base if dep.startswith(("torch", "onnx>", "onnx=", "onnxscript"))]
    assert project["optional-dependencies"]["train"][0] == "torch==2.13.0"  # exact: a loose spec pulls CUDA
    assert set(project["optional-dependencies"]) >= {"train", "tensorrt", "basler", "dev"}


def test_runtime_and_service_import_without_torch() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "import engines, service\n"
        "for pkg in (engines, service):\n"
        "    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(mod.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'training', 'onnx'})\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
