"""Plugin loading beyond actions: hook names checked at load time (pluggy's check_pending),
CLI commands contributed by plugins, and each plugin's lifespan around the kernel's run."""

from __future__ import annotations

import argparse
import contextlib
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kernel.errors import ErrorCode
from kernel.hookspecs import Action, Command, PluginContext, RunContext, hookimpl
from kernel.plugins import add_plugin_commands, load


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


async def _noop(ctx: RunContext, payload: Any) -> str:
    return "ok"


# ------------------------------------------------------------------ check_pending
def test_a_hook_with_a_typo_is_reported_naming_the_plugin_the_hook_and_the_valid_names() -> None:
    @hookimpl
    def register_action(context: PluginContext) -> list[Action]:  # typo: the hook is plural
        return [Action("typo.run", _noop)]

    ps = load(PluginContext(), extra=[("typo", _module("typo", register_action=register_action))],
              use_entry_points=False)
    [problem] = ps.problems
    assert problem.plugin == "typo"
    assert problem.code is ErrorCode.ERR_PLUGIN_LOAD
    assert "register_action" in problem.message
    assert "did you mean 'register_actions'" in problem.message
    for valid in ("register_actions", "register_subscribers", "register_commands",
                  "register_lifespan"):
        assert valid in problem.message
    assert str(problem).startswith("[ERR_PLUGIN_LOAD] plugin typo: ")
    assert "typo.run" not in ps.actions


def test_an_optional_hook_is_not_a_typo() -> None:
    @hookimpl(optionalhook=True)
    def some_future_hook() -> None:
        return None

    ps = load(PluginContext(), extra=[("fut", _module("fut", some_future_hook=some_future_hook))],
              use_entry_points=False)
    assert ps.problems == []


def test_the_good_hooks_of_a_plugin_with_a_typo_still_work() -> None:
    @hookimpl
    def register_actions(context: PluginContext) -> list[Action]:
        return [Action("half.run", _noop)]

    @hookimpl
    def register_subscriber(context: PluginContext) -> list[Any]:
        return []

    mod = _module("half", register_actions=register_actions,
                  register_subscriber=register_subscriber)
    ps = load(PluginContext(), extra=[("half", mod)], use_entry_points=False)
    assert "half.run" in ps.actions
    [problem] = ps.problems
    assert "register_subscriber" in problem.message
    assert "did you mean 'register_subscribers'" in problem.message


# ------------------------------------------------------------------ lifespans
class _Resource:
    def __init__(self, name: str, log: list[str], *, fail_start: bool = False) -> None:
        self.name, self.log, self.fail_start = name, log, fail_start
        self.open = False

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        if self.fail_start:
            raise OSError(f"{self.name} cannot start")
        self.open = True
        self.log.append(f"start {self.name}")
        try:
            yield
        finally:
            self.open = False
            self.log.append(f"stop {self.name}")


def _lifespan_plugin(res: _Resource) -> types.ModuleType:
    @hookimpl
    def register_actions(context: PluginContext) -> list[Action]:
        async def use(ctx: RunContext, payload: Any) -> bool:
            return res.open
        return [Action(f"{res.name}.use", use)]

    @hookimpl
    def register_lifespan(context: PluginContext) -> Any:
        return res.lifespan

    return _module(res.name, register_actions=register_actions,
                   register_lifespan=register_lifespan)


async def test_lifespans_are_entered_in_order_and_exited_in_reverse() -> None:
    log: list[str] = []
    a, b = _Resource("a", log), _Resource("b", log)
    ps = load(PluginContext(), extra=[("a", _lifespan_plugin(a)), ("b", _lifespan_plugin(b))],
              use_entry_points=False)
    assert ps.problems == []
    assert not a.open
    async with ps.lifecycle():
        assert a.open and b.open
        log.append("kernel runs")
    assert log == ["start a", "start b", "kernel runs", "stop b", "stop a"]
    async with ps.lifecycle():  # a lifespan is a factory: it can be entered again
        assert a.open
    assert not a.open


async def test_a_lifespan_that_fails_to_start_is_reported_and_the_others_run(
        caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    bad, good = _Resource("bad", log, fail_start=True), _Resource("good", log)
    ps = load(PluginContext(), extra=[("bad", _lifespan_plugin(bad)),
                                      ("good", _lifespan_plugin(good))], use_entry_points=False)
    async with ps.lifecycle():
        assert good.open
    assert log == ["start good", "stop good"]
    [problem] = ps.problems
    assert problem.plugin == "bad" and problem.code is ErrorCode.ERR_PLUGIN_LOAD
    assert "bad cannot start" in problem.message
    assert "plugin bad" in caplog.text


async def test_an_error_inside_the_kernel_run_still_exits_every_lifespan() -> None:
    log: list[str] = []
    a = _Resource("a", log)
    ps = load(PluginContext(), extra=[("a", _lifespan_plugin(a))], use_entry_points=False)
    with pytest.raises(RuntimeError, match="boom"):
        async with ps.lifecycle():
            raise RuntimeError("boom")
    assert log == ["start a", "stop a"]


def test_a_lifespan_hook_returning_something_else_is_a_problem() -> None:
    @hookimpl
    def register_lifespan(context: PluginContext) -> Any:
        return 42

    ps = load(PluginContext(), extra=[("odd", _module("odd", register_lifespan=register_lifespan))],
              use_entry_points=False)
    [problem] = ps.problems
    assert problem.plugin == "odd" and "register_lifespan" in problem.message


def test_hooks_of_one_load_share_one_object_through_the_context() -> None:
    made: list[object] = []

    def factory() -> object:
        made.append(object())
        return made[-1]

    @hookimpl
    def register_actions(context: PluginContext) -> list[Action]:
        context.shared("one", factory)
        return []

    @hookimpl
    def register_lifespan(context: PluginContext) -> Any:
        context.shared("one", factory)
        return None

    load(PluginContext(), extra=[("one", _module("one", register_actions=register_actions,
                                                  register_lifespan=register_lifespan))],
         use_entry_points=False)
    assert len(made) == 1


# ------------------------------------------------------------------ CLI commands
def _commands_plugin() -> types.ModuleType:
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="world", help="who to greet")

    def hello(args: argparse.Namespace, context: PluginContext) -> int:
        greeting = context.section("greeter").get("greeting", "hello")
        print(f"{greeting}, {args.name}")
        return 3

    async def ahello(args: argparse.Namespace, context: PluginContext) -> int:
        print("async hello")
        return 0

    @hookimpl
    def register_commands() -> list[Command]:
        return [Command("hello", hello, "say hello", add_arguments=add_arguments,
                        example="python -m kernel greeter hello --name box"),
                Command("ahello", ahello, "say hello from a coroutine")]

    return _module("greeter", register_commands=register_commands)


def _parser(**kw: Any) -> tuple[argparse.ArgumentParser, Any]:
    ap = argparse.ArgumentParser(prog="python -m kernel")
    sub = ap.add_subparsers(dest="cmd")
    sub.add_parser("run")
    ps = add_plugin_commands(sub, **kw)
    return ap, ps


def test_plugin_commands_become_subcommands_that_get_their_settings(
        capsys: pytest.CaptureFixture[str]) -> None:
    ctx = PluginContext(settings={"greeter": {"greeting": "hi"}})
    ap, ps = _parser(extra=[("greeter", _commands_plugin())], use_entry_points=False,
                     context=lambda args: ctx)
    assert ps.problems == []
    a = ap.parse_args(["greeter", "hello", "--name", "box"])
    assert a.handler(a) == 3
    assert capsys.readouterr().out == "hi, box\n"
    a = ap.parse_args(["greeter", "ahello"])
    assert a.handler(a) == 0
    assert capsys.readouterr().out == "async hello\n"
    helptext = ap.format_help()
    assert "greeter" in helptext
    with pytest.raises(SystemExit):
        ap.parse_args(["greeter", "hello", "--help"])
    out = capsys.readouterr().out
    assert "who to greet" in out and "python -m kernel greeter hello --name box" in out


def test_plugin_commands_get_the_common_options(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config")

    def context(args: argparse.Namespace) -> PluginContext:
        seen.append(args.config)
        return PluginContext()

    ap, _ = _parser(extra=[("greeter", _commands_plugin())], use_entry_points=False,
                    configure=common, context=context)
    a = ap.parse_args(["greeter", "hello", "--config", "x.toml"])
    assert a.handler(a) == 3
    assert seen == ["x.toml"]


def test_a_plugin_named_like_a_kernel_command_is_refused() -> None:
    _ap, ps = _parser(extra=[("run", _commands_plugin())], use_entry_points=False)
    [problem] = ps.problems
    assert problem.plugin == "run" and "already a command" in problem.message


def test_a_command_that_raises_is_reported_not_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: argparse.Namespace, context: PluginContext) -> int:
        raise ValueError("no server configured")

    @hookimpl
    def register_commands() -> list[Command]:
        return [Command("broken", broken, "always fails")]

    ap, _ = _parser(extra=[("bad", _module("bad", register_commands=register_commands))],
                    use_entry_points=False, context=lambda args: PluginContext())
    a = ap.parse_args(["bad", "broken"])
    assert a.handler(a) == 1
    err = capsys.readouterr().err
    assert "bad broken" in err and "no server configured" in err and "Traceback" not in err


# ------------------------------------------------------------------ the kernel holds them
async def test_the_kernel_holds_plugin_lifespans_around_its_run() -> None:
    import asyncio

    from kernel import config as config_mod
    from kernel.clock import FakeClock
    from kernel.main import build
    from kernel.store.memory import MemoryStore

    log: list[str] = []
    res = _Resource("held", log)
    ps = load(PluginContext(), extra=[("held", _lifespan_plugin(res))], use_entry_points=False)
    cfg = config_mod.Config()
    clock = FakeClock()
    kernel = build(cfg, clock=clock, plugins=ps, store=MemoryStore())
    started = asyncio.Event()
    task = asyncio.create_task(kernel.run(started=started))
    await asyncio.wait_for(started.wait(), 10)
    open_while_running = res.open
    kernel.stop("test")
    while not task.done():
        await clock.advance(1)
        await asyncio.sleep(0)
    await task
    assert open_while_running
    assert log == ["start held", "stop held"]
