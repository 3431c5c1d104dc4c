"""The README's troubleshooting table is generated from the error catalogue and never drifts;
the README shows the two set-up commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kernel.errors import CATALOGUE

ROOT = Path(__file__).resolve().parents[1]


def test_readme_error_table_matches_the_catalogue() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "scripts/gen_docs.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    readme = (ROOT / "README.md").read_text()
    for code in CATALOGUE:
        assert f"| `{code.value}` |" in readme


def test_readme_quick_start_has_the_two_commands_and_ci_calls_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/run" in readme and "./scripts/test" in readme
    ci = (ROOT / ".ci/run").read_text()
    assert "./scripts/test" in ci
