"""The shipped systemd unit: Type=notify with a watchdog, no restart loop on an invalid config
(exit 78), `systemd-analyze verify` clean, `systemd-analyze security` exposure at most 2.0,
and none of the settings that would break `exec` actions (the kernel's children share the
sandbox). The systemd-analyze checks skip, saying why, where the tool is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "open-autoglm-kernel.service"
INSTALL = "/opt/open-autoglm-kernel/.venv"


def _directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return _directives(UNIT.read_text())


def _local_copy(tmp_path: Path) -> Path:
    """The unit with the install path pointed at this checkout's venv (verify checks that
    ExecStart= is executable)."""
    venv = Path(sys.executable).parent.parent
    path = tmp_path / UNIT.name
    path.write_text(UNIT.read_text().replace(INSTALL, str(venv)))
    return path


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")
    return exe


def test_notify_watchdog_and_no_restart_loop_on_a_bad_config(unit: dict[str, list[str]]) -> None:
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert int(unit["Service.WatchdogSec"][0]) >= 10
    assert unit["Service.RestartPreventExitStatus"] == ["78"]
    assert unit["Service.Restart"] == ["on-failure"]
    # RestartPreventExitStatus= looks at the main process only: validation is `run`'s own
    assert "Service.ExecStartPre" not in unit
    assert unit["Service.ExecStart"] == [f"{INSTALL}/bin/autoglm-kernel run --log-format json"]
    assert "KERNEL_CONFIG=/etc/open-autoglm-kernel/config.toml" in unit["Service.Environment"]


def test_hardening_keeps_exec_actions_working(unit: dict[str, list[str]]) -> None:
    """Settings that would break programs run by `exec` (or the GPU) are not set."""
    for key, bad in (("MemoryDenyWriteExecute", "yes"), ("PrivateDevices", "yes"),
                     ("ProcSubset", "pid"), ("PrivateUsers", "yes"), ("DevicePolicy", "closed"),
                     ("PrivateNetwork", "yes"), ("NoExecPaths", "/")):
        assert bad not in unit.get(f"Service.{key}", []), key
    families = " ".join(unit["Service.RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)  # AF_UNIX: the notify socket
    filters = unit["Service.SystemCallFilter"]
    assert filters[0] == "@system-service"
    denied = {g for f in filters if f.startswith("~") for g in f[1:].split()}
    assert not denied & {"@process", "@network-io", "@resources", "@file-system", "@ipc",
                         "@signal", "@basic-io"}
    # a filtered call fails with EPERM instead of killing the process (SIGSYS)
    assert unit["Service.SystemCallErrorNumber"] == ["EPERM"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = _analyze()
    p = subprocess.run([exe, "verify", str(_local_copy(tmp_path))], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a missing ExecStart= program, a misspelt value."""
    exe = _analyze()
    path = tmp_path / UNIT.name
    path.write_text(UNIT.read_text())  # /opt/... does not exist here
    p = subprocess.run([exe, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "is not executable" in p.stderr, p.stderr
    path = _local_copy(tmp_path)
    path.write_text(path.read_text().replace("Type=notify", "Type=notifyy"))
    p = subprocess.run([exe, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse service type" in p.stderr, p.stderr


def test_systemd_analyze_security_exposure_at_most_2(tmp_path: Path) -> None:
    exe = _analyze()
    p = subprocess.run([exe, "security", "--offline=yes", "--no-pager",
                        str(_local_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    if "--offline" in p.stderr and "unrecognized" in p.stderr:
        pytest.skip(f"this systemd-analyze has no --offline (systemd < 250): {p.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout)
    assert m is not None, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.0, p.stdout
