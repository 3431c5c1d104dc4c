"""The dependency list is true: croniter is a test dependency (the reference the kernel's own
cron evaluator is checked against), and no module of the kernel imports it at run time."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_IMPORT_ALL = """
import importlib, pkgutil, sys
sys.modules["croniter"] = None  # any import of croniter now fails, naming it
import kernel
bad = []
for mod in pkgutil.walk_packages(kernel.__path__, "kernel."):
    if mod.name.endswith("__main__"):
        continue  # importing it runs the kernel
    try:
        importlib.import_module(mod.name)
    except ImportError as exc:
        if "croniter" in str(exc):
            bad.append(f"{mod.name}: {exc}")
print("\\n".join(bad))
"""


def _names(requirements: list[str]) -> set[str]:
    out = set()
    for req in requirements:
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower())
    return out


def test_croniter_is_a_dev_dependency_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    assert "croniter" not in _names(project["dependencies"])
    assert "croniter" in _names(project["optional-dependencies"]["dev"])


@pytest.mark.slow
def test_no_kernel_module_imports_croniter() -> None:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
