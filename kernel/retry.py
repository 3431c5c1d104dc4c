"""Retry delays: exponential backoff with full jitter (AWS's "full jitter"), pure.

Attempt ``n`` (the one that just failed, 1-based) waits a uniform random time in
``[0, min(max_delay, initial_delay * multiplier ** (n - 1))]``. The random source is injected.
"""

from __future__ import annotations

import random

from .config import RetryPolicy, secs


def backoff_cap(policy: RetryPolicy, attempt: int) -> float:
    initial = secs(policy.initial_delay) or 0.0
    cap = secs(policy.max_delay) or 0.0
    return float(min(cap, initial * policy.multiplier ** max(0, attempt - 1)))


def retry_delay(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    return rng.uniform(0.0, backoff_cap(policy, attempt))
