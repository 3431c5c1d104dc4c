"""Tests for the gaps a mutation audit (``scripts/mutation.py``, see docs/TESTING.md) found in
the pure rooms: each kills a mutant that every other test let survive."""

from __future__ import annotations

import random

from kernel.config import RetryPolicy
from kernel.retry import backoff_cap, retry_delay


# ---------------------------------------------------------------- retry (kernel/retry.py)
def test_a_zero_initial_delay_retries_at_once() -> None:
    # mutant: ``secs(policy.initial_delay) or 0.0`` -> ``or 1.0`` (0 s read as 1 s)
    policy = RetryPolicy(max_attempts=5, initial_delay=0, max_delay=60)
    assert [backoff_cap(policy, n) for n in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert retry_delay(policy, 2, random.Random(1)) == 0.0


def test_a_zero_max_delay_caps_every_wait_at_zero() -> None:
    # mutant: ``secs(policy.max_delay) or 0.0`` -> ``or 1.0``
    policy = RetryPolicy(max_attempts=5, initial_delay=2, max_delay=0)
    assert [backoff_cap(policy, n) for n in (1, 4)] == [0.0, 0.0]
