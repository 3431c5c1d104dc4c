"""GPU-aware admission through a FAKE card (simulated memory), plus one test that reads a real
card through NVML and is skipped where there is none."""

from __future__ import annotations

import pytest

from kernel.app import KernelParts, SubmitRequest
from kernel.errors import GpuUnavailable
from kernel.gpu import FakeGpuProbe, GpuGate, NvmlProbe
from kernel.records import Job, Outcome

from .harness import make_harness


def gpu_job(i: str, mb: int, gpu: int | None = None) -> Job:
    return Job(id=i, action="x", due_at=0.0, gpu_memory_mb=mb, gpu=gpu)


def test_gate_reserves_memory_so_two_jobs_never_share_it() -> None:
    gate = GpuGate(FakeGpuProbe(total_mb=[16_000]))
    assert gate.try_admit(gpu_job("a", 10_000))
    # NVML still reports 16 GB free (job a has not allocated yet): the reservation protects it
    assert not gate.try_admit(gpu_job("b", 10_000))
    assert gate.last_reason["b"] == "waiting for 10000 MB of GPU memory"
    assert gate.try_admit(gpu_job("c", 6_000))
    gate.release(gpu_job("a", 10_000))
    assert gate.try_admit(gpu_job("b", 10_000))


def test_gate_respects_memory_used_by_other_processes() -> None:
    probe = FakeGpuProbe(total_mb=[80_000], used_by_others_mb=[72_000])  # a vLLM server at 90 %
    gate = GpuGate(probe)
    assert not gate.try_admit(gpu_job("a", 10_000))
    assert gate.try_admit(gpu_job("b", 8_000))


def test_gate_picks_the_roomiest_card_or_the_asked_one() -> None:
    gate = GpuGate(FakeGpuProbe(total_mb=[24_000, 48_000], used_by_others_mb=[0, 0]))
    assert gate.try_admit(gpu_job("a", 1_000))
    assert gate.assignment("a") == 1
    assert gate.try_admit(gpu_job("b", 1_000, gpu=0))
    assert gate.assignment("b") == 0
    assert gate.never_fits(60_000, None) == "needs 60000 MB but the largest card has 48000 MB"
    assert gate.never_fits(1_000, 5) is not None


def test_no_gpu_holds_jobs_with_a_clear_reason() -> None:
    gate = GpuGate(FakeGpuProbe(total_mb=[], used_by_others_mb=[]))
    assert not gate.try_admit(gpu_job("a", 1))
    assert "no GPU" in gate.last_reason["a"]
    assert gate.try_admit(gpu_job("cpu", 0))


async def test_concurrent_gpu_jobs_never_oversubscribe_the_fake_card() -> None:
    probe = FakeGpuProbe(total_mb=[24_000])
    h = make_harness("""
        [scheduler]
        max_concurrency = 16
        """, parts=KernelParts(gpu_probe=probe))
    await h.start()
    peak = 0

    def watch(_ev: object) -> None:
        nonlocal peak
        peak = max(peak, h.kernel.gpu.reserved_mb(0))

    h.kernel.bus.subscribe(watch)
    for i in range(12):
        await h.kernel.submit(SubmitRequest(
            action="rec", gpu_memory_mb=7_000, payload={"mode": "sleep", "seconds": 10 + i}))
    await h.idle()
    snap = h.kernel.snapshot()
    assert len(snap.running) == 3  # 3 x 7 GB fit in 24 GB, the 4th does not
    assert snap.gpus[0].reserved_mb == 21_000
    assert any(q.held == "waiting for 7000 MB of GPU memory" for q in snap.queued_jobs)
    await h.advance(200, step=1)
    runs = await h.runs()
    assert len(runs) == 12 and all(r.outcome is Outcome.SUCCEEDED for r in runs)
    assert 0 < peak <= 24_000
    assert h.kernel.gpu.reserved_mb(0) == 0
    await h.stop()


async def test_a_job_bigger_than_the_card_is_refused_at_submission() -> None:
    h = make_harness("", parts=KernelParts(gpu_probe=FakeGpuProbe(total_mb=[24_000])))
    await h.start()
    with pytest.raises(GpuUnavailable, match="largest card has 24000 MB"):
        await h.kernel.submit(SubmitRequest(action="rec", gpu_memory_mb=30_000))
    assert await h.store.count_jobs() == 0
    await h.stop()


async def test_without_a_gpu_jobs_are_held_or_refused_as_configured() -> None:
    none = FakeGpuProbe(total_mb=[], used_by_others_mb=[])
    h = make_harness("", parts=KernelParts(gpu_probe=none))
    await h.start()
    res = await h.kernel.submit(SubmitRequest(action="rec", gpu_memory_mb=100))
    await h.advance(5)
    assert h.rec.calls == []
    (q,) = h.kernel.snapshot().queued_jobs
    assert q.job_id == res.job.id and "no GPU" in (q.held or "")
    await h.stop()
    h2 = make_harness("""
        [scheduler]
        gpu_unavailable = "refuse"
        """, parts=KernelParts(gpu_probe=none))
    await h2.start()
    with pytest.raises(GpuUnavailable, match="no GPU"):
        await h2.kernel.submit(SubmitRequest(action="rec", gpu_memory_mb=100))
    await h2.stop()


async def test_task_gpu_declaration_reaches_the_action_as_cuda_visible_devices() -> None:
    h = make_harness("""
        [[tasks]]
        id = "embed"
        schedule = "@every 10s"
        action = "rec"
        gpu_memory_mb = 2000
        gpu = 1
        """, parts=KernelParts(gpu_probe=FakeGpuProbe(total_mb=[8_000, 8_000],
                                                      used_by_others_mb=[0, 0])))
    await h.start()
    await h.advance(10)
    (call,) = h.rec.calls
    assert call.gpu_index == 1
    await h.stop()


def test_nvml_probe_without_a_gpu_reports_why_and_never_raises() -> None:
    probe = NvmlProbe()
    cards = probe.gpus()
    if cards:
        pytest.skip("a real GPU is present: covered by the gpu-marked test")
    assert probe.unavailable_reason is not None


@pytest.mark.gpu
def test_real_card_is_read_through_nvml() -> None:
    probe = NvmlProbe()
    cards = probe.gpus()
    if not cards:
        pytest.skip(f"no NVIDIA GPU here: {probe.unavailable_reason}")
    c = cards[0]
    assert c.total_mb > 1000 and 0 <= c.free_mb <= c.total_mb
    gate = GpuGate(probe)
    assert gate.try_admit(gpu_job("real", 100))
    assert gate.reserved_mb(c.index) == 100
