"""Identifiers: unique, well-formed, and not repeated by a forked child (the random bytes are
read from the OS in blocks: a child must not reuse its parent's block)."""

from __future__ import annotations

import os
import re
import threading

from kernel import ids


def test_ids_are_well_formed_and_unique_across_many_pool_refills() -> None:
    n = 20_000  # ~ 10 refills of the 64 KiB block (34 random bytes per trio)
    jobs = [ids.job_id() for _ in range(n)]
    traces = [ids.trace_id() for _ in range(n)]
    spans = [ids.span_id() for _ in range(n)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", j) for j in jobs)
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in traces)
    assert all(re.fullmatch(r"[0-9a-f]{16}", s) for s in spans)
    assert len(set(jobs)) == n and len(set(traces)) == n and len(set(spans)) == n
    # the random parts too (the job id's first 12 characters are a sequence)
    assert len({j[12:] for j in jobs}) == n


def test_threads_drawing_at_once_never_get_the_same_bytes() -> None:
    got: list[list[str]] = [[] for _ in range(4)]

    def draw(k: int) -> None:
        got[k] = [ids.trace_id() for _ in range(5_000)]

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [t for g in got for t in g]
    assert len(set(every)) == len(every) == 20_000


def test_a_forked_child_does_not_repeat_the_ids_its_parent_draws_next() -> None:
    ids.trace_id()  # the parent holds a partly used block
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next 50 trace ids, then exit at once
        try:
            os.write(w, " ".join(ids.trace_id() for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read().split()
    os.waitpid(pid, 0)
    parent = [ids.trace_id() for _ in range(50)]
    assert len(child) == 50
    assert not set(child) & set(parent)
