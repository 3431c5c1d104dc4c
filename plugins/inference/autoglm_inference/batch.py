"""Resumable JSONL batches: bounded concurrency, a checkpoint of answered ids, atomic output.

The checkpoint (``<output>.partial`` unless given) gets one line per answered request as soon
as the answer arrives: ``{"id": ..., "req": <hash of the request body>, "result": {...}}``.
A later run (the kernel's retry, a recovered job after a crash, or a manual rerun) reads it and
sends only the requests whose id *and* request hash are not there yet, so a changed prompt is
asked again. A torn last line (the process died mid-write) is dropped. When every request has
an answer, the output is written in input order through a temporary file and ``os.replace``,
and the checkpoint is removed.

A failure that would hit every request (connection, auth, unknown model, overload) stops the
batch: requests in flight finish and are checkpointed, and the error is raised so the kernel's
retry policy can run it again. A failure of one item only (context too long, a bad request) is
recorded as ``{"id": ..., "error": {"code", "message"}}`` unless ``on_item_error = "fail"``.

Progress: ``progress(done, total, note)`` (the run's ``ctx.progress``) is called when the batch
starts (``done`` = answers already in the checkpoint), then as answers arrive, at most about
``PROGRESS_STEPS`` times in all (every answer for a batch of up to that many, else every
``total / PROGRESS_STEPS``-th (rounded up)), and once when every request has an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kernel.errors import ActionError, ErrorCode
from kernel.files import atomic_write

PROGRESS_STEPS = 100  # reports of progress in a batch, about
ITEM_ERRORS = frozenset({ErrorCode.ERR_CONTEXT_TOO_LONG, ErrorCode.ERR_BAD_PAYLOAD})
CARRIED = ("source", "chunk")  # input fields copied into each answer


@dataclass(frozen=True, slots=True)
class Item:
    """One request of the batch: its id (as in the input), the body to send, its hash."""

    id: Any
    key: str
    body: dict[str, Any]
    req: str
    carry: dict[str, Any]


def request_hash(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line; raises ActionError naming the line."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ActionError(f"batch input not found: {path}", code=ErrorCode.ERR_BAD_PAYLOAD) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ActionError(f"cannot read batch input {path}: {exc}",
                          code=ErrorCode.ERR_BAD_PAYLOAD) from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ActionError(f"{path}:{n}: not a JSON line ({exc.msg})",
                              code=ErrorCode.ERR_BAD_PAYLOAD) from None
        if not isinstance(rec, dict):
            raise ActionError(f"{path}:{n}: each line must be a JSON object",
                              code=ErrorCode.ERR_BAD_PAYLOAD)
        out.append((n, rec))
    return out


def build_items(path: Path, records: list[tuple[int, dict[str, Any]]],
                make_body: Callable[[int, dict[str, Any]], dict[str, Any]]) -> list[Item]:
    items: list[Item] = []
    seen: dict[str, int] = {}
    for n, rec in records:
        rid = rec.get("id")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
            raise ActionError(f"{path}:{n}: `id` must be a non-empty string or an integer",
                              code=ErrorCode.ERR_BAD_PAYLOAD)
        key = json.dumps(rid)
        if key in seen:
            raise ActionError(f"{path}:{n}: duplicate id {rid!r} (first on line {seen[key]})",
                              code=ErrorCode.ERR_BAD_PAYLOAD)
        seen[key] = n
        body = make_body(n, rec)
        carry = {k: rec[k] for k in CARRIED if k in rec}
        items.append(Item(rid, key, body, request_hash(body), carry))
    return items


class Checkpoint:
    """The append-only file of answered requests (synchronous; call through a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] | None = None
        self._lock = threading.Lock()  # appends come from worker threads

    def load(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """``{id key: (request hash, result)}``; truncates a torn last line."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        done: dict[str, tuple[str, dict[str, Any]]] = {}
        good = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn: written without its newline
            try:
                rec = json.loads(data[pos:nl])
                done[json.dumps(rec["id"])] = (str(rec["req"]), dict(rec["result"]))
            except (ValueError, KeyError, TypeError):
                break  # a damaged line: keep what came before it
            pos = nl + 1
            good = pos
        if good != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return done

    def append(self, item: Item, result: dict[str, Any]) -> None:
        line = json.dumps({"id": item.id, "req": item.req, "result": result},
                          ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "ab")  # closed by close()
            self._f.write(line.encode() + b"\n")
            self._f.flush()  # in the OS's hands: survives the death of this process

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass(slots=True)
class BatchReport:
    total: int
    resumed: int
    answered: int
    errors: int
    output: Path

    def __str__(self) -> str:
        return (f"{self.total} request(s): {self.answered} answered now, {self.resumed} from the "
                f"checkpoint, {self.errors} item error(s) -> {self.output}")


def _write_output(path: Path, items: list[Item],
                  results: dict[str, dict[str, Any]]) -> None:
    lines = [json.dumps(results[it.key], ensure_ascii=False, separators=(",", ":"))
             for it in items]
    atomic_write(path, ("\n".join(lines) + "\n").encode() if lines else b"")


async def run_batch(
    items: list[Item],
    call: Callable[[Item], Awaitable[dict[str, Any]]],
    *,
    output: Path,
    checkpoint: Path,
    concurrency: int,
    on_item_error: str = "record",
    log: Any = None,
    progress: Callable[[float, float | None, str], None] | None = None,
) -> BatchReport:
    """Answer every item not already in the checkpoint with ``call``, ``concurrency`` at a
    time, then write ``output``. Raises the first batch-wide ActionError (see the module)."""
    ckpt = Checkpoint(checkpoint)
    done = await asyncio.to_thread(ckpt.load)
    results: dict[str, dict[str, Any]] = {}
    todo: list[Item] = []
    for it in items:
        prev = done.get(it.key)
        if prev is not None and prev[0] == it.req:
            results[it.key] = prev[1]
        else:
            todo.append(it)
    resumed = len(results)
    if log is not None and resumed:
        log.info("inference.batch: resuming, %d of %d already answered in %s",
                 resumed, len(items), checkpoint)
    errors = sum(1 for r in results.values() if "error" in r)
    failure: ActionError | None = None
    pending: Iterator[Item] = iter(todo)
    step = max(1, -(-len(items) // PROGRESS_STEPS))  # rounded up
    reported = -step

    def report(*, force: bool = False) -> None:
        nonlocal reported
        n = len(results)
        if progress is None or (n - reported < step and not force):
            return
        reported = n
        note = "requests"
        if errors:
            note += f", {errors} item error(s)"
        if resumed:
            note += f", {resumed} from the checkpoint"
        progress(n, len(items), note)

    report(force=True)

    async def worker() -> None:
        nonlocal failure, errors
        for it in pending:
            if failure is not None:
                return
            try:
                result = await call(it)
            except ActionError as exc:
                if exc.code in ITEM_ERRORS and on_item_error == "record":
                    result = {"id": it.id, **it.carry,
                              "error": {"code": exc.code.value, "message": exc.message}}
                    errors += 1
                else:
                    if failure is None:
                        failure = exc
                    return
            await asyncio.to_thread(ckpt.append, it, result)
            results[it.key] = result
            report()

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(concurrency, len(todo)) or 0):
                tg.create_task(worker())
    finally:
        await asyncio.to_thread(ckpt.close)
    if failure is not None:
        if log is not None:
            log.warning("inference.batch stopped after %d of %d (%s); the next run resumes "
                        "from %s", len(results), len(items), failure.code, checkpoint)
        raise failure
    if reported != len(results):
        report(force=True)
    await asyncio.to_thread(_write_output, output, items, results)
    await asyncio.to_thread(ckpt.remove)
    return BatchReport(total=len(items), resumed=resumed, answered=len(items) - resumed,
                       errors=errors, output=output)


def default_checkpoint(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def ensure_distinct(input_path: Path, output: Path) -> None:
    if os.path.abspath(input_path) == os.path.abspath(output):
        raise ActionError("batch `output` must differ from `input`",
                          code=ErrorCode.ERR_BAD_PAYLOAD)
