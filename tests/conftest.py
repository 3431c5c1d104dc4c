"""Session-wide reporting: how long the throwaway PostgreSQL cluster took to start (issue 12's
goal is <= 1 s), printed in the terminal summary when the session started one. Reported, never
asserted: tests do not time things."""

from __future__ import annotations

import pytest

from . import pg_cluster


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    cluster = pg_cluster._cluster
    if cluster is not None:
        terminalreporter.write_line(
            f"PostgreSQL test cluster: started in {cluster.startup_seconds:.2f} s "
            f"(initdb + pg_ctl start, data in {cluster.root.parent})"
        )
