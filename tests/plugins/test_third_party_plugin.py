"""The "write your own plugin" guide, for real: install the tiny plugin distribution with pip
into a fresh virtual environment and see the kernel's CLI list its action.

Nothing is downloaded: the new environment sees the kernel (repo root) and the packages already
installed for this interpreter through a ``.pth`` file, pip runs with ``--no-index``, and the
build uses the setuptools found there (``--no-build-isolation``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DIST = Path(__file__).resolve().parent / "tiny_plugin_dist"


def _can_build_wheels() -> bool:
    """setuptools < 70.1 builds wheels only with the ``wheel`` package beside it."""
    major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, f"{argv[:4]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not _can_build_wheels(),
                    reason="building without isolation needs the `wheel` package or "
                           "setuptools >= 70.1 in the test environment")
def test_tiny_plugin_installs_with_pip_and_is_listed(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]  # this interpreter's packages: msgspec, pluggy...
    Path(purelib, "_open_autoglm_kernel_dev.pth").write_text(
        f"{REPO}\nimport site; site.addsitedir({ours!r})\n", "utf-8")

    src = tmp_path / "tiny_plugin_dist"  # build from a copy: the build writes into the tree
    shutil.copytree(DIST, src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                             "__pycache__"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-build-isolation", "--no-index", str(src)], tmp_path, env)

    proc = _run([str(python), "-m", "kernel", "plugins", "--json"], tmp_path, env)
    listing = json.loads(proc.stdout)
    [tiny] = [a for a in listing["actions"] if a["name"] == "tiny.greet"]
    assert tiny["plugin"] == "tiny"
    assert tiny["description"].startswith("Say hello")
    assert tiny["payload_schema"] is not None and "GreetPayload" in json.dumps(
        tiny["payload_schema"])
    assert listing["plugins"]["tiny"] == "autoglm-kernel-tiny-example 0.1.0"
    assert listing["problems"] == []

    # and it runs: the plugin is importable in the new environment only
    check = _run([str(python), "-c", (
        "import asyncio, logging, tiny_plugin\n"
        "from kernel.hookspecs import PluginContext, RunContext\n"
        "[a] = tiny_plugin.register_actions(PluginContext(settings={'tiny': {'greeting': 'hi'}}))\n"
        "ctx = RunContext('j', 't', a.name, '1' * 32, '2' * 16, 1, None, None,"
        " logging.LoggerAdapter(logging.getLogger('x'), {}))\n"
        "print(asyncio.run(a.run(ctx, a.payload_type(name='box'))))\n")], tmp_path, env)
    assert check.stdout.strip() == "hi, box"
    assert importlib.util.find_spec("tiny_plugin") is None  # not in the test's environment
