"""The command line as a user meets it: cron preview, validate, explain, plugins, and the
kernel started as a real process on the embedded default config and stopped with SIGINT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel import discovery
from kernel.cli import main

from .kernel_process import run_until


@pytest.fixture(autouse=True)
def _no_config_on_this_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Config discovery must not find the developer's ~/.config or /etc files."""
    monkeypatch.delenv("KERNEL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(discovery, "SYSTEM_DIR", tmp_path / "etc")


def test_cron_preview_prints_instants_with_offsets(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["cron", "30 2 * * *", "--tz", "Europe/Berlin", "--after",
               "2026-10-24T12:00:00+00:00", "--count", "3"])
    out = capsys.readouterr().out.split()
    assert rc == 0
    # Berlin's 2026 fall-back day runs 02:30 once (CEST), then CET
    assert out == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00",
                   "2026-10-27T02:30:00+01:00"]


def test_cron_preview_seconds_first_and_spring_gap(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cron", "0 30 2 * * ?", "--tz", "America/New_York", "--after",
                 "2026-03-07T12:00:00+00:00", "--count", "2"]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]


@pytest.mark.parametrize(("args", "needle"), [
    (["cron", "61 * * * *"], "minute"),
    (["cron", "0 0 30 2 *"], "never"),
    (["cron", "* * *"], "field"),
    (["cron", "* * * * *", "--tz", "Mars/Olympus"], "tz"),
])
def test_cron_invalid_input_is_one_line_and_exit_2(args: list[str], needle: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err.lower()
    assert "Traceback" not in err


def test_cron_as_a_real_process_bad_after_is_exit_2() -> None:
    p = subprocess.run([sys.executable, "-m", "kernel", "cron", "* * * * *", "--after", "noon"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "ISO-8601" in p.stderr and "Traceback" not in p.stderr


def test_validate_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("""
[[tasks]]
id = "a"
schedule = "0 25 * * *"
action = "log"
after = ["c"]
[[tasks]]
id = "b"
schedule = "* * * * *"
action = "summarise"
[[tasks]]
id = "c"
action = "log"
after = ["a"]
[[tasks]]
id = "d"
schedule = "@every 5m"
tz = "Europe/Nowhere"
action = "exec"
payload = { argv = [] }
""")
    assert main(["validate", "--config", str(cfg)]) == 78  # EX_CONFIG (issue 13; was 1)
    err = capsys.readouterr().err
    assert f"{cfg}: task 'a'.schedule" in err and "hour" in err and "0-23" in err
    assert "task 'b'.action" in err and "ERR_ACTION_NOT_FOUND" in err and "exec" in err
    assert "dependency cycle" in err and ("a -> c -> a" in err or "c -> a -> c" in err)
    assert "task 'd'.tz" in err
    assert "task 'd'.payload" in err
    assert "5 problem(s) found" in err


def test_validate_ok_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "valid (" in out and "task(s)" in out


def test_explain(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "ERR_TIMEOUT"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ERR_TIMEOUT") and "remedy:" in out
    assert main(["explain", "timeout"]) == 0
    assert main(["explain", "ERR_NOPE"]) == 2


def test_plugins_lists_builtin_actions(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {a["name"] for a in data["actions"]}
    assert {"exec", "python", "log"} <= names
    exec_schema = next(a for a in data["actions"] if a["name"] == "exec")["payload_schema"]
    assert "argv" in json.dumps(exec_schema)


@pytest.mark.slow
def test_kernel_runs_the_default_config_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    env = {**os.environ, "KERNEL_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    # the heartbeat task fires every 5 s: wait for its first run
    rc, text = run_until(["--port", "0", "--log-format", "json"], env,
                         lambda line: '"task_id": "heartbeat"' in line and "succeeded" in line)
    assert rc == 0, text
    assert f"data dir: {tmp_path / 'data'}" in text
    assert "kernel stopping (SIGINT)" in text
    assert (tmp_path / "data" / "kernel.sqlite3").exists()
