"""Config discovery: --config, then $KERNEL_CONFIG, then $XDG_CONFIG_HOME (or ~/.config), then
/etc (a temporary directory here, never the real one), then the embedded demo with a warning
naming every place looked at; `validate` and `run` say which file they use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kernel import discovery
from kernel.cli import main
from kernel.discovery import APP, discover

from .kernel_process import run_until

GOOD = """
[[tasks]]
id = "only_{tag}"
schedule = "@every 1h"
action = "log"
payload = {{ message = "hi" }}
"""


def _write(path: Path, tag: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(GOOD.format(tag=tag))
    return path


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """An isolated home, XDG dir and system dir; $KERNEL_CONFIG unset."""
    home, xdg, etc = tmp_path / "home", tmp_path / "xdg", tmp_path / "etc"
    for d in (home, xdg, etc):
        d.mkdir()
    monkeypatch.delenv("KERNEL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(discovery, "SYSTEM_DIR", etc)
    return {"home": home, "xdg": xdg, "etc": etc,
            "user": xdg / APP / "config.toml", "system": etc / APP / "config.toml"}


def test_chain_order_each_step_wins_over_the_next(tmp_path: Path, places: dict[str, Path]) -> None:
    env: dict[str, str] = {"XDG_CONFIG_HOME": str(places["xdg"])}
    etc = places["etc"]
    # nothing anywhere: the demo, and the warning names every place looked at
    found = discover(env=env, system_dir=etc)
    assert found.is_demo and found.path is None
    warning = found.demo_warning()
    assert "$KERNEL_CONFIG (unset)" in warning
    assert str(places["user"]) in warning and str(places["system"]) in warning
    assert "embedded demo" in warning and "--config" in warning
    # /etc
    _write(places["system"], "etc")
    found = discover(env=env, system_dir=etc)
    assert found.path == places["system"]
    # the user's file wins over /etc
    _write(places["user"], "user")
    assert discover(env=env, system_dir=etc).path == places["user"]
    # $KERNEL_CONFIG wins over both
    named = _write(tmp_path / "named.toml", "env")
    found = discover(env={**env, "KERNEL_CONFIG": str(named)}, system_dir=etc)
    assert (found.path, found.origin) == (named, "$KERNEL_CONFIG")
    # --config wins over everything
    explicit = _write(tmp_path / "explicit.toml", "cli")
    found = discover(explicit, env={**env, "KERNEL_CONFIG": str(named)}, system_dir=etc)
    assert (found.path, found.origin) == (explicit, "--config")


def test_xdg_unset_or_relative_means_home_dot_config(tmp_path: Path) -> None:
    home = tmp_path / "h"
    user = _write(home / ".config" / APP / "config.toml", "home")
    for env in ({}, {"XDG_CONFIG_HOME": ""}, {"XDG_CONFIG_HOME": "relative/dir"}):
        found = discover(env=env, home=home, system_dir=tmp_path / "none")
        assert found.path == user, env
        assert found.origin == "~/.config"


def test_an_explicit_choice_that_is_missing_is_an_error_not_the_demo(
        tmp_path: Path, places: dict[str, Path], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _write(places["system"], "etc")
    monkeypatch.setenv("KERNEL_CONFIG", str(tmp_path / "typo.toml"))
    assert main(["validate"]) == 78
    err = capsys.readouterr().err
    assert "typo.toml" in err and "cannot read" in err


def test_validate_names_the_discovered_file(places: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _write(places["system"], "etc")
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert f"{places['system']} (from {places['etc'] / APP}): valid (1 task(s)" in out
    _write(places["user"], "user")
    assert main(["validate", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file"] == str(places["user"]) and doc["origin"] == "$XDG_CONFIG_HOME"
    assert doc["valid"] is True and doc["tasks"] == 1


def test_validate_warns_when_it_falls_back_to_the_demo(places: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 0
    cap = capsys.readouterr()
    assert cap.err.startswith("warning: no config file found")
    assert str(places["system"]) in cap.err
    assert "the embedded demo config" in cap.out and "valid (" in cap.out
    assert main(["validate", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file"] is None and doc["origin"] == "embedded demo"
    assert str(places["user"]) + " (missing)" in doc["looked"]


@pytest.mark.slow
def test_run_uses_the_xdg_file_and_says_so(tmp_path: Path) -> None:
    """A real kernel process: it picks $XDG_CONFIG_HOME/open-autoglm-kernel/config.toml, says so
    in its banner, and (not the demo) runs that file's task, not the heartbeat."""
    xdg = tmp_path / "xdg"
    user = xdg / APP / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text("""
[kernel]
log_format = "text"
[[tasks]]
id = "from_xdg"
schedule = "@every 1s"
action = "log"
payload = { message = "xdg task ran" }
""")
    env = {k: v for k, v in os.environ.items() if k not in ("KERNEL_CONFIG", "NOTIFY_SOCKET")}
    env.update(XDG_CONFIG_HOME=str(xdg), KERNEL_DATA_DIR=str(tmp_path / "data"),
               PYTHONUNBUFFERED="1")
    rc, text = run_until(["run", "--no-server"], env,
                         lambda line: "from_xdg" in line and "succeeded" in line)
    assert rc == 0, text
    assert f"Open-AutoGLM Kernel: config {user} (from $XDG_CONFIG_HOME)" in text
    assert "heartbeat" not in text and "no config file found" not in text
