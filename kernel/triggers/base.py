"""The contract every schedule trigger meets."""

from __future__ import annotations

from typing import Protocol


class Schedule(Protocol):
    """A parsed schedule: pure, no clock reads; instants are UTC seconds since the Unix epoch."""

    expr: str
    """The expression exactly as it was given."""
    tz: str
    """The IANA time zone it is evaluated in."""

    def next_after(self, instant: float) -> float | None:
        """The first fire instant strictly after ``instant``; None if it never fires again.

        Precondition: ``instant`` lies between 1900-01-01 and 9999-12-30 (``ValueError``
        otherwise). Postcondition: the result is a whole number of seconds ``> instant``, and
        no fire instant lies strictly between the two. Calls with the same or any later
        ``instant`` below the result are answered from a memo, so sharing a schedule object
        between many users (:class:`~kernel.triggers.ScheduleCache`) is cheap.
        """
        ...
