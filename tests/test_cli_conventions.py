"""CLI conventions: --version, the console command, --json on every command that prints (errors
as JSON too), the documented exit codes (0, 1, 2, 78), help with an example on every command and
option, and tables that stay one line a row at 80 columns."""

from __future__ import annotations

import argparse
import http.server
import importlib.metadata
import io
import json
import os
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from kernel import discovery
from kernel.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_USAGE, _parser, main
from kernel.tables import build_table

ROOT = Path(__file__).resolve().parents[1]
BAD_CONFIG = """
[[tasks]]
id = "a"
schedule = "0 25 * * *"
action = "log"
"""


@pytest.fixture(autouse=True)
def _isolated_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERNEL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(discovery, "SYSTEM_DIR", tmp_path / "etc")


def _json_out(capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    doc = json.loads(capsys.readouterr().out)
    assert isinstance(doc, dict)
    return doc


# ------------------------------------------------------------------ version, console command


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"], prog="autoglm-kernel") == 0
    assert capsys.readouterr().out.strip() == (
        f"autoglm-kernel {importlib.metadata.version('open-autoglm-kernel')}")


def test_version_as_a_real_process() -> None:
    p = subprocess.run([sys.executable, "-m", "kernel", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("python -m kernel ")


def test_console_command_is_declared_and_installed() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"autoglm-kernel": "kernel.cli:main"}
    exe = Path(sys.executable).parent / "autoglm-kernel"
    if not exe.exists():
        pytest.skip(f"{exe} missing: reinstall the package (pip install -e .) to get it")
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("autoglm-kernel "), p.stderr


# ------------------------------------------------------------------ --json and exit codes


def test_validate_json_ok_and_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--json"]) == 0
    assert _json_out(capsys)["valid"] is True
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_CONFIG)
    assert main(["validate", "--json", "--config", str(bad)]) == EXIT_CONFIG == 78
    doc = _json_out(capsys)
    assert doc["valid"] is False and doc["errors"] == 1
    issue = doc["issues"][0]  # type: ignore[index]
    assert issue["where"] == "task 'a'.schedule" and "0-23" in issue["message"]
    assert doc["error"]["code"] == "ERR_CONFIG_INVALID"  # type: ignore[index]
    assert doc["error"]["exit_status"] == 78  # type: ignore[index]


def test_cron_json_and_its_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cron", "30 2 * * *", "--tz", "Europe/Berlin", "--after",
                 "2026-10-24T12:00:00+00:00", "--count", "2", "--json"]) == 0
    doc = _json_out(capsys)
    assert doc["instants"] == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    assert doc["tz"] == "Europe/Berlin" and doc["after"] == "2026-10-24T12:00:00+00:00"
    assert main(["cron", "61 * * * *", "--json"]) == EXIT_USAGE
    err = _json_out(capsys)["error"]
    assert err["code"] == "ERR_CRON_INVALID" and "minute" in err["message"]  # type: ignore[index]
    assert main(["cron", "0 0 30 2 *", "--json"]) == EXIT_USAGE
    assert "never" in _json_out(capsys)["error"]["message"]  # type: ignore[index]


def test_explain_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "timeout", "--json"]) == 0
    doc = _json_out(capsys)
    assert doc["code"] == "ERR_TIMEOUT" and doc["retryable"] is False and doc["remedy"]
    assert main(["explain", "--json"]) == 0
    codes = [c["code"] for c in _json_out(capsys)["codes"]]  # type: ignore[attr-defined]
    assert "ERR_CONFIG_INVALID" in codes and "ERR_USAGE" in codes
    assert main(["explain", "ERR_NOPE", "--json"]) == EXIT_USAGE
    assert _json_out(capsys)["error"]["code"] == "ERR_NOT_FOUND"  # type: ignore[index]


def test_usage_errors_are_exit_2_and_json_in_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cron", "* * * * *", "--count", "many"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--count" in err and "invalid int value" in err and "Traceback" not in err
    assert main(["cron", "* * * * *", "--count", "many", "--json"]) == EXIT_USAGE
    doc = _json_out(capsys)["error"]
    assert doc["code"] == "ERR_USAGE" and "--count" in doc["message"]  # type: ignore[index]
    assert doc["exit_status"] == 2  # type: ignore[index]
    assert main(["validate", "--frobnicate", "--json"]) == EXIT_USAGE
    assert "--frobnicate" in _json_out(capsys)["error"]["message"]  # type: ignore[index]


def test_client_command_failure_is_json_in_json_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["runs", "--url", url, "--json"]) == EXIT_FAILURE
    cap = capsys.readouterr()
    err = json.loads(cap.out)["error"]
    assert err["code"] == "ERR_UNREACHABLE" and url in err["message"] and err["exit_status"] == 1
    assert cap.err == ""
    assert main(["runs", "--url", url]) == EXIT_FAILURE  # text mode: one line on stderr
    assert "cannot reach the kernel" in capsys.readouterr().err


@pytest.mark.slow
def test_run_with_an_invalid_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_CONFIG)
    env = {**os.environ, "KERNEL_DATA_DIR": str(tmp_path / "data")}
    env.pop("NOTIFY_SOCKET", None)
    for extra, check in (([], lambda p: "task 'a'.schedule" in p.stderr),
                         (["--json"], lambda p: json.loads(p.stdout)["error"]["issues"][0]
                          ["where"] == "task 'a'.schedule")):
        p = subprocess.run([sys.executable, "-m", "kernel", "run", "--config", str(bad),
                            "--no-server", *extra], capture_output=True, text=True,
                           timeout=60, env=env)
        assert p.returncode == 78, (p.stdout, p.stderr)
        assert check(p), (p.stdout, p.stderr)
        assert "Traceback" not in p.stderr


# ------------------------------------------------------------------ help


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("plugin_commands", [False, True])
def test_every_command_has_an_example_and_every_option_a_help_text(plugin_commands: bool) -> None:
    ap = _parser("autoglm-kernel", plugin_commands=plugin_commands)
    assert "exit status" in ap.format_help() and "78" in ap.format_help()
    commands = _subparsers(ap)
    assert {"run", "validate", "cron", "plugins", "explain", "runs", "tui"} <= set(commands)
    for name, p in commands.items():
        text = p.format_help()
        assert "example" in text and f"autoglm-kernel {name}" in text, name
        nested = [(name, p)]
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions):  # a plugin's
            nested += [(f"{name} {n}", q) for n, q in _subparsers(p).items()]
        for label, q in nested:
            assert "example" in q.format_help(), label
            for action in q._actions:
                assert action.help, f"{label} {action.option_strings or action.dest}: no help"


@pytest.mark.parametrize("name", ["validate", "cron", "explain", "plugins", "runs", "jobs",
                                  "tasks", "submit"])
def test_every_command_that_prints_has_json(name: str) -> None:
    p = _subparsers(_parser())[name]
    assert any("--json" in a.option_strings for a in p._actions)


def test_plugin_commands_are_reachable_and_builtins_do_not_load_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`autoglm-kernel inference models --help` works (the inference plugin's command); parsing a
    built-in command does not import plugins for their commands."""
    if "inference" not in _subparsers(_parser(plugin_commands=True)):
        pytest.skip("the inference plugin is not installed in this environment")
    assert main(["inference", "models", "--help"]) == 0
    assert "--base-url" in capsys.readouterr().out
    assert main(["inference", "nope", "--json"]) == EXIT_USAGE
    assert _json_out(capsys)["error"]["code"] == "ERR_USAGE"  # type: ignore[index]
    assert "inference" not in _subparsers(_parser())


# ------------------------------------------------------------------ 80 columns

RUN_COLUMNS = ["finished", "task", "action", "outcome", "code", "attempt", "trace", "detail"]
RUN_ROWS = [
    ["2026-11-30 10:55:34.123456Z", "daily_summary_report.summarise", "inference.chat",
     "failed", "ERR_DEPENDENCY_FAILED", "2", "0af7651916cd43dd8448eb211c80319c",
     "upstream task daily_summary_report failed with ERR_TIMEOUT after 3 attempts"],
    ["2026-11-30 10:55:30.1Z", "heartbeat", "log", "succeeded", "", "1",
     "1af7651916cd43dd8448eb211c80319c", "ok"],
]


def _render(width: int) -> list[str]:
    con = Console(width=width, color_system=None, record=True, file=io.StringIO())
    con.print(build_table("Runs", RUN_COLUMNS, RUN_ROWS, width))
    return [line.rstrip() for line in con.export_text().splitlines()]


def test_runs_table_is_one_line_a_row_at_80_columns() -> None:
    lines = _render(80)
    assert all(len(line) <= 80 for line in lines)
    # title, header, rule, two rows, caption: no cell wraps onto a second line
    assert len(lines) == 6, "\n".join(lines)
    assert lines[3].startswith("2026-11-30 10:55:34Z  daily_summary_report")
    assert "ERR_DEPENDENCY_FAILED" in lines[3] and "succeeded" in lines[4]
    assert "not shown at 80 columns: action, attempt, trace, detail" in lines[5]


def test_runs_table_shows_every_column_when_there_is_room() -> None:
    lines = _render(240)
    assert len(lines) == 5 and "not shown" not in "\n".join(lines)
    assert "0af7651916cd43dd8448eb211c80319c" in lines[3] and "after 3 attempts" in lines[3]


@pytest.fixture
def runs_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering GET /runs like the kernel (canned rows)."""
    runs = [{"finished_at": r[0].replace(" ", "T").replace("Z", "+00:00"), "task_id": r[1],
             "action": r[2], "outcome": r[3], "error_code": r[4] or None, "attempt": int(r[5]),
             "trace_id": r[6], "detail": r[7]} for r in RUN_ROWS]
    body = json.dumps({"runs": runs}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()


def test_runs_command_is_one_line_a_row_at_80_columns(
        runs_server: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["runs", "--url", runs_server, "--token", "t"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines)
    assert sum(line.startswith("2026-11-30 10:55:") for line in lines) == 2
    assert len(lines) <= 7, "\n".join(lines)


def test_plugins_table_fits_80_columns(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["plugins"]) in (0, 1)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("exec ", "log ", "python "))]
    assert len(rows) == 3 and all(len(line.rstrip()) <= 80 for line in lines)
