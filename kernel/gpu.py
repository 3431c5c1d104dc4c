"""GPU-aware admission: read the cards through NVML, reserve declared memory per job.

A job declaring ``gpu_memory_mb`` starts only when a card (its ``gpu`` index, or any) has room,
and the memory stays reserved until the job finishes, so two jobs never both see the same free
memory (the race GPU task-spooler users report). Room on a card is deliberately conservative::

    room = min(free_mb_reported_by_nvml, total_mb - reserved_mb_by_our_running_jobs) - headroom

Both terms must allow the job: the first protects memory used by other processes (an LLM server
that pre-allocates 90 % of the card), the second protects our own admitted jobs that have not
allocated yet. Memory a running job already holds is counted twice, which may hold a job longer
than needed but never oversubscribes the card.

Without NVML or a GPU (this machine, CI) ``NvmlProbe`` reports no cards: GPU jobs are held with
a clear reason (``[scheduler] gpu_unavailable = "hold"``) or refused at submission (``"refuse"``);
nothing crashes. Tests use ``FakeGpuProbe``, a simulated card, never a real one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from .records import Job

log = logging.getLogger("kernel.gpu")


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    total_mb: int
    free_mb: int
    utilization_pct: int | None = None


class GpuProbe(Protocol):
    def gpus(self) -> list[GpuInfo]:
        """The cards now; an empty list when there is no GPU or no NVML."""
        ...

    @property
    def unavailable_reason(self) -> str | None:
        """Why no card can be read (None when cards are readable)."""
        ...


class NvmlProbe:
    """Reads the real cards through ``nvidia-ml-py`` (pynvml). Initialised lazily, once."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._reason: str | None = None
        self._tried = False

    def _init(self) -> None:
        self._tried = True
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            self._reason = f"NVML is not available ({exc}); no GPU can be used"
            log.info("%s", self._reason)

    @property
    def unavailable_reason(self) -> str | None:
        if not self._tried:
            self._init()
        return self._reason

    def gpus(self) -> list[GpuInfo]:
        if not self._tried:
            self._init()
        if self._nvml is None:
            return []
        nv = self._nvml
        out: list[GpuInfo] = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util: int | None = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except Exception:
                    util = None
                name = nv.nvmlDeviceGetName(h)
                out.append(GpuInfo(i, name.decode() if isinstance(name, bytes) else str(name),
                                   int(mem.total) // (1 << 20), int(mem.free) // (1 << 20), util))
        except Exception as exc:
            self._reason = f"NVML query failed: {exc}"
            log.warning("%s", self._reason)
            return []
        return out


@dataclass
class FakeGpuProbe:
    """A FAKE card for tests: memory is simulated, ``used_by_others_mb`` plays other processes."""

    total_mb: list[int] = field(default_factory=lambda: [24_000])
    used_by_others_mb: list[int] = field(default_factory=lambda: [0])

    @property
    def unavailable_reason(self) -> str | None:
        return None if self.total_mb else "no GPU (fake probe with no cards)"

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(i, f"FakeGPU-{i}", t, max(0, t - self.used_by_others_mb[i]))
                for i, t in enumerate(self.total_mb)]


class GpuGate:
    """The dispatcher's gate for GPU memory. Holds reservations of running jobs."""

    def __init__(self, probe: GpuProbe, headroom_mb: int = 0) -> None:
        self.probe = probe
        self.headroom_mb = headroom_mb
        self._reserved: dict[str, tuple[int, int]] = {}  # job id -> (gpu index, mb)
        self.last_reason: dict[str, str] = {}
        self._plan_cards: list[GpuInfo] | None = None  # one reading per dispatcher plan
        self._in_plan = False

    def begin_plan(self) -> None:
        """The dispatcher starts a plan: read the cards at most once until ``end_plan``."""
        self._plan_cards = None
        self._in_plan = True

    def end_plan(self) -> None:
        self._in_plan = False
        self._plan_cards = None

    def _cards(self) -> list[GpuInfo]:
        if not self._in_plan:
            return self.probe.gpus()
        if self._plan_cards is None:
            self._plan_cards = self.probe.gpus()
        return self._plan_cards

    def reserved_mb(self, index: int) -> int:
        return sum(mb for gi, mb in self._reserved.values() if gi == index)

    def assignment(self, job_id: str) -> int | None:
        r = self._reserved.get(job_id)
        return r[0] if r else None

    def never_fits(self, need_mb: int, gpu: int | None) -> str | None:
        """Why a job can never run here (to refuse it at submission), or None."""
        cards = self.probe.gpus()
        if not cards:
            return None  # no card readable now: held, not refused (unless configured so)
        if gpu is not None:
            card = next((c for c in cards if c.index == gpu), None)
            if card is None:
                return f"there is no GPU {gpu} (GPUs: {', '.join(str(c.index) for c in cards)})"
            cards = [card]
        biggest = max(c.total_mb for c in cards)
        if need_mb > biggest - self.headroom_mb:
            return f"needs {need_mb} MB but the largest card has {biggest} MB"
        return None

    def try_admit(self, job: Job) -> bool:
        if job.gpu_memory_mb <= 0:
            return True
        cards = self._cards()
        if not cards:
            self.last_reason[job.id] = self.probe.unavailable_reason or "no GPU"
            return False
        best: tuple[int, int] | None = None
        for c in cards:
            if job.gpu is not None and c.index != job.gpu:
                continue
            room = min(c.free_mb, c.total_mb - self.reserved_mb(c.index)) - self.headroom_mb
            if room >= job.gpu_memory_mb and (best is None or room > best[1]):
                best = (c.index, room)
        if best is None:
            self.last_reason[job.id] = f"waiting for {job.gpu_memory_mb} MB of GPU memory"
            return False
        self._reserved[job.id] = (best[0], job.gpu_memory_mb)
        self.last_reason.pop(job.id, None)
        return True

    def release(self, job: Job) -> None:
        self._reserved.pop(job.id, None)
        self.last_reason.pop(job.id, None)

    def views(self) -> list[tuple[GpuInfo, int]]:
        """Each card with the memory reserved on it by running jobs (for snapshots, metrics)."""
        return [(c, self.reserved_mb(c.index)) for c in self.probe.gpus()]
