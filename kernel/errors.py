"""One error root for the kernel, and the catalogue of error codes.

Every failure the kernel reports carries a stable code (``ERR_*``) whose meaning and remedy live
in :data:`CATALOGUE`; ``python -m kernel explain CODE`` prints an entry and the README's
troubleshooting section is generated from the same table.

The tree::

    KernelError                      root: everything the kernel raises on purpose
    ├── ConfigError                  a config file (or schedule) is wrong; lists every issue found
    │   └── CronError                one cron / interval expression is wrong (field, value, valid)
    ├── StoreError                   the store failed (translated from sqlite3 / aiosqlite)
    │   ├── StoreLocked
    │   ├── StoreReadOnly
    │   ├── StoreFull
    │   └── StoreCorrupt
    ├── SubmitError                  a submission was refused; nothing was acknowledged
    │   ├── QueueFull
    │   ├── ActionNotFound
    │   ├── BadPayload
    │   └── GpuUnavailable
    ├── PluginError                  a plugin failed to load or registered something invalid
    └── ActionError                  raised by actions to report a classified failure
        └── Retry                    control flow: "run me again after `delay` seconds"
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorCode(enum.StrEnum):
    ERR_TIMEOUT = "ERR_TIMEOUT"
    ERR_CANCELLED = "ERR_CANCELLED"
    ERR_ABANDONED = "ERR_ABANDONED"
    ERR_SUPERSEDED = "ERR_SUPERSEDED"
    ERR_ACTION_FAILED = "ERR_ACTION_FAILED"
    ERR_ACTION_NOT_FOUND = "ERR_ACTION_NOT_FOUND"
    ERR_BAD_PAYLOAD = "ERR_BAD_PAYLOAD"
    ERR_EXEC_FAILED = "ERR_EXEC_FAILED"
    ERR_MEMORY_LIMIT = "ERR_MEMORY_LIMIT"
    ERR_WORKER_DIED = "ERR_WORKER_DIED"
    ERR_CONN_TIMEOUT = "ERR_CONN_TIMEOUT"
    ERR_AUTH_FAILED = "ERR_AUTH_FAILED"
    ERR_MODEL_NOT_FOUND = "ERR_MODEL_NOT_FOUND"
    ERR_OVERLOADED = "ERR_OVERLOADED"
    ERR_CONTEXT_TOO_LONG = "ERR_CONTEXT_TOO_LONG"
    ERR_BAD_RESPONSE = "ERR_BAD_RESPONSE"
    ERR_QUEUE_FULL = "ERR_QUEUE_FULL"
    ERR_GPU_UNAVAILABLE = "ERR_GPU_UNAVAILABLE"
    ERR_DEPENDENCY_FAILED = "ERR_DEPENDENCY_FAILED"
    ERR_RETRIES_EXHAUSTED = "ERR_RETRIES_EXHAUSTED"
    ERR_SKIPPED_OVERLAP = "ERR_SKIPPED_OVERLAP"
    ERR_MISFIRE_SKIPPED = "ERR_MISFIRE_SKIPPED"
    ERR_RECOVERED = "ERR_RECOVERED"
    ERR_CONFIG_INVALID = "ERR_CONFIG_INVALID"
    ERR_CRON_INVALID = "ERR_CRON_INVALID"
    ERR_PLUGIN_LOAD = "ERR_PLUGIN_LOAD"
    ERR_STORE_UNAVAILABLE = "ERR_STORE_UNAVAILABLE"
    ERR_STORE_LOCKED = "ERR_STORE_LOCKED"
    ERR_STORE_READONLY = "ERR_STORE_READONLY"
    ERR_STORE_FULL = "ERR_STORE_FULL"
    ERR_STORE_CORRUPT = "ERR_STORE_CORRUPT"
    ERR_STORE_WAL_LOST = "ERR_STORE_WAL_LOST"
    ERR_NOT_FOUND = "ERR_NOT_FOUND"
    ERR_BAD_REQUEST = "ERR_BAD_REQUEST"
    ERR_UNAUTHORIZED = "ERR_UNAUTHORIZED"
    ERR_FORBIDDEN_ORIGIN = "ERR_FORBIDDEN_ORIGIN"
    ERR_UNSUPPORTED_MEDIA_TYPE = "ERR_UNSUPPORTED_MEDIA_TYPE"
    ERR_SHUTTING_DOWN = "ERR_SHUTTING_DOWN"
    ERR_INTERNAL = "ERR_INTERNAL"
    ERR_USAGE = "ERR_USAGE"
    ERR_UNREACHABLE = "ERR_UNREACHABLE"


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    code: ErrorCode
    meaning: str
    remedy: str
    retryable: bool = False


def _e(code: ErrorCode, meaning: str, remedy: str, retryable: bool = False) -> CatalogueEntry:
    return CatalogueEntry(code, meaning, remedy, retryable)


C = ErrorCode
CATALOGUE: dict[ErrorCode, CatalogueEntry] = {
    e.code: e
    for e in (
        _e(C.ERR_TIMEOUT, "The run took longer than its timeout and was cancelled "
           "(exec children get SIGTERM, then SIGKILL for the whole process group).",
           "Raise the task's `timeout` (or `[scheduler] timeout_sec`), or make the action faster."),
        _e(C.ERR_CANCELLED, "The run was cancelled: by a user (DELETE /jobs/{id}), by an overlap "
           "policy (`cancel_other`), or by shutdown after the grace period.",
           "Nothing to fix if intended; raise `[kernel] shutdown_grace` for long runs."),
        _e(C.ERR_ABANDONED, "The run was cancelled (time-out, request, overlap, shutdown) and "
           "did not stop within the cancel grace (5 s): the kernel freed its slot, recorded it "
           "and ignores whatever it does next.",
           "Fix the action: it must let asyncio.CancelledError propagate (not swallow it), and "
           "must not block the event loop; run blocking Python code as a `python` action "
           "(worker process) or in a thread."),
        _e(C.ERR_SUPERSEDED, "Fleet mode: this kernel lost the job before it could start or "
           "record it (its heartbeat lapsed and another kernel rescued the job, or it was "
           "cancelled meanwhile); the run is recorded as superseded and its follow-ups dropped.",
           "Nothing if it is rare; if frequent, look for kernels that stall longer than "
           "`[fleet] ttl` (loop stalls, database latency) or raise the TTL."),
        _e(C.ERR_ACTION_FAILED, "The action raised an exception that carried no more specific code.",
           "Read the run's error text (GET /runs/{trace_id} or `python -m kernel runs`)."),
        _e(C.ERR_ACTION_NOT_FOUND, "No installed plugin provides the named action.",
           "Check `python -m kernel plugins` for the actions there are; install the plugin "
           "that provides it, or fix the `action` name."),
        _e(C.ERR_BAD_PAYLOAD, "The payload does not match the action's payload schema.",
           "Compare the payload with the schema shown by `python -m kernel plugins --json`."),
        _e(C.ERR_EXEC_FAILED, "An `exec` child exited with a non-zero status or could not start.",
           "Run the command by hand with the same argv, cwd and environment; check its stderr "
           "in the run's error text."),
        _e(C.ERR_MEMORY_LIMIT, "A `python` action allocated more than its memory cap "
           "(`memory_mb` of the payload or `[python] memory_mb`; the worker's RLIMIT_DATA).",
           "Raise `memory_mb`, or make the target use less memory (stream, chunk)."),
        _e(C.ERR_WORKER_DIED, "The worker process running a `python` action died without an "
           "answer (a crash in native code, `os._exit`, the out-of-memory killer) or did not "
           "start; the next run gets a fresh worker.",
           "Run the target by hand (`python -c 'import mod; mod.fn()'`); check the kernel's "
           "log and `dmesg` for the out-of-memory killer."),
        _e(C.ERR_CONN_TIMEOUT, "A remote service (model server, SMTP, webhook) refused the "
           "connection or did not answer in time.",
           "Check that the server runs and `base_url` is right; this failure is retried.", True),
        _e(C.ERR_AUTH_FAILED, "The remote service rejected the credentials (401/403).",
           "Set the environment variable named by `api_key_env` (or the SMTP password variable)."),
        _e(C.ERR_MODEL_NOT_FOUND, "The model server does not serve the requested model (404).",
           "List the served models at `<base_url>/models` and fix `model`."),
        _e(C.ERR_OVERLOADED, "The remote service is overloaded (429/503).",
           "Nothing: it is retried with backoff. Lower the endpoint's concurrency if it persists.",
           True),
        _e(C.ERR_CONTEXT_TOO_LONG, "The prompt is longer than the model's context window.",
           "Shorten the input (preprocess `chunk_tokens`) or lower `max_tokens`."),
        _e(C.ERR_BAD_RESPONSE, "The model server sent an answer the plugin cannot read: a body "
           "that is not the expected JSON (retried), or a streamed (SSE) line longer than "
           "`[plugins.inference] sse_max_line_bytes`, 8 MiB by default (not retried: the same "
           "request gets the same line). The message names the endpoint and the limit.",
           "Check that `base_url` points at an OpenAI-compatible server; for a long line raise "
           "`sse_max_line_bytes` or set `stream = false`."),
        _e(C.ERR_QUEUE_FULL, "The ready queue holds `[scheduler] queue_depth` jobs; the submission "
           "was refused and nothing was stored.",
           "Retry later, raise `queue_depth`, or raise `max_concurrency`.", True),
        _e(C.ERR_GPU_UNAVAILABLE, "The job declares `gpu_memory_mb` but no GPU (or NVML) is "
           "available, or it can never fit on the card.",
           "Run on a machine with an NVIDIA GPU and driver, or lower `gpu_memory_mb`."),
        _e(C.ERR_DEPENDENCY_FAILED, "An upstream task in `after` failed, so this run was skipped.",
           "Fix the upstream task; its run carries the same trace id."),
        _e(C.ERR_RETRIES_EXHAUSTED, "The run failed with a retryable error on every attempt.",
           "Read the last attempt's error; raise `retry.max_attempts` if the service is flaky."),
        _e(C.ERR_SKIPPED_OVERLAP, "An occurrence came due while a previous run was still going "
           "and the task's overlap policy said to skip it.",
           "Choose another `overlap` policy (buffer_one, buffer_all, cancel_other, allow_all)."),
        _e(C.ERR_MISFIRE_SKIPPED, "Occurrences were missed while the kernel was down, and the "
           "task's misfire policy did not run them.",
           "Use `misfire = \"catch_up\"` or `\"coalesce\"`, or raise `misfire_grace_sec`."),
        _e(C.ERR_RECOVERED, "The job was running when the kernel stopped abruptly; it is run "
           "again (at least once) with its attempt number raised.",
           "Nothing; make actions idempotent (they receive KERNEL_JOB_ID and the attempt)."),
        _e(C.ERR_CONFIG_INVALID, "The configuration file is not valid: the message names the "
           "file, the field and what would be valid.",
           "Fix the file and check it with `python -m kernel validate --config PATH`."),
        _e(C.ERR_CRON_INVALID, "A schedule expression is not valid or can never fire.",
           "Preview it with `python -m kernel cron 'EXPR'`; the message names the field and its "
           "valid range."),
        _e(C.ERR_PLUGIN_LOAD, "A plugin's entry point failed to import, rejected its settings or "
           "registered an invalid action, or implements a hook that does not exist. The other "
           "plugins still load and the kernel starts; `validate` and the start-up log report it "
           "under `[plugins.NAME]` (a task using one of its actions is an error).",
           "Fix `[plugins.NAME]` as the message says, or reinstall the plugin (`pip install -e "
           "plugins/NAME`); `python -m kernel plugins` lists the problems."),
        _e(C.ERR_STORE_UNAVAILABLE, "The database could not be opened or written.",
           "SQLite: check `[store] path`, its directory's permissions and free space. "
           "PostgreSQL: check that the server named by `[store] dsn` is up and reachable from "
           "this box, and the user's password (~/.pgpass or PGPASSWORD) and rights.", True),
        _e(C.ERR_STORE_LOCKED, "Another process holds a lock on the database.",
           "Stop the other kernel using the same `[store] path`, or give this one its own path.",
           True),
        _e(C.ERR_STORE_READONLY, "The database file or its directory is read-only; submissions "
           "are refused rather than acknowledged and lost.",
           "Make the file and directory writable by the kernel's user."),
        _e(C.ERR_STORE_FULL, "The disk holding the database is full; submissions are refused.",
           "Free disk space or lower run-history retention (`[store] history_max_rows`).", True),
        _e(C.ERR_STORE_CORRUPT, "The database file is not a valid SQLite database, or its schema "
           "is newer than this kernel.",
           "Move the file aside (the kernel never deletes it) and start again, or upgrade."),
        _e(C.ERR_STORE_WAL_LOST, "The database was not closed cleanly (the kernel was killed or "
           "crashed) and its write-ahead log (`<db>-wal`) was deleted since: the commits that "
           "were only in it (acknowledged jobs, run results) are lost; the log line counts them.",
           "Never delete the `-wal`/`-shm` files of a database that is not closed; restore them "
           "from a backup if there is one, else resubmit what was acknowledged before the crash."),
        _e(C.ERR_NOT_FOUND, "The job, task or run asked for does not exist.",
           "List what exists with `python -m kernel jobs|tasks|runs`."),
        _e(C.ERR_BAD_REQUEST, "The HTTP request is malformed: the error names the field.",
           "Compare the request with /openapi.json."),
        _e(C.ERR_UNAUTHORIZED, "The HTTP API needs a bearer token: on loopback the one in "
           "`<data_dir>/api.token` (the CLI and TUI read it), else `$KERNEL_API_TOKEN`.",
           "Send `Authorization: Bearer <token>`; as another user, ask the kernel's owner."),
        _e(C.ERR_FORBIDDEN_ORIGIN, "The request came from a web page (a cross-site `Origin` or "
           "`Sec-Fetch-Site`) or named a foreign `Host` (DNS rebinding); the API serves local "
           "clients, not browsers.",
           "Call the API from the CLI, a script or curl at 127.0.0.1/localhost, not a browser."),
        _e(C.ERR_UNSUPPORTED_MEDIA_TYPE, "A request body was sent without "
           "`Content-Type: application/json` (HTTP 415).",
           "Send the JSON body with `Content-Type: application/json` (`curl --json`)."),
        _e(C.ERR_SHUTTING_DOWN, "The kernel is stopping and accepts no new work.",
           "Submit again once it has restarted.", True),
        _e(C.ERR_INTERNAL, "A bug in the kernel: an unexpected exception was caught at a boundary.",
           "Report it with the log line that carries the traceback."),
        _e(C.ERR_USAGE, "The command line is wrong: an unknown option, a missing or malformed "
           "argument (exit status 2).",
           "Read `autoglm-kernel COMMAND --help`: every command lists its options and examples."),
        _e(C.ERR_UNREACHABLE, "A CLI command could not reach the kernel's HTTP API (nothing "
           "listens at the URL, or it did not answer in time).",
           "Start the kernel, or point `--url` / `$KERNEL_URL` at it (default "
           "http://127.0.0.1:8765).", True),
    )
}
del C


class KernelError(Exception):
    """Root of every error the kernel raises on purpose."""

    code: ErrorCode = ErrorCode.ERR_INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: where (file, task id or field path) and what is wrong.

    A ``warning`` does not stop the kernel (e.g. a disabled task names an action that is not
    installed); an ``error`` does."""

    file: str
    where: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.file}: {self.where}: {tag}{self.message}"


class ConfigError(KernelError):
    code = ErrorCode.ERR_CONFIG_INVALID

    def __init__(self, issues: list[ConfigIssue] | str) -> None:
        if isinstance(issues, str):
            issues = [ConfigIssue("<config>", "-", issues)]
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


class CronError(KernelError):
    """An invalid schedule expression; ``field`` names the field and ``valid`` what it accepts."""

    code = ErrorCode.ERR_CRON_INVALID

    def __init__(self, expr: str, field: str, problem: str, valid: str = "") -> None:
        self.expr = expr
        self.field = field
        self.problem = problem
        self.valid = valid
        text = f"invalid schedule {expr!r}: {field}: {problem}"
        if valid:
            text += f" (valid: {valid})"
        super().__init__(text)


class StoreError(KernelError):
    code = ErrorCode.ERR_STORE_UNAVAILABLE


class StoreLocked(StoreError):
    code = ErrorCode.ERR_STORE_LOCKED


class StoreReadOnly(StoreError):
    code = ErrorCode.ERR_STORE_READONLY


class StoreFull(StoreError):
    code = ErrorCode.ERR_STORE_FULL


class StoreCorrupt(StoreError):
    code = ErrorCode.ERR_STORE_CORRUPT


class SubmitError(KernelError):
    code = ErrorCode.ERR_BAD_PAYLOAD


class QueueFull(SubmitError):
    code = ErrorCode.ERR_QUEUE_FULL


class ActionNotFound(SubmitError):
    code = ErrorCode.ERR_ACTION_NOT_FOUND


class BadPayload(SubmitError):
    code = ErrorCode.ERR_BAD_PAYLOAD


class GpuUnavailable(SubmitError):
    code = ErrorCode.ERR_GPU_UNAVAILABLE


class Superseded(KernelError):
    """Fleet mode: the job is no longer this kernel's (rescued by another, or cancelled)."""

    code = ErrorCode.ERR_SUPERSEDED


class NotFound(KernelError):
    code = ErrorCode.ERR_NOT_FOUND


class ShuttingDown(KernelError):
    code = ErrorCode.ERR_SHUTTING_DOWN


class PluginError(KernelError):
    code = ErrorCode.ERR_PLUGIN_LOAD


class ActionError(KernelError):
    """Raised by an action to report a failure with a specific code.

    ``retryable`` says whether the task's retry policy may run it again; by default it follows
    the catalogue entry of the code.
    """

    code = ErrorCode.ERR_ACTION_FAILED

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, retryable: bool | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retryable = CATALOGUE[self.code].retryable if retryable is None else retryable


class Retry(ActionError):
    """Control flow: the action asks to be run again after ``delay`` seconds (arq's ``Retry``)."""

    def __init__(self, delay: float | None = None, message: str = "retry requested", *,
                 code: ErrorCode = ErrorCode.ERR_ACTION_FAILED) -> None:
        super().__init__(message, code=code, retryable=True)
        self.delay = delay


def explain(code: str) -> CatalogueEntry:
    """The catalogue entry for ``code`` (case-insensitive, ``ERR_`` prefix optional)."""
    key = code.strip().upper()
    if not key.startswith("ERR_"):
        key = "ERR_" + key
    try:
        return CATALOGUE[ErrorCode(key)]
    except ValueError:
        raise NotFound(
            f"unknown error code {code!r}; known codes: {', '.join(c.value for c in ErrorCode)}"
        ) from None
