"""The API cannot be driven by a web browser (CSRF, DNS rebinding) or by other local users.

In-process tests speak raw HTTP where a header matters (``Host`` cannot be forged through
aiohttp's client); the slow test runs the attack from the issue against ``python -m kernel run``
as a user starts it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from kernel import client as client_mod
from kernel.api.security import TOKEN_FILE, load_or_create_token
from kernel.api.server import api_token
from kernel.errors import ConfigError

from ..harness import make_harness
from .conftest import CONFIG, Api, serve

ROOT = Path(__file__).resolve().parents[2]
ATTACK = json.dumps({"action": "exec", "payload": {"argv": ["touch", "pwned"]}}).encode()


def raw_request(url: str, method: str, path: str, body: bytes | None,
                headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    """One request with exactly these headers (``Host`` included), over a plain socket."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers,
                        skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode("utf-8", "replace")
    return resp.status, hdrs, parsed


async def call_raw(api: Api, method: str, path: str, body: bytes | None = None,
                   **headers: str) -> tuple[int, dict[str, str], Any]:
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if api.token is not None and "Authorization" not in hdrs:
        hdrs["Authorization"] = f"Bearer {api.token}"
    return await asyncio.to_thread(raw_request, api.url, method, path, body, hdrs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_of(api: Api) -> str:
    return api.url.removeprefix("http://")


async def test_the_issue_attack_is_refused_and_runs_nothing(api: Api) -> None:
    status, headers, body = await call_raw(
        api, "POST", "/jobs", ATTACK, Host="evil.example", Content_Type="text/plain",
        Origin="http://evil.example")
    assert status == 403 and body["error"]["code"] == "ERR_FORBIDDEN_ORIGIN", body
    assert await api.kernel.store.list_jobs() == []
    assert not any(k.startswith("access-control-") for k in headers)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "", "application/jsonx"])
async def test_a_write_whose_body_is_not_application_json_is_415(api: Api, ctype: str) -> None:
    headers = {"Host": host_of(api)}
    if ctype:
        headers["Content-Type"] = ctype
    status, _, body = await call_raw(api, "POST", "/jobs", b'{"action": "rec"}', **headers)
    assert status == 415, body
    assert body["error"]["code"] == "ERR_UNSUPPORTED_MEDIA_TYPE" and "application/json" in \
        body["error"]["message"]
    for method, path in (("PUT", "/tasks/tick"), ("POST", "/tasks/tick/trigger")):
        status, _, body = await call_raw(api, method, path, b"{}", **headers)
        assert status == 415, (method, path, body)
    assert await api.kernel.store.list_jobs() == []
    ok = await api.call("POST", "/jobs", {"action": "rec", "delay": 5},
                        headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status == 201, ok
    bodyless = await api.call("POST", "/tasks/tick/pause")  # no body: no Content-Type needed
    assert bodyless.status == 200, bodyless


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io",
                                  "10.0.0.1:{port}", "", "localhost.evil.example"])
async def test_a_foreign_host_is_refused_on_a_loopback_bind(api: Api, host: str) -> None:
    port = api.url.rsplit(":", 1)[1]
    status, _, body = await call_raw(api, "GET", "/tasks", Host=host.format(port=port))
    assert status == 403 and body["error"]["code"] == "ERR_FORBIDDEN_ORIGIN", body
    assert "DNS rebinding" in body["error"]["message"]


async def test_loopback_hosts_are_accepted(api: Api) -> None:
    port = api.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                 f"LOCALHOST:{port}", f"app.localhost:{port}", f"127.0.0.2:{port}"):
        status, _, body = await call_raw(api, "GET", "/tasks", Host=host)
        assert status == 200, (host, body)


@pytest.mark.parametrize(("header", "value"), [
    ("Origin", "http://evil.example"), ("Origin", "null"),
    ("Origin", "http://localhost:3000"), ("Origin", "https://{host}"),
    ("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Site", "same-site")])
async def test_a_request_from_a_web_page_is_refused(api: Api, header: str, value: str) -> None:
    for method, path, body in (("GET", "/jobs", None), ("POST", "/jobs", b'{"action": "rec"}'),
                               ("GET", "/healthz", None), ("OPTIONS", "/jobs", None)):
        status, headers, answer = await call_raw(
            api, method, path, body, Host=host_of(api), Content_Type="application/json",
            **{header.replace("-", "_"): value.format(host=host_of(api))})
        assert status == 403, (method, path, answer)
        assert answer["error"]["code"] == "ERR_FORBIDDEN_ORIGIN"
        assert not any(k.startswith("access-control-") for k in headers)
    assert await api.kernel.store.list_jobs() == []


async def test_same_origin_and_user_navigation_are_not_refused(api: Api) -> None:
    status, _, _ = await call_raw(api, "GET", "/openapi.json", Host=host_of(api),
                                  Origin=f"http://{host_of(api)}", Sec_Fetch_Site="same-origin")
    assert status == 200
    status, _, _ = await call_raw(api, "GET", "/healthz", Host=host_of(api),
                                  Sec_Fetch_Site="none")
    assert status == 200


async def test_a_cors_preflight_gets_no_cors_headers(api: Api) -> None:
    status, headers, _ = await call_raw(
        api, "OPTIONS", "/jobs", Host=host_of(api),
        Access_Control_Request_Method="POST", Access_Control_Request_Headers="content-type")
    assert status >= 400
    assert not any(k.startswith("access-control-") for k in headers), headers


# ================================================================================ token


async def test_on_loopback_a_token_from_the_data_dir_is_required(api: Api) -> None:
    path = api.data_dir / TOKEN_FILE
    assert api.token is not None and len(api.token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    r = await api.call("GET", "/tasks", auth=False)
    assert r.status == 401 and r.error["code"] == "ERR_UNAUTHORIZED", r
    assert str(path) in r.error["message"]
    r = await api.call("POST", "/jobs", {"action": "rec"}, auth=False)
    assert r.status == 401 and await api.kernel.store.list_jobs() == []
    health = await api.call("GET", "/healthz", auth=False)
    assert health.status == 200 and "store" not in health.body
    assert (await api.call("GET", "/tasks")).status == 200


async def test_the_token_is_kept_across_restarts_unless_others_could_read_it() -> None:
    async with serve() as first:
        token = first.token
        data_dir = first.data_dir
        assert token is not None
        kept = (data_dir / TOKEN_FILE).read_text().strip()
        assert kept == token
    path = data_dir / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a-token-of-thirty-two-characters!!\n")
    path.chmod(0o600)
    assert load_or_create_token(path) == ("a-token-of-thirty-two-characters!!", "kept")
    path.chmod(0o644)
    fresh, why = load_or_create_token(path)
    assert fresh != "a-token-of-thirty-two-characters!!" and "0644" in why
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.unlink()
    os.symlink(data_dir / "elsewhere", path)
    fresh2, why = load_or_create_token(path)
    assert "symlink" in why and not path.is_symlink() and not (data_dir / "elsewhere").exists()
    assert path.read_text().strip() == fresh2


async def test_the_token_can_be_switched_off_explicitly(tmp_path: Path) -> None:
    async with serve(require_token=False) as api:
        assert api.token is None and not (api.data_dir / TOKEN_FILE).exists()
        assert (await api.call("GET", "/tasks")).status == 200
        status, _, _ = await call_raw(api, "POST", "/jobs", ATTACK, Host="evil.example",
                                      Content_Type="application/json")
        assert status == 403  # the browser checks hold without a token


async def test_the_client_reads_the_token_file_and_sends_it_to_loopback_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERNEL_API_TOKEN", raising=False)
    async with serve() as api:
        monkeypatch.setenv("KERNEL_DATA_DIR", str(api.data_dir))
        assert client_mod.default_token(api.url) == api.token
        assert client_mod.default_token("http://localhost:1") == api.token
        assert client_mod.default_token("http://gpu-box.example:8765") is None
        monkeypatch.setenv("KERNEL_API_TOKEN", "from-env")
        assert client_mod.default_token("http://gpu-box.example:8765") == "from-env"
        monkeypatch.delenv("KERNEL_API_TOKEN")
        from kernel import cli
        rc = await asyncio.to_thread(cli.main, ["tasks", "--json", "--url", api.url])
        assert rc == 0


# ================================================================================ real kernel


@pytest.mark.slow
async def test_the_issue_attack_against_python_m_kernel_run(tmp_path: Path) -> None:
    """The curl attack from the issue, against the kernel as a user starts it, then the
    legitimate path: the CLI (token read from the data dir) submits the same job."""
    data = tmp_path / "data"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[kernel]\ndata_dir = "{data}"\nshutdown_grace = "1s"\n'
                   '[store]\nbackend = "memory"\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("KERNEL_API_TOKEN", "KERNEL_URL")}
    log = (tmp_path / "kernel.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kernel", "run", "--config", str(cfg), "--port", str(port),
        cwd=ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        for _ in range(3000):  # bounded poll of the real health endpoint
            assert proc.returncode is None, (tmp_path / "kernel.log").read_text()
            try:
                status, _, _ = await asyncio.to_thread(
                    raw_request, url, "GET", "/healthz", None, {})
                if status == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.01)
        token_file = data / TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        attempts = {
            "issue": {"Host": "evil.example", "Origin": "http://evil.example",
                      "Content-Type": "text/plain"},
            "origin": {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example",
                       "Content-Type": "application/json"},
            "text_plain": {"Host": f"127.0.0.1:{port}", "Content-Type": "text/plain"},
            "no_token": {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json"},
        }
        codes = {}
        for name, headers in attempts.items():
            body = json.dumps({"action": "exec", "payload": {
                "argv": ["touch", str(tmp_path / f"pwned_{name}")]}}).encode()
            status, _, answer = await asyncio.to_thread(raw_request, url, "POST", "/jobs", body,
                                                        headers)
            codes[name] = (status, answer["error"]["code"])
        assert codes == {"issue": (403, "ERR_FORBIDDEN_ORIGIN"),
                         "origin": (403, "ERR_FORBIDDEN_ORIGIN"),
                         "text_plain": (415, "ERR_UNSUPPORTED_MEDIA_TYPE"),
                         "no_token": (401, "ERR_UNAUTHORIZED")}
        env["KERNEL_DATA_DIR"] = str(data)
        legit = tmp_path / "legit"
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kernel", "submit", "exec", "--payload",
            json.dumps({"argv": ["touch", str(legit)]}), "--url", url, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(cli.communicate(), timeout=60)
        assert cli.returncode == 0, err.decode()
        for _ in range(3000):  # the job runs for real: wait for its file, bounded
            if legit.exists():
                break
            await asyncio.sleep(0.01)
        assert legit.exists(), (tmp_path / "kernel.log").read_text()
        assert _names(tmp_path, "pwned_*") == []
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.close()


def _names(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def test_a_data_dir_that_cannot_hold_the_token_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data dir should be")
    h = make_harness(CONFIG)
    h.kernel.config.kernel.data_dir = str(blocker)
    with pytest.raises(ConfigError) as err:
        api_token(h.kernel.config)
    assert "[kernel].data_dir" in str(err.value) and "api.token" in str(err.value)


def test_a_generated_token_never_starts_with_a_dash(tmp_path: Path) -> None:
    """A token is typed after ``--token``: one starting with "-" is read by argparse as an
    option (a flaky CLI test found it: token_urlsafe gives one in 64)."""
    from kernel.api.security import load_or_create_token

    tokens = [load_or_create_token(tmp_path / f"t{i}" / "api.token")[0] for i in range(300)]
    assert len(set(tokens)) == 300
    assert not [t for t in tokens if t.startswith("-")]
