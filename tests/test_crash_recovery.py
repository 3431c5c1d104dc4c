"""Crash recovery with real parts: ``python -m kernel run`` as a subprocess on a real SQLite file,
jobs submitted over its HTTP API (with the bearer token from ``<data_dir>/api.token``), a cron
task firing every second (``misfire = "catch_up"``), and SIGKILL at moments chosen by
*conditions*, never by a timer:

1. while a ``POST /jobs/batch`` is in flight (its whole body written, its response not read);
2. while the snapshot shows runs in flight (held by the test) and jobs pending (not yet due);
3. as 2, then again while those runs are in flight as recoveries after the restart.

The action (:mod:`tests.crashprobe`, run in the kernel's worker processes) writes a line when
a run starts and one when it ends. From those lines, after the last restart:

* no acknowledged job is lost: each has a finished run;
* a batch in flight at the kill is all or nothing;
* only runs in flight at a kill run again, each time with a higher attempt, never the same
  attempt twice; jobs that were only pending run once, as attempt 1;
* every cron occurrence from the first recorded instant to the last ran exactly once (none lost,
  none doubled), except one in flight at a kill, which may run again as a recovery.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

TESTS = Path(__file__).resolve().parent
CRON = "every_second"
HELD_CRON = "held_every_second"  # a cron task whose runs the test holds in flight
BOUND = 60.0  # seconds any awaited condition may take on a loaded box before the test fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, out: Path, release: Path) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(f"""
[kernel]
data_dir = "{tmp / 'data'}"
shutdown_grace = "2s"
log_format = "json"
[store]
path = "{tmp / 'data' / 'kernel.sqlite3'}"
[scheduler]
max_concurrency = 16
queue_depth = 100000
[python]
workers = 6
[[tasks]]
id = "{CRON}"
schedule = "* * * * * *"
action = "python"
payload = {{ target = "crashprobe:record", kwargs = {{ out = "{out}", tag = "cron" }}, \
pass_context = true }}  # the cron runs get their context; the others read KERNEL_* variables
misfire = "catch_up"
max_catch_up = 1000
misfire_grace = "1h"
overlap = "buffer_all"  # an occurrence waiting for a worker is queued, never skipped
[[tasks]]
id = "{HELD_CRON}"
schedule = "* * * * * *"
action = "python"
payload = {{ target = "crashprobe:record", kwargs = {{ out = "{out}", tag = "held-cron", \
hold = "{release}" }} }}
""")
    return cfg


@dataclass(frozen=True)
class Line:
    kind: str       # S (started) or E (ended)
    job: str
    task: str
    sched: float
    attempt: int
    tag: str
    pid: int


def parse(out: Path) -> list[Line]:
    rows = []
    if out.exists():
        # a worker may be mid-line while we read: only complete lines count
        for text in out.read_text().split("\n")[:-1]:
            kind, job, task, sched, attempt, tag, pid = text.split()
            rows.append(Line(kind, job, task, float(sched), int(attempt), tag, int(pid)))
    return rows


def alive(pid: int) -> bool:
    """Whether the worker ``pid`` still runs (a zombie does not: it writes nothing more; a
    reused pid is not a kernel worker, whose command line sets ``sys.path``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"sys.path" in cmdline


async def until(what: str, cond: Callable[[], Awaitable[bool]] | Callable[[], bool],
                limit: float = BOUND) -> None:
    """Poll ``cond`` (sync or async) until it holds; fail naming ``what`` after ``limit`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        assert loop.time() < end, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


def spawn(cfg: Path, port: int, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "kernel", "run", "--config", str(cfg), "--port", str(port)],
            stdout=f, stderr=subprocess.STDOUT, env=env)


@dataclass
class Life:
    """One run of the kernel process, from start to SIGKILL (or the final SIGTERM)."""

    proc: subprocess.Popen[bytes]
    token: str = ""
    killed: bool = False
    lines_at_kill: list[Line] = field(default_factory=list)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.out = tmp / "runs.log"
        self.release = tmp / "release"
        self.cfg = write_config(tmp, self.out, self.release)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "kernel.log"
        self.lives: list[Life] = []
        self.acked: set[str] = set()
        self.session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------- process
    async def start(self) -> Life:
        env = {**os.environ,
               "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        life = Life(spawn(self.cfg, self.port, self.log, env))
        self.lives.append(life)
        if self.session is None:
            self.session = aiohttp.ClientSession()
        proc = life.proc

        async def healthy() -> bool:
            assert proc.poll() is None, f"the kernel exited during start-up:\n{self.tail()}"
            try:
                async with self.http.get(f"{self.url}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await until("the kernel to answer /healthz", healthy)
        life.token = (self.tmp / "data" / "api.token").read_text().strip()
        assert life.token, "the kernel wrote no token to <data_dir>/api.token"
        return life

    def kill(self) -> None:
        """SIGKILL the running kernel now; record what the action had written by then."""
        life = self.lives[-1]
        life.proc.send_signal(signal.SIGKILL)
        life.proc.wait()
        assert life.proc.returncode == -signal.SIGKILL
        life.killed = True

    async def settle_after_kill(self) -> None:
        """Wait until the dead kernel's workers are gone too (they die with it, via a socket
        only the kernel held), so the lines read now are all this life will ever write."""
        pids = {x.pid for x in parse(self.out)}
        await until("the killed kernel's workers to exit",
                    lambda: not any(alive(p) for p in pids), limit=30)
        self.lives[-1].lines_at_kill = parse(self.out)

    async def stop(self) -> None:
        life = self.lives[-1]
        if life.proc.poll() is None:
            life.proc.send_signal(signal.SIGTERM)
            try:
                life.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                life.proc.kill()
                life.proc.wait()
                raise AssertionError("the kernel did not stop on SIGTERM") from None

    async def close(self) -> None:
        for life in self.lives:
            if life.proc.poll() is None:
                life.proc.kill()
                life.proc.wait()
        if self.session is not None:
            await self.session.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    # ---------------------------------------------------------------- API
    @property
    def http(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.lives[-1].token}"}

    @staticmethod
    def job(tag: str, out: Path, *, delay: float = 0.0, hold: Path | None = None,
            work: float = 0.0) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"out": str(out), "tag": tag, "work": work}
        if hold is not None:
            kwargs["hold"] = str(hold)
        return {"action": "python", "delay": delay, "timeout": 300,
                "payload": {"target": "crashprobe:record", "kwargs": kwargs}}

    async def submit(self, jobs: list[dict[str, Any]]) -> list[str]:
        """Submit a batch; anything but 201 fails the test with the kernel's answer."""
        async with self.http.post(f"{self.url}/jobs/batch", json={"jobs": jobs},
                                  headers=self.auth) as r:
            text = await r.text()
            assert r.status == 201, f"POST /jobs/batch answered {r.status}: {text[:500]}"
        ids = [item["id"] for item in json.loads(text)]
        assert len(ids) == len(jobs), text[:500]
        self.acked.update(ids)
        return ids

    async def snapshot(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/snapshot", headers=self.auth) as r:
            text = await r.text()
            assert r.status == 200, f"GET /snapshot answered {r.status}: {text[:500]}"
        snap: dict[str, Any] = json.loads(text)["snapshot"]
        return snap

    async def send_batch_unanswered(
            self, jobs: list[dict[str, Any]]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Write a whole ``POST /jobs/batch`` request and return without reading the answer."""
        body = json.dumps({"jobs": jobs}).encode()
        head = (f"POST /jobs/batch HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {self.lives[-1].token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(head + body)
        await writer.drain()  # every byte is in the kernel's socket buffer or read by it
        return reader, writer

    # ---------------------------------------------------------------- conditions
    def started(self, ids: AbstractSet[str], attempt: int) -> bool:
        return ids <= {x.job for x in parse(self.out) if x.kind == "S" and x.attempt == attempt}

    def began(self, ids: AbstractSet[str]) -> bool:
        return ids <= {x.job for x in parse(self.out) if x.kind == "S"}

    def finished(self) -> set[str]:
        return {x.job for x in parse(self.out) if x.kind == "E"}

    async def all_acked_finished(self) -> None:
        try:
            await until("every acknowledged job to finish", lambda: self.acked <= self.finished())
        except AssertionError as e:
            lost = sorted(self.acked - self.finished())
            raise AssertionError(f"{e}: {len(lost)} never finished, e.g. {lost[:3]}") from None

    async def idle(self) -> bool:
        """Nothing is pending or queued, and only the cron task runs."""
        snap = await self.snapshot()
        others = [r for r in snap["running"] if r["task_id"] not in (CRON, HELD_CRON)]
        return snap["pending_jobs"] == 0 and snap["queued"] == 0 and not others

    async def cron_caught_up(self, since_wall: float) -> None:
        """Wait until the cron task's finished occurrences form an unbroken run of seconds from
        the first one ever recorded to one after ``since_wall`` (the last start)."""
        def contiguous() -> bool:
            ended = sorted({round(x.sched) for x in parse(self.out)
                            if x.kind == "E" and x.task == CRON})
            if not ended or ended[-1] < since_wall + 1:
                return False
            return ended == list(range(ended[0], ended[-1] + 1))
        await until("every cron occurrence since the first start to have run", contiguous)


# ==================================================================== the checks
def _attempts(lines: list[Line], task: str | None = None) -> dict[Any, list[int]]:
    """The attempts each run started with, in order: per job id, or (``task`` given) per
    scheduled second of that task's occurrences."""
    out: dict[Any, list[int]] = defaultdict(list)
    for x in lines:
        if x.kind == "S" and task is None:
            out[x.job].append(x.attempt)
        elif x.kind == "S" and x.task == task:
            out[round(x.sched)].append(x.attempt)
    return out


def check_history(h: Harness) -> dict[str, int]:
    """The invariants over the whole history (every life); returns figures for the log."""
    lines = parse(h.out)
    assert h.acked, "nothing was acknowledged"
    ended = {x.job for x in lines if x.kind == "E"}
    lost = h.acked - ended
    assert not lost, f"{len(lost)} acknowledged job(s) never finished: {sorted(lost)[:5]}"
    killed = [life.lines_at_kill for life in h.lives if life.killed]

    doubled: dict[tuple[str, Any], list[int]] = {}
    counts: dict[str, int] = {}
    for task in (None, CRON, HELD_CRON):  # every job; then each cron task's occurrences
        runs = _attempts(lines, task)
        counts[task or "jobs"] = len(runs)
        started = [set(_attempts(at_kill, task)) for at_kill in killed]
        for key, attempts in runs.items():
            # never the same attempt twice; each new run of it has a higher attempt
            assert attempts == sorted(set(attempts)), f"{task or 'job'} {key} ran as {attempts}"
            if len(attempts) > 1:
                # a second run only for a run in flight at a kill: started before it (its end,
                # if written, may not have been committed before the kill)
                assert any(key in st for st in started), (
                    f"{task or 'job'} {key} ran again ({attempts}) but had not started by a kill")
                if task is not None:
                    doubled[task, key] = attempts
        if task == CRON:  # every second, none lost (the held task skips while one is held)
            first, last = min(runs), max(runs)
            missing = sorted(set(range(first, last + 1)) - set(runs))
            assert not missing, f"cron occurrences lost: {missing} (of {first}..{last})"
    for at_kill in killed:  # a run in flight at a kill (cron ones too) ran again, to its end
        flying = {x.job for x in at_kill if x.kind == "S"} - {x.job for x in at_kill
                                                               if x.kind == "E"}
        assert not flying - ended, f"run(s) in flight at a kill never finished: {flying - ended}"
    assert len(doubled) <= 4 * len(killed), f"too many occurrences re-ran: {doubled}"
    return {"acked": len(h.acked), "occurrences": counts[CRON], "cron_reruns": len(doubled),
            "reruns": sum(1 for a in _attempts(lines).values() if len(a) > 1),
            "kills": len(killed)}


async def finish(h: Harness) -> dict[str, int]:
    """After the last start: wait for every acknowledged job, for the cron task to catch up,
    and for the queue to drain; stop with SIGTERM; run the checks."""
    since = [x for x in parse(h.out) if x.task == CRON]
    restart_wall = max((x.sched for x in since), default=0.0)
    await h.all_acked_finished()
    await h.cron_caught_up(restart_wall)
    await until("the queue to drain", h.idle)
    await h.stop()
    return check_history(h)


# ==================================================================== the scenarios
@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["body-written", "answer-begun"])
async def test_sigkill_during_a_batch_submission_keeps_it_all_or_nothing(
        tmp_path: Path, kill_at: str) -> None:
    """``body-written``: the kernel may or may not have read and committed the batch, so after
    the restart it is all there or not at all. ``answer-begun``: the kernel had begun its
    answer (it answers after the commit), so all of it must be there."""
    h = Harness(tmp_path)
    n = 500
    h.release.touch()  # nothing is held here
    try:
        await h.start()
        early = await h.submit([h.job("early", h.out, delay=i / 50) for i in range(200)])
        await until("some early jobs to finish and the cron task to fire twice", lambda: (
            len(set(early) & h.finished()) >= 20
            and len({x.sched for x in parse(h.out) if x.kind == "E" and x.task == CRON}) >= 2))
        reader, writer = await h.send_batch_unanswered([h.job("flying", h.out)
                                                        for _ in range(n)])
        if kill_at == "answer-begun":
            first = await asyncio.wait_for(reader.read(1), BOUND)
            assert first == b"H", first  # the status line has begun: the batch was committed
        h.kill()  # the condition: the whole request written (and, maybe, the answer begun)
        writer.close()
        await h.settle_after_kill()
        await h.start()
        figures = await finish(h)
    finally:
        await h.close()
    flying = {x.job for x in parse(h.out) if x.tag == "flying" and x.kind == "E"}
    expected = {n} if kill_at == "answer-begun" else {0, n}
    assert len(flying) in expected, f"{len(flying)} of the {n} jobs of the batch in flight ran"
    print(f"{kill_at}: batch {'committed' if flying else 'not committed'}; {figures}")


def held_cron_in_flight(h: Harness) -> list[list[int]]:
    """Per kill: the attempts of every held-cron occurrence in flight then, as they ran in the
    whole history (its first run, then its recoveries)."""
    lines = parse(h.out)
    out = []
    for life in h.lives:
        if life.killed:
            at = life.lines_at_kill
            flying = ({x.job for x in at if x.kind == "S" and x.task == HELD_CRON}
                      - {x.job for x in at if x.kind == "E"})
            out += [[x.attempt for x in lines if x.kind == "S" and x.job == j] for j in flying]
    return out


def cron_ended(h: Harness) -> set[float]:
    return {x.sched for x in parse(h.out) if x.kind == "E" and x.task == CRON}


async def hold_and_kill(h: Harness, held: int, pending: int,
                        recovered: AbstractSet[str] = frozenset()) -> set[str]:
    """Keep ``held`` new runs (and the ``recovered`` ones, as attempt 2) in flight and
    ``pending`` jobs waiting; kill when the snapshot shows all of them. Returns the held ids."""
    fired = len(cron_ended(h))
    held_ids = set(await h.submit([h.job("held", h.out, hold=h.release) for _ in range(held)]))
    await until("the held runs to start", lambda: h.started(held_ids, 1))
    await until("the recovered runs to start as attempt 2", lambda: h.started(recovered, 2))
    await until("the cron task to fire in this life", lambda: len(cron_ended(h)) > fired)
    await h.submit([h.job("pending", h.out, delay=3.0) for _ in range(pending)])

    async def all_at_once() -> bool:
        snap = await h.snapshot()
        running = {r["job_id"] for r in snap["running"]}
        held_cron = [r for r in snap["running"] if r["task_id"] == HELD_CRON]
        return (held_ids | recovered <= running and snap["pending_jobs"] >= pending
                and bool(held_cron) and h.began({r["job_id"] for r in held_cron}))
    await until("held runs, a held cron occurrence and pending jobs at once", all_at_once)
    h.kill()
    return held_ids


@pytest.mark.slow
async def test_sigkill_with_runs_in_flight_and_jobs_pending(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        await h.start()
        held = await hold_and_kill(h, 3, 50)
        await h.settle_after_kill()
        h.release.touch()
        await h.start()
        figures = await finish(h)
    finally:
        await h.close()
    starts: dict[str, list[int]] = defaultdict(list)
    for x in parse(h.out):
        if x.kind == "S" and x.task == "-":
            starts[x.job].append(x.attempt)
    assert {j for j, a in starts.items() if len(a) > 1} == held, "only the held runs re-ran"
    assert all(starts[j] == [1, 2] for j in held), {j: starts[j] for j in held}
    assert held_cron_in_flight(h) == [[1, 2]]  # the held occurrence, recovered once
    pending = {j for j, a in starts.items() if j not in held}
    assert all(starts[j] == [1] for j in pending)
    print(figures)


@pytest.mark.slow
async def test_sigkill_again_while_recovered_runs_are_in_flight(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        await h.start()
        held = await hold_and_kill(h, 3, 30)
        await h.settle_after_kill()
        await h.start()
        # the second life: the held runs are back as recoveries (attempt 2), still held
        second = await hold_and_kill(h, 1, 20, recovered=held)
        await h.settle_after_kill()
        h.release.touch()
        await h.start()
        figures = await finish(h)
    finally:
        await h.close()
    starts: dict[str, list[int]] = defaultdict(list)
    for x in parse(h.out):
        if x.kind == "S" and x.task == "-":
            starts[x.job].append(x.attempt)
    assert all(starts[j] == [1, 2, 3] for j in held), {j: starts[j] for j in held}
    assert all(starts[j] == [1, 2] for j in second), {j: starts[j] for j in second}
    # a held occurrence was in flight at each kill and ran again with a raised attempt (the one
    # of the first kill need not start again in the second life: the next occurrence may go
    # first, as the task allows one run at a time)
    flying = held_cron_in_flight(h)
    assert len(flying) >= 2 and all(len(a) >= 2 for a in flying), flying
    print(figures)


# ==================================================================== the checks can fail
def _history(tmp: Path, lines: list[str], *, at_kill: int) -> Harness:
    """A harness over a written history: one life killed after ``at_kill`` lines, then one
    stopped; the acknowledged jobs are the untagged ones."""
    h = Harness(tmp)
    h.out.write_text("".join(f"{x}\n" for x in lines))
    rows = parse(h.out)
    h.lives = [Life(cast("subprocess.Popen[bytes]", None), killed=True,
                    lines_at_kill=rows[:at_kill]),
               Life(cast("subprocess.Popen[bytes]", None))]
    h.acked = {x.job for x in rows if x.task == "-"}
    return h


GOOD = ["S c1 every_second 10.000 1 cron 1", "E c1 every_second 10.000 1 cron 1",
        "S j1 - 0.000 1 - 1", "S c2 every_second 11.000 1 cron 1",
        # the kill: j1 and c2 in flight; both run again as recoveries
        "S j1 - 0.000 2 - 2", "E j1 - 0.000 2 - 2",
        "S c2 every_second 11.000 2 cron 2", "E c2 every_second 11.000 2 cron 2",
        "S c3 every_second 12.000 1 cron 2", "E c3 every_second 12.000 1 cron 2",
        "S h1 held_every_second 12.000 1 held-cron 2", "E h1 held_every_second 12.000 1 held-cron 2"]


def test_the_history_checks_pass_a_good_history(tmp_path: Path) -> None:
    assert check_history(_history(tmp_path, GOOD, at_kill=4))["cron_reruns"] == 1


@pytest.mark.parametrize(("change", "message"), [
    (lambda g: [x for x in g if "c2" not in x], "cron occurrences lost: [11]"),
    (lambda g: [x.replace("j1 - 0.000 2", "j1 - 0.000 1") for x in g], "ran as [1, 1]"),
    (lambda g: [x for x in g if x != "E j1 - 0.000 2 - 2"], "never finished"),
    (lambda g: [*g, "S c3 every_second 12.000 2 cron 3"], "had not started by a kill"),
])
def test_the_history_checks_catch_a_bad_history(
        tmp_path: Path, change: Callable[[list[str]], list[str]], message: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_history(_history(tmp_path, change(GOOD), at_kill=4))
