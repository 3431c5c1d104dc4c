"""POST/GET/DELETE /jobs and GET /runs against a live kernel on a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernel.records import JobState, Outcome, RunQuery
from kernel.store.base import Store
from kernel.store.memory import MemoryStore
from kernel.store.sqlite import SqliteStore

from .conftest import CONFIG, T0, T0_ISO, Api, serve


async def test_submit_is_201_and_the_job_is_in_the_store(api: Api) -> None:
    r = await api.call("POST", "/jobs", {"action": "rec", "payload": {"n": 1}, "delay": 30,
                                         "priority": 5, "timeout": 9})
    assert r.status == 201, r
    assert set(r.body) == {"id", "due_at", "trace_id", "existed"}
    assert r.body["due_at"] == "2026-01-01T00:00:30+00:00"
    assert r.headers["Location"] == f"/jobs/{r.body['id']}"
    job = await api.kernel.store.get_job(r.body["id"])
    assert job is not None and job.state is JobState.PENDING
    assert (job.payload, job.priority, job.timeout, job.due_at) == ({"n": 1}, 5, 9.0, T0 + 30)
    got = await api.call("GET", f"/jobs/{job.id}")
    assert got.status == 200
    assert got.body["state"] == "pending" and got.body["trace_id"] == r.body["trace_id"]


async def test_submit_at_an_iso_instant_and_with_a_traceparent(api: Api) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = await api.call("POST", "/jobs", {"action": "rec", "at": "2026-01-01T01:00:00+01:00"},
                       headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert r.status == 201, r
    assert r.body["due_at"] == T0_ISO and r.body["trace_id"] == trace


async def test_the_job_runs_and_its_run_is_history(api: Api) -> None:
    r = await api.call("POST", "/jobs", {"action": "rec", "payload": {"result": "fine"}})
    await api.idle()
    assert [c.job_id for c in api.h.rec.calls] == [r.body["id"]]
    done = await api.call("GET", f"/jobs/{r.body['id']}")  # finished: its outcome, not 404
    assert done.status == 200 and done.body["state"] == "done", done
    runs = await api.call("GET", f"/runs/{r.body['trace_id']}")
    assert runs.status == 200
    [run] = runs.body["runs"]
    assert (run["job_id"], run["outcome"], run["detail"]) == (r.body["id"], "succeeded", "fine")


async def test_dedup_key_answers_200_with_the_first_id(api: Api) -> None:
    body = {"action": "rec", "delay": 60, "dedup_key": "report-2026-01-01"}
    first = await api.call("POST", "/jobs", body)
    second = await api.call("POST", "/jobs", {**body, "payload": {"other": True}})
    assert (first.status, second.status) == (201, 200)
    assert second.body["id"] == first.body["id"] and second.body["existed"] is True
    assert len(await api.kernel.store.list_jobs()) == 1


BAD: list[tuple[Any, int, str, str | None]] = [
    ({"action": "nope"}, 400, "ERR_ACTION_NOT_FOUND", "action"),
    ({"action": "exec", "payload": {}}, 400, "ERR_BAD_PAYLOAD", "payload.argv"),
    ({"action": "exec", "payload": {"argv": "ls"}}, 400, "ERR_BAD_PAYLOAD", "payload.argv"),
    ({"action": "exec", "payload": {"argv": []}}, 400, "ERR_BAD_PAYLOAD", "payload"),
    ({"action": "exec", "payload": {"argv": ["ls"], "shell": True}}, 400, "ERR_BAD_PAYLOAD",
     "payload.shell"),
    ({"action": "log", "delay": 5, "at": T0_ISO}, 400, "ERR_BAD_REQUEST", "at"),
    ({"action": "log", "at": "yesterday"}, 400, "ERR_BAD_REQUEST", "at"),
    ({"action": "log", "at": "9999-12-31T23:59:59Z"}, 400, "ERR_BAD_REQUEST", "at"),
    ({"action": "log", "priority": "high"}, 400, "ERR_BAD_REQUEST", "priority"),
    ({"action": "log", "priority": 2**70}, 400, "ERR_BAD_REQUEST", "priority"),
    ({"action": "log", "delay": -1}, 400, "ERR_BAD_REQUEST", "delay"),
    ({"action": "log", "delay": 1e300}, 400, "ERR_BAD_REQUEST", "delay"),
    ({"action": "log", "timeout": 0}, 400, "ERR_BAD_REQUEST", "timeout"),
    ({"action": "log", "payload": []}, 400, "ERR_BAD_REQUEST", "payload"),
    ({"action": "log", "colour": "red"}, 400, "ERR_BAD_REQUEST", "colour"),
    ({"action": ""}, 400, "ERR_BAD_REQUEST", "action"),
    ({"payload": {}}, 400, "ERR_BAD_REQUEST", "action"),
    ([{"action": "log"}], 400, "ERR_BAD_REQUEST", None),
    (None, 400, "ERR_BAD_REQUEST", None),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD)
async def test_every_invalid_submission_is_4xx_with_code_and_field(
        api: Api, body: Any, status: int, code: str, field: str | None) -> None:
    r = await api.call("POST", "/jobs", body)
    assert r.status == status, r
    assert r.error["code"] == code
    assert r.error["field"] == field
    assert r.error["message"]
    assert await api.kernel.store.list_jobs() == []


@pytest.mark.parametrize("raw", [b"", b"{", b'{"action": "log",}', b"\xff\xfe", b"nul"])
async def test_malformed_json_is_400(api: Api, raw: bytes) -> None:
    r = await api.call("POST", "/jobs", data=raw)
    assert r.status == 400 and r.error["code"] == "ERR_BAD_REQUEST", r


async def test_a_body_over_max_body_bytes_is_413(api: Api) -> None:
    big = {"action": "log", "payload": {"message": "x" * 300_000}}
    r = await api.call("POST", "/jobs", big)
    assert r.status == 413 and r.error["code"] == "ERR_BAD_REQUEST", r
    chunked = await api.call("POST", "/jobs", data=None, headers={"Content-Type": "x"})
    assert chunked.status == 400


async def test_a_full_queue_is_429_and_nothing_is_stored(api: Api) -> None:
    # 2 slots, queue_depth 4: two block, four wait, the seventh is refused
    ids = []
    for _ in range(6):
        r = await api.call("POST", "/jobs", {"action": "rec", "payload": {"mode": "block"}})
        assert r.status == 201, r
        ids.append(r.body["id"])
        await api.idle()
    r = await api.call("POST", "/jobs", {"action": "rec", "payload": {"mode": "block"}})
    assert r.status == 429 and r.error["code"] == "ERR_QUEUE_FULL", r
    assert r.headers["Retry-After"] == "1"
    batch = await api.call("POST", "/jobs/batch", {"jobs": [{"action": "rec"}] * 2})
    assert batch.status == 429
    assert {j.id for j in await api.kernel.store.list_jobs()} == set(ids)
    # a delayed job does not need a queue slot now
    assert (await api.call("POST", "/jobs", {"action": "rec", "delay": 5})).status == 201


async def test_batch_is_all_or_nothing_and_names_the_bad_item(api: Api) -> None:
    ok = await api.call("POST", "/jobs/batch", {"jobs": [
        {"action": "rec", "delay": 10}, {"action": "log", "delay": 20, "dedup_key": "k"}]})
    assert ok.status == 201, ok
    assert [j["due_at"][-14:] for j in ok.body] == ["00:00:10+00:00", "00:00:20+00:00"]
    again = await api.call("POST", "/jobs/batch", {"jobs": [{"action": "log", "dedup_key": "k"}]})
    assert again.status == 200 and again.body[0]["id"] == ok.body[1]["id"]
    bad = await api.call("POST", "/jobs/batch", {"jobs": [
        {"action": "rec", "delay": 10}, {"action": "exec", "payload": {"argv": 1}}]})
    assert bad.status == 400 and bad.error["field"] == "jobs[1].payload.argv", bad
    typed = await api.call("POST", "/jobs/batch", {"jobs": [{"action": "rec"}, {"delay": 1}]})
    assert typed.error["field"] == "jobs[1].action", typed
    assert (await api.call("POST", "/jobs/batch", {"jobs": []})).error["field"] == "jobs"
    too_many = await api.call("POST", "/jobs/batch", {"jobs": [{"action": "rec"}] * 10_001})
    assert too_many.status == 400 and too_many.error["field"] == "jobs", too_many
    assert len(await api.kernel.store.list_jobs()) == 2


async def test_cancel_a_pending_and_a_running_job(api: Api) -> None:
    pending = (await api.call("POST", "/jobs", {"action": "rec", "delay": 60})).body["id"]
    r = await api.call("DELETE", f"/jobs/{pending}")
    assert r.status == 200 and r.body == {"id": pending, "cancelled": True, "was": "pending"}
    assert (await api.call("DELETE", f"/jobs/{pending}")).error["code"] == "ERR_NOT_FOUND"
    gone = await api.call("GET", f"/jobs/{pending}")
    assert gone.status == 200 and gone.body["state"] == "cancelled", gone
    await api.advance(61)
    assert pending not in {c.job_id for c in api.h.rec.calls}

    running = (await api.call("POST", "/jobs", {"action": "rec",
                                                "payload": {"mode": "block"}})).body["id"]
    await api.idle()
    assert (await api.call("GET", f"/jobs/{running}")).body["state"] == "running"
    r = await api.call("DELETE", f"/jobs/{running}")
    assert r.body["was"] == "running"
    # the answer says what really happened: the run stopped and was recorded as cancelled
    assert (r.body["cancelled"], r.body["outcome"], r.body["error_code"]) == (
        True, "cancelled", "ERR_CANCELLED"), r.body
    await api.idle()
    outcomes = await api.kernel.store.query_runs(RunQuery(outcome=Outcome.CANCELLED))
    assert {run.job_id for run in outcomes} == {pending, running}


async def test_list_jobs_with_filters(api: Api) -> None:
    for d in (30, 10, 20):
        await api.call("POST", "/jobs", {"action": "rec", "delay": d})
    r = await api.call("GET", "/jobs", params={"state": "pending", "limit": "2"})
    assert r.status == 200, r
    assert [j["due_at"][-14:-6] for j in r.body["jobs"]] == ["00:00:10", "00:00:20"]
    assert (r.body["limit"], r.body["offset"]) == (2, 0)
    r = await api.call("GET", "/jobs", params={"offset": "2"})
    assert len(r.body["jobs"]) == 1
    assert (await api.call("GET", "/jobs", params={"task": "tick"})).body["jobs"] == []
    for params, field in (({"state": "sleeping"}, "state"), ({"limit": "0"}, "limit"),
                          ({"limit": "x"}, "limit"), ({"offset": "-1"}, "offset"),
                          ({"colour": "red"}, "colour")):
        bad = await api.call("GET", "/jobs", params=params)
        assert bad.status == 400 and bad.error["field"] == field, (params, bad)


async def test_runs_query_filters(api: Api) -> None:
    await api.call("POST", "/jobs", {"action": "rec"})
    await api.idle()
    await api.advance(60)  # tick fires at T0+60, then after_tick in the same trace
    await api.advance(10)
    await api.call("POST", "/jobs", {"action": "rec", "payload": {"mode": "fail"}})
    await api.idle()
    everything = (await api.call("GET", "/runs")).body["runs"]
    assert [r["outcome"] for r in everything] == ["failed", "succeeded", "succeeded",
                                                 "succeeded"]

    async def runs(**params: str) -> list[dict[str, Any]]:
        r = await api.call("GET", "/runs", params=params)
        assert r.status == 200, r
        result: list[dict[str, Any]] = r.body["runs"]
        return result

    failed = await runs(outcome="failed")
    assert len(failed) == 1 and failed[0]["error_code"] == "ERR_ACTION_FAILED"
    assert [r["task_id"] for r in await runs(task="tick")] == ["tick"]
    assert len(await runs(since="2026-01-01T00:01:00Z")) == 3
    assert len(await runs(since=str(T0 + 60), until="2026-01-01T00:01:00.5+00:00")) == 2
    assert len(await runs(until=str(T0 + 1))) == 1
    assert len(await runs(limit="1", offset="1")) == 1
    tick = (await runs(task="tick"))[0]
    trace = (await api.call("GET", f"/runs/{tick['trace_id']}")).body["runs"]
    assert [r["task_id"] for r in trace] == ["tick", "after_tick"]
    assert (await api.call("GET", "/runs/" + "0" * 32)).error["code"] == "ERR_NOT_FOUND"
    for params, field in (({"since": "last tuesday"}, "since"), ({"outcome": "meh"}, "outcome"),
                          ({"until": "1e999"}, "until"), ({"limit": "1001"}, "limit")):
        bad = await api.call("GET", "/runs", params=params)
        assert bad.status == 400 and bad.error["field"] == field, (params, bad)


# ---------------------------------------------------------------------------------- deep JSON


def _nested(depth: int) -> bytes:
    return (b'{"action": "rec", "delay": 5, "payload": {"a": ' + b"[" * depth + b"]" * depth
            + b"}}")


@pytest.mark.parametrize("path", ["/jobs", "/jobs/batch", "/tasks", "/tasks/tick/trigger",
                                  "/tasks/tick/backfill"])
@pytest.mark.parametrize("depth", [1000, 100_000])
async def test_json_nested_too_deep_is_400_not_a_500(api: Api, path: str, depth: int) -> None:
    r = await api.call("POST", path, data=_nested(depth))
    assert r.status == 400, r
    assert r.error["code"] == "ERR_BAD_REQUEST" and "levels deep" in r.error["message"], r
    assert await api.kernel.store.list_jobs() == []


async def test_json_nesting_limit_is_64(api: Api) -> None:
    # _nested(d) is d + 2 levels deep: the body's object and the payload object around it
    assert (await api.call("POST", "/jobs", data=_nested(62))).status == 201
    assert (await api.call("POST", "/jobs", data=_nested(63))).status == 400
    brackets_in_text = b'{"action": "rec", "delay": 5, "payload": {"s": "' + b"[" * 500 + b'"}}'
    assert (await api.call("POST", "/jobs", data=brackets_in_text)).status == 201
    escaped = {"action": "rec", "delay": 5, "payload": {"s": '\\"' + "[" * 500 + '\\'}}
    assert (await api.call("POST", "/jobs", escaped)).status == 201


# ---------------------------------------------------------------------------------- finished


@pytest.fixture(params=["memory", "sqlite"])
async def both_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(
        tmp_path / "kernel.sqlite3")
    async with serve(store=store) as a:
        yield a


async def test_get_job_after_it_finished_gives_its_outcome_and_code(both_stores: Api) -> None:
    api = both_stores

    async def submit(body: dict[str, Any]) -> dict[str, Any]:
        r = await api.call("POST", "/jobs", body)
        assert r.status == 201, r
        out: dict[str, Any] = r.body
        return out

    ok = await submit({"action": "rec", "payload": {"result": "fine"}})
    failed = await submit({"action": "rec", "payload": {"mode": "fail", "message": "bad input",
                                                        "code": "ERR_BAD_PAYLOAD"}})
    cancelled = await submit({"action": "rec", "delay": 60})
    running = await submit({"action": "rec", "payload": {"mode": "block"}})
    assert (await api.call("DELETE", f"/jobs/{cancelled['id']}")).status == 200
    await api.idle()

    r = await api.call("GET", f"/jobs/{ok['id']}")
    assert r.status == 200, r
    assert {k: r.body[k] for k in ("id", "state", "outcome", "error_code", "detail", "trace_id",
                                   "finished_at", "attempt")} == {
        "id": ok["id"], "state": "done", "outcome": "succeeded", "error_code": None,
        "detail": "fine", "trace_id": ok["trace_id"], "finished_at": T0_ISO, "attempt": 1}
    r = await api.call("GET", f"/jobs/{failed['id']}")
    assert (r.body["state"], r.body["outcome"], r.body["error_code"]) == (
        "done", "failed", "ERR_BAD_PAYLOAD"), r
    assert "bad input" in r.body["detail"]
    r = await api.call("GET", f"/jobs/{cancelled['id']}")
    assert (r.body["state"], r.body["outcome"], r.body["error_code"]) == (
        "cancelled", "cancelled", "ERR_CANCELLED"), r
    r = await api.call("GET", f"/jobs/{running['id']}")  # still live: the job itself
    assert r.status == 200 and r.body["state"] == "running" and "payload" in r.body, r
    never = await api.call("GET", "/jobs/0123456789abcdef0123456789abcdef")
    assert never.status == 404 and never.error["code"] == "ERR_NOT_FOUND", never
    assert "never submitted" in never.error["message"]


async def test_a_retried_job_reports_its_own_attempt_and_the_retry_is_a_new_job() -> None:
    text = CONFIG + ('[[tasks]]\nid = "flaky"\naction = "rec"\npayload = { mode = "fail", '
                     'retryable = true }\nretry = { max_attempts = 2, initial_delay = "10s" }\n')
    async with serve(text) as api:
        r = await api.call("POST", "/tasks/flaky/trigger")
        await api.idle()
        first = await api.call("GET", f"/jobs/{r.body['id']}")
        assert (first.body["state"], first.body["outcome"], first.body["attempt"]) == (
            "done", "failed", 1), first
        [retry] = await api.kernel.store.list_jobs(task_id="flaky")
        assert retry.attempt == 2 and retry.trace_id == r.body["trace_id"]
        live = await api.call("GET", f"/jobs/{retry.id}")
        assert live.body["state"] == "pending" and live.body["kind"] == "retry", live


async def test_submit_declares_the_gpu_memory_a_job_needs(api: Api) -> None:
    """README "GPU admission": a submission may declare ``gpu_memory_mb`` (and pin ``gpu``);
    POST /jobs answered 400 "unknown field" for both."""
    r = await api.call("POST", "/jobs", {"action": "rec", "delay": 30, "gpu_memory_mb": 1000,
                                         "gpu": 0})
    assert r.status == 201, r
    job = await api.kernel.store.get_job(r.body["id"])
    assert job is not None and (job.gpu_memory_mb, job.gpu) == (1000, 0)
    bad = await api.call("POST", "/jobs", {"action": "rec", "gpu_memory_mb": -1})
    assert bad.status == 400 and "gpu_memory_mb" in str(bad.body), bad
