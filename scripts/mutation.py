"""Mutation testing of the kernel's pure rooms: does a small change to the code make a test fail?

A small AST mutator, written here rather than taken from mutmut because mutmut 3 rewrites and
copies the tree it tests, and this tree is shared by several people working at once; this one
never writes a source file. For each mutant it forks a child that serves the mutated module from
memory (a ``sys.meta_path`` finder put before the normal ones, so every ``import kernel.x`` in
the child gets the mutant), runs the module's fast test files with ``pytest -x`` in that child,
and reads the exit status: tests failed = *killed*, tests passed = *survived*, over the
per-mutant time limit = *timeout* (counted as killed: the change was noticed).

Operators (one change per mutant, the classic set): ``+``/``-``, ``*``/``/``, ``//``->``/``,
``%``->``*``, ``**``->``*``, ``<<``/``>>``, ``&``/``|``, ``^``->``|`` (also in ``x op= y``);
``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``in``/``not in``, ``is``/``is not``;
``and``/``or``; ``not x``->``x``, ``-x``->``x``; an int or float constant ``n``->``n + 1``;
``True``/``False``; ``return <expr>``->``return None``; ``break``/``continue``.
Annotations, docstrings and strings are left alone.

Usage::

    .venv/bin/python scripts/mutation.py                      # every target, every mutant
    .venv/bin/python scripts/mutation.py --sample 400         # a seeded random sample
    .venv/bin/python scripts/mutation.py --per-module 100     # at most 100 of each module
    .venv/bin/python scripts/mutation.py --module kernel/retry.py --list
    .venv/bin/python scripts/mutation.py --module kernel/retry.py --index 4 --index 5
    .venv/bin/python scripts/mutation.py --without tests/test_mutation_gaps.py  # as first run
    .venv/bin/python scripts/mutation.py --json out.json

Prints one line per mutant (``K``/``S``/``T`` and where) to stderr and, at the end, JSON with the
score per module and the surviving mutants (file, line, the change, the source line).
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# module file -> the fast test files that exercise it (slow tests are deselected)
_GAPS = "tests/test_mutation_gaps.py"  # tests written for the survivors of the first run
TARGETS: dict[str, list[str]] = {
    "kernel/wheel.py": ["tests/test_wheel.py", "tests/rooms/test_timers.py", _GAPS],
    "kernel/triggers/cron.py": ["tests/test_cron.py", "tests/test_cron_crosscheck.py",
                                "tests/test_cron_dst.py", _GAPS],
    "kernel/triggers/_fields.py": ["tests/test_cron.py", "tests/test_cron_crosscheck.py",
                                   "tests/test_cron_dst.py", _GAPS],
    "kernel/triggers/_parse.py": ["tests/test_cron.py", "tests/test_cron_crosscheck.py",
                                  "tests/test_cron_dst.py", _GAPS],
    "kernel/dispatch.py": ["tests/test_dispatch.py", "tests/test_kernel_rooms.py", _GAPS],
    "kernel/completion.py": ["tests/rooms/test_completion.py", "tests/test_kernel_rooms.py",
                             _GAPS],
    "kernel/misfire.py": ["tests/test_misfire_retry.py", "tests/rooms/test_timetable.py", _GAPS],
    "kernel/retry.py": ["tests/test_misfire_retry.py", "tests/test_kernel_rooms.py", _GAPS],
    "kernel/timers.py": ["tests/rooms/test_timers.py", "tests/test_kernel_rooms.py", _GAPS],
    "kernel/store/group.py": ["tests/store/test_group_commit.py"],
}

_BINOP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.Mult, ast.Pow: ast.Mult, ast.LShift: ast.RShift,
    ast.RShift: ast.LShift, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr,
}
_CMP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_SYM = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
        ast.Mod: "%", ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&",
        ast.BitOr: "|", ast.BitXor: "^", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
        ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in",
        ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or"}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int   # the index-th mutation point of the module, in a fixed walk order
    line: int
    change: str


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside annotations and docstrings: never mutated."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            mark(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node.returns)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            mark(node)
    return skip


def _points(tree: ast.AST) -> Iterator[tuple[ast.AST, str, Any]]:
    """Every mutation point as (node, what, detail), in ``ast.walk`` order."""
    skip = _skipped_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BINOP:
            yield node, "binop", None
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _CMP:
                    yield node, "cmp", i
        elif isinstance(node, ast.BoolOp):
            yield node, "boolop", None
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            yield node, "unary", None
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            yield node, "const", None
        elif isinstance(node, ast.Return) and node.value is not None \
                and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            yield node, "return", None
        elif isinstance(node, (ast.Break, ast.Continue)):
            yield node, "loopjump", None


class _Swap(ast.NodeTransformer):
    """Replaces one node (by identity) with another."""

    def __init__(self, old: ast.AST, new: ast.AST) -> None:
        self.old, self.new = old, new

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if node is self.old:
            return self.new
        return super().generic_visit(node)


def _apply(tree: ast.Module, index: int) -> tuple[ast.Module, int, str]:
    """Apply the ``index``-th mutation to ``tree`` (in place); returns (tree, line, change)."""
    for i, (node, what, detail) in enumerate(_points(tree)):
        if i != index:
            continue
        line = getattr(node, "lineno", 0)
        if what == "binop":
            assert isinstance(node, (ast.BinOp, ast.AugAssign))
            old = type(node.op)
            node.op = _BINOP[old]()
            return tree, line, f"{_SYM[old]} -> {_SYM[type(node.op)]}"
        if what == "cmp":
            assert isinstance(node, ast.Compare)
            old_c = type(node.ops[detail])
            node.ops[detail] = _CMP[old_c]()
            return tree, line, f"{_SYM[old_c]} -> {_SYM[type(node.ops[detail])]}"
        if what == "boolop":
            assert isinstance(node, ast.BoolOp)
            old_b = type(node.op)
            node.op = ast.Or() if old_b is ast.And else ast.And()
            return tree, line, f"{_SYM[old_b]} -> {_SYM[type(node.op)]}"
        if what == "unary":
            assert isinstance(node, ast.UnaryOp)
            sym = "not " if isinstance(node.op, ast.Not) else "-"
            return _Swap(node, node.operand).visit(tree), line, f"{sym}x -> x"
        if what == "const":
            assert isinstance(node, ast.Constant)
            v: Any = node.value
            new: Any = (not v) if isinstance(v, bool) else v + 1
            node.value = new
            return tree, line, f"{v!r} -> {new!r}"
        if what == "return":
            assert isinstance(node, ast.Return)
            node.value = ast.Constant(None)
            return tree, line, "return <expr> -> return None"
        if what == "loopjump":
            swap: ast.stmt = ast.Continue() if isinstance(node, ast.Break) else ast.Break()
            ast.copy_location(swap, node)
            return (_Swap(node, swap).visit(tree), line,
                    f"{type(node).__name__.lower()} -> {type(swap).__name__.lower()}")
    raise IndexError(index)


def mutants_of(module: str) -> list[Mutant]:
    source = (ROOT / module).read_text()
    count = sum(1 for _ in _points(ast.parse(source)))
    out = []
    for i in range(count):
        _tree, line, change = _apply(ast.parse(source), i)
        out.append(Mutant(module, i, line, change))
    return out


def _dotted(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module's mutated code; every other import goes the normal way."""

    def __init__(self, name: str, path: Path, code: Any) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = str(self.path)
        exec(self.code, module.__dict__)  # the mutant under test


def _child(module: str, index: int | None, tests: list[str], workdir: str) -> None:
    """In the forked child: install the mutant (``index`` None: the unmutated code, through
    the same path), run the tests, exit with pytest's status."""
    import pytest

    path = ROOT / module
    tree = ast.parse(path.read_text())
    if index is not None:
        tree, _line, _change = _apply(tree, index)
    ast.fix_missing_locations(tree)
    code = compile(tree, str(path), "exec")
    sys.meta_path.insert(0, _MutantFinder(_dotted(module), path, code))
    sys.dont_write_bytecode = True
    os.chdir(workdir)  # hypothesis' example database and other droppings stay out of the tree
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    status = pytest.main(["-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                          "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"),
                          *[str(ROOT / t) for t in tests]])
    os._exit(int(status))


def run_one(module: str, index: int | None, tests: list[str], workdir: str,
            limit: float) -> tuple[str, float]:
    """``("killed" | "survived" | "timeout", seconds)`` for one mutant."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(module, index, tests, workdir)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(70)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > limit:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.02)
    code = os.waitstatus_to_exitcode(status)
    return ("survived" if code == 0 else "killed"), time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", help="only this target (repeatable)")
    ap.add_argument("--sample", type=int, help="test this many mutants, drawn at random")
    ap.add_argument("--per-module", type=int, help="test at most this many mutants of each "
                    "module, drawn at random (a module with fewer is tested in full)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--limit-factor", type=float, default=2.0, help="a mutant whose tests run "
                    "longer than this many times the unmutated run (+3 s) is a timeout (killed: "
                    "most are endless loops)")
    ap.add_argument("--also", action="append", default=[], help="a test file run for every "
                    "module as well")
    ap.add_argument("--without", action="append", default=[], help="leave this test file out "
                    "(e.g. tests/test_mutation_gaps.py, to see the score without it)")
    ap.add_argument("--index", type=int, action="append", help="only the mutant with this "
                    "index (as --list shows it) of the one --module (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--json", type=Path, help="also write the JSON report here")
    args = ap.parse_args(argv)
    modules = args.module or list(TARGETS)
    unknown = [m for m in modules if m not in TARGETS]
    if unknown:
        ap.error(f"--module {unknown[0]}: not a target; valid: {', '.join(TARGETS)}")

    # import what every child needs but not the kernel itself (nor pytest plugins such as
    # hypothesis, which pytest must import itself to rewrite them): children fork from here
    import msgspec  # noqa: F401
    import pytest  # noqa: F401

    everything = [m for mod in modules for m in mutants_of(mod)]
    if args.list:
        for m in everything:
            print(f"{m.module}:{m.line} #{m.index} {m.change}")
        return 0
    chosen = everything
    if args.per_module is not None:
        rng = random.Random(args.seed)
        chosen = []
        for mod in modules:
            mine = [m for m in everything if m.module == mod]
            chosen += sorted(rng.sample(mine, min(args.per_module, len(mine))),
                             key=lambda m: m.index)
    if args.index:
        if len(modules) != 1:
            ap.error("--index needs exactly one --module")
        chosen = [m for m in chosen if m.index in set(args.index)]
    if args.sample is not None and args.sample < len(chosen):
        chosen = sorted(random.Random(args.seed).sample(chosen, args.sample),
                        key=lambda m: (m.module, m.index))
    results: dict[str, dict[str, float]] = {}
    survivors: list[dict[str, Any]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutation-") as workdir:
        baseline: dict[str, float] = {}
        for mod in modules:
            tests = [t for t in [*TARGETS[mod], *args.also] if t not in args.without]
            verdict, secs = run_one(mod, None, tests, workdir, 600)
            if verdict != "survived":
                print(f"{mod}: its tests fail without any mutation ({verdict}); fix that first",
                      file=sys.stderr)
                return 2
            baseline[mod] = secs
        for m in chosen:
            tests = [t for t in [*TARGETS[m.module], *args.also] if t not in args.without]
            limit = args.limit_factor * baseline[m.module] + 3
            verdict, secs = run_one(m.module, m.index, tests, workdir, limit)
            r = results.setdefault(m.module, {"mutants": 0, "killed": 0, "survived": 0,
                                              "timeout": 0})
            r["mutants"] += 1
            r[verdict] += 1
            print(f"{verdict[0].upper()} {m.module}:{m.line} #{m.index} {m.change} "
                  f"({secs:.1f}s)", file=sys.stderr)
            if verdict == "survived":
                text = (ROOT / m.module).read_text().splitlines()[m.line - 1].strip()
                survivors.append({**asdict(m), "source": text})
    for r in results.values():
        r["score_pct"] = round(100 * (r["killed"] + r["timeout"]) / r["mutants"], 1)
    total = {k: sum(r[k] for r in results.values())
             for k in ("mutants", "killed", "survived", "timeout")}
    report = {
        "mutants_in_targets": len(everything), "tested": len(chosen),
        "sampled": len(chosen) < len(everything), "seed": args.seed,
        "per_module": args.per_module, "in_targets_per_module": {
            mod: sum(1 for m in everything if m.module == mod) for mod in modules},
        "seconds": round(time.monotonic() - began, 1),
        "score_pct": round(100 * (total["killed"] + total["timeout"]) / max(1, total["mutants"]),
                           1),
        "totals": total, "modules": results, "survivors": survivors,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
