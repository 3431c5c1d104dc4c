"""POST/GET/DELETE /jobs and GET /runs against a live kernel on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from kernel.records import JobState, Outcome, RunQuery

from .conftest import T0, T0_ISO, Api


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
    assert (await api.call("GET", f"/jobs/{r.body['id']}")).status == 404
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
    assert (await api.call("GET", f"/jobs/{pending}")).status == 404
    await api.advance(61)
    assert pending not in {c.job_id for c in api.h.rec.calls}

    running = (await api.call("POST", "/jobs", {"action": "rec",
                                                "payload": {"mode": "block"}})).body["id"]
    await api.idle()
    assert (await api.call("GET", f"/jobs/{running}")).body["state"] == "running"
    r = await api.call("DELETE", f"/jobs/{running}")
    assert r.body["was"] == "running"
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
