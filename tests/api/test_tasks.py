"""/tasks: list, pause, resume, trigger, backfill, and runtime add / replace / delete."""

from __future__ import annotations

from .conftest import T0, Api


def _task_calls(api: Api, task_id: str) -> list[float]:
    """The scheduled instants of the task's runs so far (0.0 for an unscheduled run)."""
    return [c.scheduled_at or 0.0 for c in api.h.rec.calls if c.task_id == task_id]


async def test_list_tasks(api: Api) -> None:
    r = await api.call("GET", "/tasks")
    assert r.status == 200
    tick, after = r.body["tasks"]
    assert (tick["id"], tick["schedule"], tick["description"]) == ("tick", "@every 60s",
                                                                   "every minute")
    assert tick["next_due"] == "2026-01-01T00:01:00+00:00" and not tick["paused"]
    assert (after["id"], after["after"], after["next_due"]) == ("after_tick", ["tick"], None)


async def test_pause_and_resume(api: Api) -> None:
    r = await api.call("POST", "/tasks/tick/pause")
    assert r.status == 200 and r.body["paused"] is True and r.body["next_due"] is None
    await api.advance(150)
    assert _task_calls(api, "tick") == []
    r = await api.call("POST", "/tasks/tick/resume")
    assert r.body["paused"] is False and r.body["next_due"] == "2026-01-01T00:03:00+00:00"
    await api.advance(30)
    assert _task_calls(api, "tick") == [T0 + 180]
    assert _task_calls(api, "after_tick") == [T0 + 180]
    for verb in ("pause", "resume", "trigger", "backfill"):
        nf = await api.call("POST", f"/tasks/ghost/{verb}", {"start": 0, "end": 1})
        assert nf.status == 404 and nf.error["code"] == "ERR_NOT_FOUND", (verb, nf)


async def test_trigger_runs_now_with_an_optional_payload(api: Api) -> None:
    plain = await api.call("POST", "/tasks/tick/trigger")
    assert plain.status == 201, plain
    custom = await api.call("POST", "/tasks/tick/trigger", {"payload": {"n": 7}})
    assert custom.status == 201
    await api.idle()
    calls = {c.job_id: c.payload for c in api.h.rec.calls if c.task_id == "tick"}
    assert calls == {plain.body["id"]: {}, custom.body["id"]: {"n": 7}}
    bad = await api.call("POST", "/tasks/tick/trigger", {"payload": 3})
    assert bad.status == 400 and bad.error["field"] == "payload", bad
    extra = await api.call("POST", "/tasks/tick/trigger", {"priority": 3})
    assert extra.status == 400 and extra.error["field"] == "priority", extra


async def test_backfill(api: Api) -> None:
    r = await api.call("POST", "/tasks/tick/backfill",
                       {"start": "2025-12-31T23:57:00Z", "end": "2025-12-31T23:59:30Z"})
    assert r.status == 201, r
    assert r.body["count"] == 3 and r.body["task_id"] == "tick"
    await api.idle()
    assert sorted(_task_calls(api, "tick")) == [T0 - 180, T0 - 120, T0 - 60]
    epoch = await api.call("POST", "/tasks/tick/backfill", {"start": T0 - 60, "end": T0 - 60})
    assert epoch.body["count"] == 1
    for body, field in (({"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
                         "end"),
                        ({"start": "soon", "end": "2026-01-01T00:00:00Z"}, "start"),
                        ({"start": "2026-01-01T00:00:00Z"}, "end"),
                        ({"start": 0, "end": 1, "step": 3}, "step")):
        bad = await api.call("POST", "/tasks/tick/backfill", body)
        assert bad.status == 400 and bad.error["field"] == field, (body, bad)
    no_schedule = await api.call("POST", "/tasks/after_tick/backfill", {"start": 0, "end": 1})
    assert no_schedule.status == 400 and no_schedule.error["code"] == "ERR_BAD_PAYLOAD"
    huge = await api.call("POST", "/tasks/tick/backfill", {"start": 0, "end": T0})
    assert huge.status == 400, huge


async def test_add_a_task_at_runtime(api: Api) -> None:
    r = await api.call("POST", "/tasks", {"id": "often", "schedule": "@every 10s",
                                          "action": "rec", "payload": {"k": "v"},
                                          "timeout": "5s"})
    assert r.status == 201, r
    assert r.body["added"] == ["often"] and r.body["task"]["next_due"].endswith("00:10+00:00")
    assert [t["id"] for t in (await api.call("GET", "/tasks")).body["tasks"]] == [
        "tick", "after_tick", "often"]
    await api.advance(20)
    assert _task_calls(api, "often") == [T0 + 10, T0 + 20]
    dup = await api.call("POST", "/tasks", {"id": "often", "action": "rec"})
    assert dup.status == 409 and dup.error["field"] == "id", dup


async def test_an_invalid_task_is_refused_and_the_old_tasks_keep_running(api: Api) -> None:
    cases = [
        ({"id": "bad", "schedule": "61 * * * *", "action": "rec"}, "schedule"),
        ({"id": "bad", "schedule": "@every 1m", "action": "nope"}, "action"),
        ({"id": "bad", "schedule": "@every 1m", "action": "exec", "payload": {}}, "payload"),
        ({"id": "bad", "action": "rec", "after": ["ghost"]}, "after"),
        ({"id": "bad", "action": "rec", "colour": "red"}, "colour"),
        ({"id": "bad", "action": "rec", "tz": "Mars/Olympus"}, "tz"),
        ({"id": "bad", "action": "rec", "overlap": "sometimes"}, "overlap"),
        ({"id": "no spaces", "action": "rec"}, "id"),
        ({"action": "rec"}, "id"),
    ]
    for body, field in cases:
        r = await api.call("POST", "/tasks", body)
        assert r.status == 400, (body, r)
        assert r.error["code"] in ("ERR_CONFIG_INVALID", "ERR_CRON_INVALID"), r
        assert r.error["field"] == field, (body, r)
        assert r.error["issues"], r
    for raw in (b"[]", b"{", b'"task"'):
        r = await api.call("POST", "/tasks", data=raw)
        assert r.status == 400 and r.error["code"] == "ERR_BAD_REQUEST", (raw, r)
    assert [t.id for t in api.kernel.config.tasks] == ["tick", "after_tick"]
    await api.advance(60)
    assert _task_calls(api, "tick") == [T0 + 60]


async def test_replace_a_task(api: Api) -> None:
    r = await api.call("PUT", "/tasks/tick", {"schedule": "@every 30s", "action": "rec"})
    assert r.status == 200, r
    assert r.body["changed"] == ["tick"] and r.body["task"]["schedule"] == "@every 30s"
    await api.advance(60)
    assert _task_calls(api, "tick") == [T0 + 30, T0 + 60]
    mismatch = await api.call("PUT", "/tasks/tick", {"id": "tock", "action": "rec"})
    assert mismatch.status == 400 and mismatch.error["field"] == "id"
    missing = await api.call("PUT", "/tasks/ghost", {"action": "rec"})
    assert missing.status == 404
    invalid = await api.call("PUT", "/tasks/tick", {"schedule": "@every -1s", "action": "rec"})
    assert invalid.status == 400 and invalid.error["field"] == "schedule", invalid
    assert api.kernel.config.task("tick").schedule == "@every 30s"


async def test_delete_a_task(api: Api) -> None:
    refused = await api.call("DELETE", "/tasks/tick")  # after_tick depends on it
    assert refused.status == 400 and refused.error["code"] == "ERR_CONFIG_INVALID", refused
    assert "after_tick" in refused.error["message"]
    r = await api.call("DELETE", "/tasks/after_tick")
    assert r.status == 200 and r.body["removed"] == ["after_tick"] and r.body["task"] is None
    assert (await api.call("DELETE", "/tasks/tick")).status == 200
    assert (await api.call("GET", "/tasks")).body["tasks"] == []
    assert (await api.call("DELETE", "/tasks/tick")).status == 404
    await api.advance(120)
    assert api.h.rec.calls == []


async def test_an_api_task_change_during_a_file_reload_sees_the_reloaded_tasks(
        api: Api) -> None:
    """Task changes from the API and from the config file go through one kernel lock: a POST
    that arrives while a reload is applying builds on the reloaded task list (it used to read
    the list before the reload, and its change undid the reload's)."""
    import asyncio
    from typing import Any

    import msgspec

    from kernel.config import TaskConfig

    k = api.kernel
    gate = asyncio.Event()
    states = k.store.schedule_states

    async def slow_states() -> Any:  # the reload is held mid-way, inside the lock
        await gate.wait()
        return await states()

    k.store.schedule_states = slow_states  # type: ignore[method-assign]
    with_file_task = msgspec.structs.replace(k.config, tasks=[
        *k.config.tasks, TaskConfig(id="from_file", action="rec", schedule="@every 90s")])
    reload = asyncio.create_task(k.reload(with_file_task, "file change"))
    post = asyncio.create_task(api.call("POST", "/tasks", {"id": "fresh", "action": "rec",
                                                           "schedule": "@every 30s"}))
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while not getattr(k._lock, "_waiters", None):  # the POST waits for the kernel's lock
        assert loop.time() < end, "the POST never reached the kernel"
        await asyncio.sleep(0.01)
    gate.set()
    await reload
    r = await post
    k.store.schedule_states = states  # type: ignore[method-assign]
    assert r.status == 201, r
    want = ["after_tick", "fresh", "from_file", "tick"]
    assert sorted(t.id for t in k.config.tasks) == want
    assert sorted(t.id for t in k.snapshot().tasks) == want
