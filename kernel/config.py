"""Typed configuration: ``config.toml`` (and the seed's YAML task list) decoded into Structs.

Decoding reports **every** problem at once: each section and each task is converted on its own,
and a failing field is noted and dropped so the rest can still be checked. Semantic checks that
need other rooms (cron syntax, known actions, dependency cycles) live in ``kernel.validate``.
"""

from __future__ import annotations

import enum
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from .durations import parse_duration
from .errors import ConfigError, ConfigIssue
from .workers import PythonSettings

DEFAULT_CONFIG_NAME = "default_config.toml"
TASK_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class Policy(enum.StrEnum):
    PRIORITY_AWARE = "priority-aware"
    FIFO = "fifo"


class Overlap(enum.StrEnum):
    """What to do when an occurrence comes due while the previous run is still going
    (Temporal Schedules' overlap policies)."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    BUFFER_ALL = "buffer_all"
    CANCEL_OTHER = "cancel_other"
    ALLOW_ALL = "allow_all"


class Misfire(enum.StrEnum):
    """What to do with occurrences missed while the kernel was down."""

    COALESCE = "coalesce"
    CATCH_UP = "catch_up"
    SKIP = "skip"


class GpuUnavailable(enum.StrEnum):
    HOLD = "hold"
    REFUSE = "refuse"


def _dur(v: float | str | None) -> float | None:
    return None if v is None else parse_duration(v)


MAX_TIMER_SECONDS = 10 * 366 * 86400.0
"""The longest duration that becomes a timer (a timeout, a jitter, a retry delay): ten
years, what POST /jobs accepts for ``delay`` and ``timeout``."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def _durations(self, *names: str, most: float | None = None) -> None:
        """Parse the duration fields ``names``; ``most`` bounds them (a timer cannot be armed
        at 1e308 s: a task with such a jitter was added by POST /tasks but never armed)."""
        for name in names:
            try:
                value = _dur(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if most is not None and value is not None and value > most:
                raise ValueError(f"{name}: {value:g} s is too long (valid: at most "
                                 f"{most / 86400:g} days)")
            setattr(self, name, value)


class KernelSection(_Section):
    timezone: str = "UTC"
    log_level: str = "info"
    log_format: str = "auto"   # auto | json | text
    data_dir: str = ""         # default: $KERNEL_DATA_DIR, else $XDG_DATA_HOME/open-autoglm-kernel
    shutdown_grace: float | str = 10.0
    loop_stall_warn: float | str = "500ms"  # a loop lag above this is logged as a stall

    def __post_init__(self) -> None:
        self._durations("shutdown_grace", "loop_stall_warn")
        if float(self.loop_stall_warn) <= 0:
            raise ValueError("loop_stall_warn: must be more than 0 seconds (e.g. '500ms')")
        if self.log_level.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("log_level: must be one of debug, info, warning, error")
        if self.log_format not in {"auto", "json", "text"}:
            raise ValueError("log_format: must be one of auto, json, text")


class ServerSection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    read_timeout: float | str = 30.0
    write_timeout: float | str = 30.0
    max_body_bytes: int = 1 << 20
    token_env: str = "KERNEL_API_TOKEN"
    require_token: bool = True  # false: no token on a loopback address (never off loopback)

    def __post_init__(self) -> None:
        from .api.security import is_loopback  # here: kernel.api imports this module

        self._durations("read_timeout", "write_timeout")
        if not 0 <= self.port <= 65535:
            raise ValueError("port: must be 0-65535 (0 picks a free port)")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes: must be at least 1024 (a smaller one refuses "
                             "every submission with 413)")
        if not self.require_token and not is_loopback(self.host):
            raise ValueError(
                f"require_token: false is only allowed on a loopback host, not {self.host!r} "
                "(valid: true, or host = \"127.0.0.1\" / \"::1\" / \"localhost\")")


class StoreSection(_Section):
    backend: str = "sqlite"     # sqlite | memory | postgres
    dsn: str = ""               # postgres: a libpq URI, postgresql://user@host:5432/db
    schema: str = "kernel"      # postgres: the schema that holds the kernel's tables
    path: str = ""              # default: <data_dir>/kernel.sqlite3
    synchronous: str = "NORMAL"  # NORMAL | FULL
    history_max_rows: int = 100_000
    history_max_age: float | str = "30d"
    dedup_ttl: float | str = "24h"

    def __post_init__(self) -> None:
        self._durations("history_max_age", "dedup_ttl")
        if self.backend not in {"sqlite", "memory", "postgres"}:
            raise ValueError("backend: must be 'sqlite', 'memory' or 'postgres'")
        if self.backend == "postgres" and not self.dsn:
            raise ValueError(
                "dsn: required when backend = 'postgres' (a libpq URI such as "
                "postgresql://kernel@db-host:5432/kernel; passwords may come from ~/.pgpass or "
                "PGPASSWORD)")
        if self.backend == "postgres" and self.dsn:
            # (asyncpg takes URIs only, not libpq's key=value strings)
            scheme = self.dsn.split("://", 1)[0].lower() if "://" in self.dsn else None
            if scheme not in ("postgresql", "postgres"):
                raise ValueError(
                    "dsn: not a PostgreSQL URI; valid: postgresql://user@host:5432/dbname, "
                    "e.g. postgresql://kernel@db-host:5432/kernel, or for a local socket "
                    "postgresql:///kernel?host=/run/postgresql")
        if not self.schema:
            raise ValueError("schema: must be a PostgreSQL schema name such as 'kernel'")
        if len(self.schema.encode()) > PG_NAME_MAX:
            raise ValueError(f"schema: {len(self.schema.encode())} bytes; PostgreSQL names hold "
                             f"at most {PG_NAME_MAX} bytes")
        if self.synchronous.upper() not in {"NORMAL", "FULL", "OFF", "EXTRA"}:
            raise ValueError("synchronous: must be NORMAL, FULL, EXTRA or OFF")
        if self.history_max_rows < 1:
            # retention keeps max(0, n) rows: -1 (the usual "no limit") deleted every run
            raise ValueError("history_max_rows: must be at least 1 (the runs kept; "
                             "history_max_age bounds their age)")


#: ``[fleet] ttl`` is at least this many heartbeats: one late heartbeat is not a death.
FLEET_TTL_HEARTBEATS = 2
#: PostgreSQL's longest identifier, in bytes (NAMEDATALEN - 1).
PG_NAME_MAX = 63


class FleetSection(_Section):
    """``[fleet]``: kernels sharing one PostgreSQL store (``[store] backend = "postgres"``)."""

    heartbeat: float | str = "2s"      # how often each kernel renews its liveness row
    ttl: float | str = "10s"           # a kernel silent this long is declared dead, its jobs freed
    claim_horizon: float | str = "2s"  # claim jobs due within this much of now
    claim_batch: int = 500             # the most jobs one claim takes

    def __post_init__(self) -> None:
        # (a day at most: a horizon of 1e308 s made the claim room overflow)
        self._durations("heartbeat", "ttl", "claim_horizon", most=86400.0)
        for name in ("heartbeat", "ttl", "claim_horizon"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"{name}: must be more than 0 seconds")
        if self.claim_batch < 1:
            raise ValueError("claim_batch: must be at least 1")
        beat, ttl = float(secs(self.heartbeat) or 0), float(secs(self.ttl) or 0)
        if ttl < FLEET_TTL_HEARTBEATS * beat:
            # the others would declare a live kernel dead between two of its heartbeats (or
            # after one late one): it fences itself over and over and its runs run again
            raise ValueError(f"ttl: {ttl:g} s must be at least {FLEET_TTL_HEARTBEATS} x heartbeat "
                             f"({beat:g} s), else live kernels are declared dead; valid: e.g. "
                             "heartbeat = \"2s\", ttl = \"10s\"")


class SchedulerSection(_Section):
    policy: Policy = Policy.PRIORITY_AWARE
    queue_depth: int = 1024
    timeout_sec: float = 300.0
    max_concurrency: int = 8
    aging: float | str = "30s"   # a waiting job gains one priority level per `aging`
    gpu_unavailable: GpuUnavailable = GpuUnavailable.HOLD
    concurrency_limits: dict[str, int] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._durations("aging", most=MAX_TIMER_SECONDS)
        if float(self.aging) <= 0:
            raise ValueError("aging: must be more than 0 seconds")
        if self.queue_depth < 1:
            raise ValueError("queue_depth: must be at least 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency: must be at least 1")
        held = sorted(k for k, n in self.concurrency_limits.items() if n < 1)
        if held:  # a job with such a key would wait for a free slot for ever
            raise ValueError(f"concurrency_limits: the limit of {held[0]!r} must be at least 1 "
                             "(jobs that may run at once with that key)")
        if not 0 < self.timeout_sec <= MAX_TIMER_SECONDS:  # nan (TOML has it) fails too
            raise ValueError("timeout_sec: must be more than 0 seconds, at most "
                             f"{MAX_TIMER_SECONDS:.0f} (ten years)")


class RetryPolicy(_Section):
    max_attempts: int = 1
    initial_delay: float | str = 1.0
    max_delay: float | str = 300.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        self._durations("initial_delay", "max_delay", most=MAX_TIMER_SECONDS)
        if self.max_attempts < 1:
            raise ValueError("max_attempts: must be at least 1")
        if not 1 <= self.multiplier < math.inf:  # nan (TOML has it) fails too
            raise ValueError("multiplier: must be a number, at least 1")


PRIORITY_MAX = 1_000_000
"""A task's (and a submission's) priority lies in ``[-PRIORITY_MAX, PRIORITY_MAX]``."""
GPU_MEMORY_MB_MAX = 1 << 31
"""More memory (in MB, 2 PiB) than any card has: a bound that keeps the value storable."""


class TaskConfig(_Section):
    id: str
    action: str
    schedule: str | None = None
    enabled: bool = True
    description: str = ""
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: int = 0
    timeout: float | str | None = None
    tz: str | None = None
    jitter: float | str = 0.0
    after: list[str] = msgspec.field(default_factory=list)
    overlap: Overlap = Overlap.SKIP
    max_instances: int = 1
    misfire: Misfire = Misfire.COALESCE
    misfire_grace: float | str = 60.0
    max_catch_up: int = 10
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    gpu_memory_mb: int = 0
    gpu: int | str = "any"
    concurrency_key: str | None = None

    def __post_init__(self) -> None:
        self._durations("timeout", "jitter", "misfire_grace", most=MAX_TIMER_SECONDS)
        if self.timeout is not None and float(self.timeout) <= 0:
            raise ValueError("timeout: must be more than 0 seconds (leave it out for the default)")
        if not TASK_ID_RE.match(self.id):
            raise ValueError("id: must be 1-128 characters of letters, digits, '_', '.', '-'")
        if self.max_instances < 1:
            raise ValueError("max_instances: must be at least 1")
        if self.max_catch_up < 0:
            raise ValueError("max_catch_up: must be 0 or more")
        if not -PRIORITY_MAX <= self.priority <= PRIORITY_MAX:
            # what POST /jobs accepts; a TOML integer has no bound, and one past 64 bits
            # stopped the kernel when the task's first job was stored
            raise ValueError(f"priority: must be between -{PRIORITY_MAX:_} and "
                             f"{PRIORITY_MAX:_} (higher runs first)")
        if not 0 <= self.gpu_memory_mb <= GPU_MEMORY_MB_MAX:
            raise ValueError(f"gpu_memory_mb: must be 0 or more, at most {GPU_MEMORY_MB_MAX:_}")
        if isinstance(self.gpu, str) and self.gpu != "any":
            raise ValueError("gpu: must be a GPU index (0, 1, ...) or \"any\"")


class Config(msgspec.Struct, kw_only=True):
    kernel: KernelSection = msgspec.field(default_factory=KernelSection)
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    store: StoreSection = msgspec.field(default_factory=StoreSection)
    scheduler: SchedulerSection = msgspec.field(default_factory=SchedulerSection)
    fleet: FleetSection = msgspec.field(default_factory=FleetSection)
    python: PythonSettings = msgspec.field(default_factory=PythonSettings)
    tasks: list[TaskConfig] = msgspec.field(default_factory=list)
    plugins: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    source: str = "<default>"
    #: What the files themselves said, for the reload guard (:func:`kernel.reload.check_reload`):
    #: ``blank`` when the config file holds no key at all (empty, whitespace, comments only: what
    #: an editor's half-written file looks like), ``tasks_declared`` when a file has a ``tasks``
    #: key (``tasks = []`` or ``[[tasks]]`` in TOML, ``tasks:`` in the YAML tasks file).
    blank: bool = False
    tasks_declared: bool = False
    #: The file of each task that is not in ``source`` (the YAML tasks file's), by task id, so
    #: that a problem of that task names the file it is in.
    task_files: dict[str, str] = msgspec.field(default_factory=dict)

    def data_dir(self) -> Path:
        if self.kernel.data_dir:
            return Path(self.kernel.data_dir).expanduser()
        if env := os.environ.get("KERNEL_DATA_DIR"):
            return Path(env).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
        return Path(base) / "open-autoglm-kernel"

    def store_path(self) -> Path:
        if self.store.path:
            p = Path(self.store.path).expanduser()
            return p if p.is_absolute() else self.data_dir() / p
        return self.data_dir() / "kernel.sqlite3"

    def task(self, task_id: str) -> TaskConfig | None:
        return next((t for t in self.tasks if t.id == task_id), None)


def secs(value: float | str | None) -> float | None:
    """A duration field after decoding (decoding turns every duration into float seconds)."""
    return None if value is None else float(value)


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "kernel": KernelSection,
    "server": ServerSection,
    "store": StoreSection,
    "scheduler": SchedulerSection,
    "fleet": FleetSection,
    "python": PythonSettings,
}


def _convert(
    raw: dict[str, Any], typ: type[msgspec.Struct], file: str, where: str, issues: list[ConfigIssue]
) -> Any:
    """Convert ``raw`` into ``typ``; on each error note it, drop the field and try again."""
    data = dict(raw)
    dropped: set[str] = set()
    for _ in range(64):
        try:
            return msgspec.convert(data, typ, strict=False)
        except msgspec.ValidationError as exc:
            msg = str(exc)
            m = re.search(r"unknown field `([^`]+)`", msg)
            if m:
                field = m.group(1)
                valid = ", ".join(typ.__struct_fields__)
                issues.append(ConfigIssue(file, f"{where}.{field}", f"unknown field (valid: {valid})"))
                data.pop(field, None)
                continue
            m = re.search(r" - at `\$\.([A-Za-z0-9_]+)", msg)
            field = m.group(1) if m else None
            if field is not None and field in data:
                text = msg.split(" - at ")[0]
                issues.append(ConfigIssue(file, f"{where}.{field}", _explain(typ, field, text)))
                data.pop(field)
                dropped.add(field)
                continue
            m = re.match(r"([a-z_]+): (.*)", msg)
            if m and (m.group(1) in data or m.group(1) in typ.__struct_fields__):
                name = m.group(1)  # a __post_init__ check, maybe of a field left at its default
                if name not in dropped:
                    issues.append(ConfigIssue(file, f"{where}.{name}", m.group(2)))
                if name not in data:
                    return None
                data.pop(name)
                dropped.add(name)
                continue
            if "missing required field" in msg:
                m = re.search(r"`([^`]+)`", msg)
                name = m.group(1) if m else "?"
                if name not in dropped:
                    issues.append(ConfigIssue(file, f"{where}.{name}", "missing required field"))
                return None
            issues.append(ConfigIssue(file, where, msg))
            return None
    return None


def _explain(typ: type[msgspec.Struct], field: str, text: str) -> str:
    ann = typ.__annotations__.get(field)
    enum_type = {"policy": Policy, "overlap": Overlap, "misfire": Misfire,
                 "gpu_unavailable": GpuUnavailable}.get(field)
    if enum_type is not None and "Invalid enum value" in text:
        return f"{text} (valid: {', '.join(e.value for e in enum_type)})"
    if ann is not None and "float | str" in str(ann):
        return f"{text} (valid: seconds, or a duration like '30s', '5m', '1h30m')"
    return text


def decode(raw: dict[str, Any], file: str) -> tuple[Config, list[ConfigIssue]]:
    """Decode a parsed TOML/YAML document; returns the config (with bad parts dropped) and issues."""
    issues: list[ConfigIssue] = []
    cfg = Config(source=file, blank=not raw, tasks_declared="tasks" in raw)
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                issues.append(ConfigIssue(file, f"[{key}]", "must be a table"))
                continue
            sec = _convert(value, _SECTIONS[key], file, f"[{key}]", issues)
            if sec is not None:
                setattr(cfg, key, sec)
        elif key == "tasks":
            if not isinstance(value, list):
                issues.append(ConfigIssue(file, "tasks", "must be an array of tables [[tasks]]"))
                continue
            for i, t in enumerate(value):
                label = f"tasks[{i}]"
                if isinstance(t, dict) and isinstance(t.get("id"), str):
                    label = f"task {t['id']!r}"
                if not isinstance(t, dict):
                    issues.append(ConfigIssue(file, label, "must be a table"))
                    continue
                task = _convert(t, TaskConfig, file, label, issues)
                if task is not None:
                    cfg.tasks.append(task)
        elif key == "plugins":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                issues.append(ConfigIssue(file, "[plugins]", "must hold one table per plugin"))
                continue
            cfg.plugins = value
        else:
            issues.append(ConfigIssue(
                file, f"[{key}]",
                f"unknown section (valid: {', '.join(_SECTIONS)}, tasks, plugins)"))
    seen: set[str] = set()
    for t in cfg.tasks:
        if t.id in seen:
            issues.append(ConfigIssue(file, f"task {t.id!r}", "duplicate task id"))
        seen.add(t.id)
    return cfg, issues


def default_config_text() -> str:
    return (Path(__file__).parent / DEFAULT_CONFIG_NAME).read_text("utf-8")


def parse_text(text: str, file: str) -> tuple[Config, list[ConfigIssue]]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Config(source=file), [ConfigIssue(file, "syntax", f"not valid TOML: {exc}")]
    return decode(raw, file)


def parse_seed_yaml(text: str, file: str) -> tuple[list[TaskConfig], list[ConfigIssue]]:
    """The seed's format: ``tasks: [{id, schedule, action, enabled}, ...]``."""
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [], [ConfigIssue(file, "syntax", f"not valid YAML: {exc}")]
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
        return [], [ConfigIssue(file, "tasks", "expected a mapping with a 'tasks:' list")]
    cfg, issues = decode({"tasks": raw["tasks"]}, file)
    return cfg.tasks, issues


def read_text(path: Path) -> str:
    """A config file's text; raises ConfigError naming the file when it cannot be read or is
    not UTF-8 (with the byte offset, line and column of the first undecodable byte). A UTF-8
    byte order mark is skipped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), "-", f"cannot read: {exc.strerror}")]) from None
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = data.count(b"\n", 0, at) + 1
        column = at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise ConfigError([ConfigIssue(
            str(path), "-",
            f"not UTF-8 text: byte 0x{data[at]:02x} at offset {at} (line {line}, column "
            f"{column}) cannot be decoded (valid: a UTF-8 encoded file; re-save it as UTF-8, "
            "e.g. `iconv -f LATIN1 -t UTF-8`)")]) from None


def load(path: Path | None = None, *, tasks_file: Path | None = None) -> Config:
    """Load and decode a config; raises ConfigError listing every decoding problem."""
    cfg, issues = load_partial(path, tasks_file=tasks_file)
    if issues:
        raise ConfigError(issues)
    return cfg


def load_partial(path: Path | None = None, *,
                 tasks_file: Path | None = None) -> tuple[Config, list[ConfigIssue]]:
    """Load and decode a config: what decoded (bad fields, tasks and sections dropped) and
    every decoding problem, so that a caller can check the rest too and report all at once.

    :raises ConfigError: a file cannot be read or is not UTF-8 (nothing to decode).
    """
    if path is None:
        text, file = default_config_text(), "<embedded default config.toml>"
    else:
        text, file = read_text(path), str(path)
    cfg, issues = parse_text(text, file)
    if tasks_file is not None:
        ytext = read_text(tasks_file)
        extra, more = parse_seed_yaml(ytext, str(tasks_file))
        issues += more
        cfg.tasks_declared = True  # the YAML file must hold a `tasks:` list (else an issue)
        known = {t.id for t in cfg.tasks}
        for t in extra:
            if t.id in known:
                issues.append(ConfigIssue(str(tasks_file), f"task {t.id!r}",
                                          f"duplicate task id (also in {file})"))
            else:
                cfg.task_files[t.id] = str(tasks_file)
            cfg.tasks.append(t)
    return cfg, issues
