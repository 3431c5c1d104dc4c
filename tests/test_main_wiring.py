"""The composition root's wiring (kernel.main) and the config it reads: the reloader with the
reload guard, ``[python]`` handed to the python action, the store backends, ``[fleet]``,
``[server] require_token``, plugin problems in ``validate`` and the GC policy."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

from kernel import config as config_mod
from kernel import gcpolicy, main, reload
from kernel.errors import ConfigError
from kernel.events import ConfigReloaded
from kernel.hookspecs import Action, PluginContext, hookimpl
from kernel.plugins import load as load_plugins
from kernel.store.memory import MemoryStore
from kernel.validate import validate

from .harness import make_harness
from .test_reload import BASE


def parse(text: str) -> tuple[config_mod.Config, list[str]]:
    cfg, issues = config_mod.parse_text(text, "c.toml")
    return cfg, [str(i) for i in issues]


# ------------------------------------------------------------------ reload: one implementation
def test_main_uses_the_guarded_reloader() -> None:
    assert main.ConfigReloader is reload.ConfigReloader


async def test_a_blank_file_is_not_applied_by_the_reloader_serve_uses(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(BASE)
    h = make_harness(BASE)
    reloader = main.ConfigReloader(cfg, None, h.kernel.plugins, h.kernel)
    await h.start()
    cfg.write_text("# an editor is writing this file\n")
    assert not await reloader.reload("test")
    ev = [e for e in h.events if isinstance(e, ConfigReloaded)][-1]
    assert ev.error is not None and "blank" in ev.error
    assert sorted(t.id for t in h.kernel.snapshot().tasks) == ["a", "b"]
    await h.stop()


# ------------------------------------------------------------------ [python]
def test_python_section_is_decoded_and_checked() -> None:
    cfg, issues = parse("[python]\nworkers = 3\nin_process = true\n")
    assert issues == []
    assert (cfg.python.workers, cfg.python.in_process) == (3, True)
    _, issues = parse("[python]\nworkers = 0\nbogus = 1\n")
    assert any("[python].workers: must be at least 1" in i for i in issues), issues
    assert any("[python].bogus: unknown field (valid: workers," in i for i in issues), issues


def test_an_unknown_section_lists_python_and_fleet() -> None:
    _, issues = parse("[bogus]\nx = 1\n")
    assert issues == ["c.toml: [bogus]: unknown section (valid: kernel, server, store, "
                      "scheduler, fleet, python, tasks, plugins)"]


def test_the_python_action_gets_the_python_table() -> None:
    cfg, issues = parse("[python]\nworkers = 3\nmax_tasks_per_worker = 7\n"
                        "[plugins.other]\nx = 1\n")
    assert issues == []
    ps = main.plugin_set(cfg)
    runner = ps.actions["python"].run.__self__  # type: ignore[attr-defined]
    assert (runner.settings.workers, runner.settings.max_tasks_per_worker) == (3, 7)


def test_a_plugins_python_table_is_a_warning_that_it_moved() -> None:
    cfg, issues = parse("[plugins.python]\nworkers = 3\n")
    assert issues == []
    found = validate(cfg, None)
    assert [(i.where, i.severity) for i in found] == [("[plugins.python]", "warning")]
    assert "[python]" in found[0].message


# ------------------------------------------------------------------ [kernel] loop_stall_warn
def test_loop_stall_warn_is_a_positive_duration() -> None:
    cfg, issues = parse('[kernel]\nloop_stall_warn = "250ms"\n')
    assert issues == [] and config_mod.secs(cfg.kernel.loop_stall_warn) == 0.25
    assert config_mod.secs(config_mod.Config().kernel.loop_stall_warn) == 0.5
    _, issues = parse("[kernel]\nloop_stall_warn = 0\n")
    assert any("[kernel].loop_stall_warn: must be more than 0" in i for i in issues), issues


# ------------------------------------------------------------------ [store] postgres, [fleet]
def test_postgres_backend_needs_a_dsn() -> None:
    _, issues = parse('[store]\nbackend = "postgres"\n')
    assert issues == ["c.toml: [store].dsn: required when backend = 'postgres' (a libpq URI such "
                      "as postgresql://kernel@db-host:5432/kernel; passwords may come from "
                      "~/.pgpass or PGPASSWORD)"]
    _, issues = parse('[store]\nbackend = "postgres"\ndsn = ""\n')  # said once, not twice
    assert len(issues) == 1 and issues[0].startswith("c.toml: [store].dsn: required"), issues
    _, issues = parse('[store]\nbackend = "mysql"\n')
    assert issues == ["c.toml: [store].backend: must be 'sqlite', 'memory' or 'postgres'"]


def test_postgres_backend_builds_a_postgres_store() -> None:
    pytest.importorskip("asyncpg")
    cfg, issues = parse('[store]\nbackend = "postgres"\ndsn = "postgresql://k@db:5432/k"\n'
                        'schema = "fleet_a"\n')
    assert issues == []
    store = main.make_store(cfg)
    assert type(store).__name__ == "PostgresStore"
    assert (store.dsn, store.schema) == ("postgresql://k@db:5432/k", "fleet_a")  # type: ignore[attr-defined]
    assert isinstance(main.make_store(parse('[store]\nbackend = "memory"\n')[0]), MemoryStore)


def test_fleet_section_defaults_and_checks() -> None:
    f = config_mod.Config().fleet
    assert (f.heartbeat, f.ttl, f.claim_horizon, f.claim_batch) == (2.0, 10.0, 2.0, 500)
    cfg, issues = parse('[fleet]\nheartbeat = "500ms"\nttl = "1m"\nclaim_batch = 50\n')
    assert issues == []
    assert (cfg.fleet.heartbeat, cfg.fleet.ttl, cfg.fleet.claim_horizon,
            cfg.fleet.claim_batch) == (0.5, 60.0, 2.0, 50)
    _, issues = parse('[fleet]\nheartbeat = 0\nttl = "soon"\nclaim_horizon = "0s"\n'
                      'claim_batch = 0\n')
    text = "\n".join(issues)
    for field in ("heartbeat", "ttl", "claim_horizon", "claim_batch"):
        assert f"[fleet].{field}:" in text, text


# ------------------------------------------------------------------ [server] require_token
def test_require_token_false_only_on_loopback() -> None:
    cfg, issues = parse("[server]\nrequire_token = false\n")
    assert issues == [] and cfg.server.require_token is False
    assert config_mod.Config().server.require_token is True
    _, issues = parse('[server]\nhost = "0.0.0.0"\nrequire_token = false\n')
    assert len(issues) == 1 and issues[0].startswith(
        "c.toml: [server].require_token: false is only allowed on a loopback host, not '0.0.0.0'")


# ------------------------------------------------------------------ validate: plugin problems
class _Broken:
    @hookimpl
    def register_actions(self, context: PluginContext) -> list[Action]:
        raise RuntimeError("no settings")


def test_validate_reports_plugin_problems() -> None:
    ps = load_plugins(PluginContext(), extra=[("broken", _Broken())], use_entry_points=False)
    assert ps.problems
    cfg, _ = parse("")
    issues = validate(cfg, ps)
    assert [(i.where, i.severity) for i in issues] == [("[plugins.broken]", "warning")]
    assert issues[0].message == str(ps.problems[0])
    assert "ERR_PLUGIN_LOAD" in issues[0].message


def test_load_checked_logs_plugin_problems_and_starts(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kernel.validate import load_checked

    ps = load_plugins(PluginContext(), extra=[("broken", _Broken())], use_entry_points=False)
    f = tmp_path / "c.toml"
    f.write_text("")
    load_checked(f, None, ps)  # the other plugins and the kernel go on
    assert any("[plugins.broken]" in r.getMessage() for r in caplog.records)
    f.write_text('[[tasks]]\nid = "t"\naction = "broken_action"\n')
    with pytest.raises(ConfigError, match="ERR_ACTION_NOT_FOUND"):
        load_checked(f, None, ps)  # but a task that needs a missing action stops the start


# ------------------------------------------------------------------ GC policy
@pytest.fixture
def gc_state() -> Any:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)
    gc.unfreeze()


@pytest.mark.usefixtures("gc_state")
def test_tune_gc_raises_the_threshold_and_restore_undoes_it() -> None:
    gc.set_threshold(700, 10, 10)
    saved = gcpolicy.tune_gc(5)
    assert saved == ((700, 10, 10), False)
    assert gc.get_threshold() == (gcpolicy.GC_GEN0_THRESHOLD, 10, 10)
    assert gc.get_freeze_count() == 0
    gcpolicy.restore_gc(*saved)
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.usefixtures("gc_state")
def test_tune_gc_freezes_a_large_start_up_heap() -> None:
    gc.set_threshold(50_000, 10, 10)  # a higher threshold than ours is kept
    keep = [[i] for i in range(1000)]
    saved = gcpolicy.tune_gc(gcpolicy.GC_FREEZE_MIN)
    assert saved == ((50_000, 10, 10), True)
    assert gc.get_threshold() == (50_000, 10, 10)
    assert gc.get_freeze_count() >= len(keep)
    gcpolicy.restore_gc(*saved)
    assert gc.get_freeze_count() == 0
