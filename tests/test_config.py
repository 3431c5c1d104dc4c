"""config.toml decoding: typed sections, every error reported at once, the seed's YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel import config as config_mod
from kernel.config import Misfire, Overlap, Policy, secs
from kernel.durations import parse_duration
from kernel.errors import ConfigError, ErrorCode


def test_embedded_default_config_is_valid_and_matches_the_repo_copy() -> None:
    cfg = config_mod.load(None)
    assert cfg.scheduler.policy is Policy.PRIORITY_AWARE
    assert {t.id for t in cfg.tasks} >= {"heartbeat", "uptime_probe"}
    repo_copy = Path(__file__).resolve().parents[1] / "config.toml"
    assert repo_copy.read_text() == config_mod.default_config_text()


def test_seed_scheduler_section_and_durations() -> None:
    cfg, issues = config_mod.parse_text(
        """
        [server]
        host = "0.0.0.0"
        port = 8080
        read_timeout = "30s"
        write_timeout = "30s"
        [scheduler]
        policy = "priority-aware"
        queue_depth = 1024
        timeout_sec = 300
        [[tasks]]
        id = "daily_summary_report"
        schedule = "0 2 * * *"
        action = "log"
        timeout = "1h30m"
        overlap = "buffer_one"
        misfire = "catch_up"
        retry = { max_attempts = 3, initial_delay = "2s" }
        """, "c.toml")
    assert issues == []
    assert secs(cfg.server.read_timeout) == 30.0
    t = cfg.tasks[0]
    assert secs(t.timeout) == 5400.0
    assert t.overlap is Overlap.BUFFER_ONE and t.misfire is Misfire.CATCH_UP
    assert t.retry.max_attempts == 3 and secs(t.retry.initial_delay) == 2.0


def test_every_problem_is_reported_at_once_with_file_and_field() -> None:
    _, issues = config_mod.parse_text(
        """
        [scheduler]
        policy = "round-robin"
        queue_depth = "deep"
        colour = "blue"
        [[tasks]]
        id = "a"
        action = "log"
        timeout = "5 parsecs"
        overlap = "sometimes"
        [[tasks]]
        id = "a"
        action = "log"
        [[tasks]]
        id = "bad id!"
        action = "log"
        [[tasks]]
        id = "no_action"
        [bogus]
        x = 1
        """, "my.toml")
    text = "\n".join(map(str, issues))
    assert all(i.file == "my.toml" for i in issues)
    assert "[scheduler].policy: Invalid enum value 'round-robin' (valid: priority-aware, fifo)" in text
    assert "[scheduler].queue_depth" in text
    assert "[scheduler].colour: unknown field (valid: policy, queue_depth" in text
    assert "task 'a'.timeout" in text and "'1h30m'" in text
    assert "task 'a'.overlap" in text and "buffer_one" in text
    assert "task 'a': duplicate task id" in text
    assert "task 'bad id!'.id: must be" in text
    assert "task 'no_action'.action: missing required field" in text
    assert "[bogus]: unknown section" in text
    assert len(issues) == 9


def test_load_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[kernel\n")
    with pytest.raises(ConfigError) as ei:
        config_mod.load(p)
    assert str(p) in str(ei.value) and "not valid TOML" in str(ei.value)
    with pytest.raises(ConfigError, match="cannot read"):
        config_mod.load(tmp_path / "missing.toml")


def test_seed_yaml_tasks_are_accepted(tmp_path: Path) -> None:
    y = tmp_path / "tasks.yaml"
    y.write_text(
        "tasks:\n"
        "  - id: daily_summary_report\n"
        "    schedule: \"0 2 * * *\"\n"
        "    action: log\n"
        "    enabled: true\n"
        "  - id: disabled_one\n"
        "    schedule: \"*/5 * * * *\"\n"
        "    action: log\n"
        "    enabled: false\n")
    base = tmp_path / "config.toml"
    base.write_text("[scheduler]\npolicy = \"fifo\"\n")
    cfg = config_mod.load(base, tasks_file=y)
    ids = {t.id: t.enabled for t in cfg.tasks}
    assert ids["daily_summary_report"] is True and ids["disabled_one"] is False


def test_seed_yaml_task_clashing_with_the_config_is_a_duplicate(tmp_path: Path) -> None:
    y = tmp_path / "tasks.yaml"
    y.write_text("tasks:\n  - id: heartbeat\n    schedule: \"* * * * *\"\n    action: log\n")
    with pytest.raises(ConfigError, match="task 'heartbeat': duplicate task id"):
        config_mod.load(None, tasks_file=y)


def test_seed_yaml_errors_name_the_yaml_file(tmp_path: Path) -> None:
    y = tmp_path / "tasks.yaml"
    y.write_text("tasks:\n  - id: x\n    schedule: 5\n")
    with pytest.raises(ConfigError) as ei:
        config_mod.load(None, tasks_file=y)
    text = str(ei.value)
    assert str(y) in text and "task 'x'.schedule" in text and "task 'x'.action" in text


@pytest.mark.parametrize(("text", "secs_"), [
    (30, 30.0), ("30", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h30m", 5400.0), ("2d", 172800.0),
    ("1.5s", 1.5)])
def test_durations(text: str | int, secs_: float) -> None:
    assert parse_duration(text) == secs_


@pytest.mark.parametrize("bad", ["", "5 parsecs", "m5", "-3", "1h 30x"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError, match="duration|negative"):
        parse_duration(bad)


@pytest.mark.parametrize(("field", "value"), [
    ("jitter", "inf"), ("timeout", "nan"), ("timeout", 0), ("misfire_grace", "1e400")])
def test_non_finite_or_zero_durations_are_rejected(field: str, value: object) -> None:
    val = f'"{value}"' if isinstance(value, str) else str(value)
    _, issues = config_mod.parse_text(
        f'[[tasks]]\nid = "t"\naction = "log"\n{field} = {val}\n', "c.toml")
    assert [i.where for i in issues] == [f"task 't'.{field}"]


# --- bytes that are not UTF-8 (issue 11, item 7) ------------------------------------------------

def test_a_config_file_that_is_not_utf8_names_the_file_and_the_byte_offset(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    data = b'[kernel]\ntimezone = "Europe/Berlin"\n# Caf\xe9 du Nord\n[[tasks]]\n'
    p.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        config_mod.load(p)
    err = info.value
    assert err.code is ErrorCode.ERR_CONFIG_INVALID
    (issue,) = err.issues
    assert issue.file == str(p)
    offset = data.index(b"\xe9")
    assert f"byte 0xe9 at offset {offset} (line 3, column 6)" in issue.message
    assert "not UTF-8" in issue.message and "UTF-8" in issue.message.split("valid:")[1]


def test_a_utf16_config_file_fails_at_offset_0(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text('[kernel]\ntimezone = "UTC"\n', encoding="utf-16")
    with pytest.raises(ConfigError, match=r"byte 0xff at offset 0 \(line 1, column 1\)"):
        config_mod.load(p)


def test_a_tasks_file_that_is_not_utf8_names_that_file(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text('[kernel]\ntimezone = "UTC"\n')
    yml = tmp_path / "tasks.yaml"
    yml.write_bytes(b"tasks:\n  - id: r\xe9sum\xe9\n")
    with pytest.raises(ConfigError) as info:
        config_mod.load(toml, tasks_file=yml)
    (issue,) = info.value.issues
    assert issue.file == str(yml)
    assert "byte 0xe9 at offset 16 (line 2, column 10)" in issue.message


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_bytes(b'\xef\xbb\xbf[kernel]\ntimezone = "Asia/Tokyo"\n')
    assert config_mod.load(p).kernel.timezone == "Asia/Tokyo"
