"""The "write your own plugin" guide, for real: install the tiny plugin distribution with pip
into a fresh virtual environment, see the kernel's CLI list its action, and use its other hooks
there: the lifespan around a run (kernel.plugins.PluginSet.lifecycle) and its CLI command
(kernel.plugins.add_plugin_commands), both found through the entry point.

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

    # and it runs inside its lifespan: the plugin is importable in the new environment only
    data = tmp_path / "data"
    data.mkdir()
    check = _run([str(python), "-c", (
        "import asyncio, logging, pathlib\n"
        "from kernel.hookspecs import PluginContext, RunContext\n"
        "from kernel.plugins import load\n"
        "ctx = PluginContext(settings={'tiny': {'greeting': 'hi'}},"
        f" data_dir=pathlib.Path({str(data)!r}))\n"
        "ps = load(ctx)\n"
        "assert ps.problems == [], ps.problems\n"
        "a = ps.action('tiny.greet')\n"
        "run = RunContext('j', 't', a.name, '1' * 32, '2' * 16, 1, None, None,"
        " logging.LoggerAdapter(logging.getLogger('x'), {}))\n"
        "async def main():\n"
        "    async with ps.lifecycle():\n"
        "        print(await a.run(run, ps.decode_payload(a, {'name': 'box'})))\n"
        "        await a.run(run, ps.decode_payload(a, {'name': 'you'}))\n"
        "asyncio.run(main())\n")], tmp_path, env)
    assert check.stdout.strip() == "hi, box"
    assert (data / "tiny-greetings.txt").read_text() == "2 greeting(s)\n"  # written at stop
    assert importlib.util.find_spec("tiny_plugin") is None  # not in the test's environment

    # its CLI command, found through the entry point, with its settings from --config
    (tmp_path / "config.toml").write_text('[plugins.tiny]\ngreeting = "ahoy"\n', "utf-8")
    cli = _run([str(python), "-c", (
        "import argparse, sys\n"
        "from kernel.plugins import add_plugin_commands\n"
        "ap = argparse.ArgumentParser(prog='python -m kernel')\n"
        "ps = add_plugin_commands(ap.add_subparsers(dest='cmd'))\n"
        "assert ps.problems == [], ps.problems\n"
        "a = ap.parse_args(sys.argv[1:])\n"
        "sys.exit(a.handler(a))\n"),
        "tiny", "hello", "--name", "box", "--shout", "--config", "config.toml"], tmp_path, env)
    assert cli.stdout.strip() == "AHOY, BOX"


def test_the_guide_shows_the_tiny_plugin_as_it_is() -> None:
    guide = (REPO / "docs" / "PLUGINS.md").read_text("utf-8")
    code = (DIST / "tiny_plugin" / "__init__.py").read_text("utf-8")
    body = code[code.index("from __future__"):]
    assert f"```python\n{body}```" in guide, "docs/PLUGINS.md step 3 differs from tiny_plugin"
