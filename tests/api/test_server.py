"""The server itself: health, metrics, snapshot, OpenAPI, errors, auth, timeouts, durability."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kernel.api import openapi
from kernel.api.server import Api as ApiHandlers
from kernel.api.server import api_service, api_token, is_loopback
from kernel.app import Snapshot
from kernel.errors import ConfigError
from kernel.metrics import KernelMetrics
from kernel.records import JobState, RunQuery, RunRecord
from kernel.store.memory import MemoryStore
from kernel.store.sqlite import SqliteStore
from kernel.tui import decode_view

from ..harness import make_harness
from .conftest import CONFIG, T0, Api, serve


async def test_healthz(api: Api) -> None:
    r = await api.call("GET", "/healthz")
    assert r.status == 200, r
    assert r.body["status"] == "ok" and r.body["accepting"] is True
    assert r.body["store"]["backend"] == "memory"


async def test_while_stopping_healthz_and_submissions_are_503(api: Api) -> None:
    await api.call("POST", "/jobs", {"action": "rec", "payload": {"mode": "block"}})
    await api.idle()
    api.kernel.stop("test")  # draining: the blocked job has shutdown_grace to finish
    await api.idle()
    health = await api.call("GET", "/healthz")
    assert health.status == 503 and health.body["status"] == "unavailable"
    r = await api.call("POST", "/jobs", {"action": "rec"})
    assert r.status == 503 and r.error["code"] == "ERR_SHUTTING_DOWN", r
    assert r.headers["Retry-After"] == "1"


async def test_metrics() -> None:
    exporter = KernelMetrics()
    async with serve(metrics=exporter.render) as api:
        api.kernel.bus.subscribe(exporter)
        await api.call("POST", "/jobs", {"action": "rec"})
        await api.idle()
        r = await api.call("GET", "/metrics")
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        assert "autoglm_kernel_" in r.body
    async with serve() as api:
        r = await api.call("GET", "/metrics")
        assert r.status == 404 and r.error["code"] == "ERR_NOT_FOUND"


async def test_snapshot_keeps_the_shape_the_tui_reads(api: Api) -> None:
    await api.call("POST", "/jobs", {"action": "rec", "payload": {"result": "hi"}})
    await api.idle()
    await api.call("POST", "/tasks", {"id": "extra", "action": "rec"})
    r = await api.call("GET", "/snapshot")
    assert r.status == 200
    assert list(r.body)[:3] == ["snapshot", "recent_runs", "api_version"]
    assert r.body["api_version"] == 1
    direct = msgspec.to_builtins(api.kernel.snapshot())
    assert set(r.body["snapshot"]) == set(direct)
    assert set(r.body["snapshot"]) >= {f for f in Snapshot.__dataclass_fields__}
    view = decode_view(msgspec.json.encode(r.body))
    assert [run.detail for run in view.recent_runs] == ["hi"]
    assert view.reloads[0].added == ("extra",) and view.reloads[0].source == "api"


async def test_openapi_documents_every_route_with_its_errors(api: Api) -> None:
    r = await api.call("GET", "/openapi.json")
    assert r.status == 200
    doc: dict[str, Any] = r.body
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"]
    assert "in memory only" in doc["info"]["description"]
    registered = {(route.method, route.resource.canonical)  # type: ignore[union-attr]
                  for route in ApiHandlers(api.kernel).app().router.routes()}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert registered == documented
    assert len(documented) == len(openapi.ROUTES) == 19
    op_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(op_ids) == len(set(op_ids))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert any(c.startswith("2") for c in codes), (method, path)
            if path != "/healthz":
                assert {"401", "500"} <= codes, (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= codes, (method, path)
            for p in op.get("parameters", []):
                assert p["in"] in ("path", "query") and "schema" in p
    submit = doc["paths"]["/jobs"]["post"]
    assert {"200", "201", "400", "413", "429", "503"} <= set(submit["responses"])
    assert "in memory only" in doc["paths"]["/tasks"]["post"]["description"]
    schemas = doc["components"]["schemas"]
    assert {"JobIn", "TaskConfig", "ErrorOut", "SnapshotOut"} <= set(schemas)
    assert schemas["JobIn"]["additionalProperties"] is False

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [
                x for v in node.values() for x in refs(v)]
        if isinstance(node, list):
            return [x for v in node for x in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


async def test_unknown_routes_and_methods_are_json_errors(api: Api) -> None:
    r = await api.call("GET", "/nope")
    assert r.status == 404 and r.error["code"] == "ERR_NOT_FOUND"
    r = await api.call("PATCH", "/jobs")
    assert r.status == 405 and r.error["code"] == "ERR_BAD_REQUEST"
    assert "POST" in r.headers["Allow"]


async def test_an_unexpected_exception_is_500_and_the_kernel_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(snapshot: Snapshot) -> tuple[bytes, str]:
        raise RuntimeError("exporter bug")

    async with serve(metrics=broken) as api:
        with caplog.at_level(logging.ERROR, logger="kernel.api"):
            r = await api.call("GET", "/metrics")
        assert r.status == 500 and r.error["code"] == "ERR_INTERNAL", r
        assert "exporter bug" not in r.error["message"]
        assert any("exporter bug" in (rec.exc_text or "") for rec in caplog.records)
        assert (await api.call("GET", "/healthz")).status == 200
        assert (await api.call("POST", "/jobs", {"action": "rec"})).status == 201


async def test_token_required_when_not_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_API_TOKEN", "s3cret")
    async with serve(require_token=True) as api:
        r = await api.call("GET", "/tasks")
        assert r.status == 401 and r.error["code"] == "ERR_UNAUTHORIZED"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        wrong = await api.call("GET", "/tasks", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        basic = await api.call("GET", "/tasks", headers={"Authorization": "Basic s3cret"})
        assert basic.status == 401
        ok = await api.call("GET", "/tasks", headers={"Authorization": "Bearer s3cret"})
        assert ok.status == 200
        missing = await api.call("GET", "/nope")  # no route: still 401 before anything else
        assert missing.status == 401
        health = await api.call("GET", "/healthz")
        assert health.status == 200 and "store" not in health.body
        full = await api.call("GET", "/healthz", headers={"Authorization": "Bearer s3cret"})
        assert full.body["store"]["backend"] == "memory"


async def test_non_loopback_without_a_token_refuses_to_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_TOKEN", raising=False)
    h = make_harness(CONFIG.replace('host = "127.0.0.1"', 'host = "0.0.0.0"\n'
                                    'token_env = "MY_TOKEN"'))
    with pytest.raises(ConfigError) as err:
        await api_service(h.kernel)  # refuses before opening any socket
    assert "MY_TOKEN" in str(err.value) and "0.0.0.0" in str(err.value)
    assert h.kernel.api_url is None
    monkeypatch.setenv("MY_TOKEN", "t")
    assert api_token(h.kernel.config) == "t"
    assert [is_loopback(x) for x in ("127.0.0.1", "::1", "localhost", "127.8.0.1")] == [True] * 4
    assert not any(is_loopback(x) for x in ("0.0.0.0", "::", "", "example.org", "10.0.0.1"))


async def test_a_slow_body_is_408_after_read_timeout() -> None:
    text = CONFIG.replace("port = 0", 'port = 0\nread_timeout = "50ms"')
    async with serve(text) as api:
        host, port = api.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + str(api.token).encode() + b"\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(200), timeout=5)  # waits for real I/O
        writer.close()
        await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 408"), head


async def test_a_201_means_the_job_is_committed_to_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "kernel.sqlite3"
    async with serve(store=SqliteStore(path)) as api:
        r = await api.call("POST", "/jobs", {"action": "rec", "delay": 3600,
                                             "dedup_key": "once"})
        assert r.status == 201
        again = await api.call("POST", "/jobs", {"action": "rec", "dedup_key": "once"})
        assert again.status == 200 and again.body["id"] == r.body["id"]
        listed = await api.call("GET", "/jobs")
        assert [j["id"] for j in listed.body["jobs"]] == [r.body["id"]]
    async with SqliteStore(path) as store:  # a fresh connection after the kernel stopped
        job = await store.get_job(r.body["id"])
    assert job is not None and job.state is JobState.PENDING and job.dedup_key == "once"


class _HangingStore(MemoryStore):
    """A store whose history queries never answer (a wedged disk, say)."""

    async def query_runs(self, q: RunQuery) -> list[RunRecord]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_read_that_hangs_is_503_after_write_timeout() -> None:
    text = CONFIG.replace("port = 0", 'port = 0\nwrite_timeout = "50ms"')
    async with serve(text, store=_HangingStore()) as api:
        r = await api.call("GET", "/runs")  # waits for the real timeout, not a fake timer
        assert r.status == 503 and r.error["code"] == "ERR_STORE_UNAVAILABLE", r
        assert "write_timeout" in r.error["message"]
        assert (await api.call("POST", "/jobs", {"action": "rec", "delay": 1})).status == 201


async def test_the_snapshot_carries_the_last_loop_stall_and_health_the_unsaved(
        api: Api) -> None:
    from kernel.events import LoopStalled

    api.kernel.bus.publish(LoopStalled(at=T0, lag=1.5, job_ids=("j1",), task_ids=("t1",)))
    r = await api.call("GET", "/snapshot")
    assert r.body["last_stall"] == {"at": T0, "lag": 1.5, "job_ids": ["j1"], "task_ids": ["t1"]}
    h = await api.call("GET", "/healthz")
    assert h.body["unsaved"] == 0
