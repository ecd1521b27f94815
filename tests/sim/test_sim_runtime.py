"""The simulated GPU runtime: timing, copies, events, memory, hazard detection and the Chrome trace."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipellm_core.errors import HazardError, PipeLLMError, SimOutOfMemoryError
from pipellm_core.sim import PROFILES, SimRuntime, get_profile
from pipellm_core.sim.trace import TraceRecorder

# the h100 profile with round overheads, so the expected times below read plainly (the real
# profile's overheads are calibrated, and change with calibration)
H100 = dataclasses.replace(PROFILES["h100"], eager_op_host_s=30e-6, view_op_host_s=4e-6,
                           kernel_min_s=2.0e-6, graph_launch_host_s=15e-6, graph_node_s=1.0e-6)
H200 = dataclasses.replace(PROFILES["h200"], eager_op_host_s=30e-6, view_op_host_s=4e-6,
                           kernel_min_s=2.0e-6, graph_launch_host_s=15e-6, graph_node_s=1.0e-6)
GiB = 2**30
approx = pytest.approx


def streams(rt: SimRuntime, device: int = 0):
    d = rt.device(device)
    return d.default_stream, d.stream("copy")


# profiles


def test_kernel_seconds_takes_the_slowest_bound():
    assert H100.kernel_seconds(nbytes=2984e6, flops=1e9) == approx(1e-3)  # bandwidth-bound
    assert H100.kernel_seconds(nbytes=1e6, flops=600e9) == approx(1e-3)  # flop-bound
    assert H100.kernel_seconds(nbytes=100, flops=100) == H100.kernel_min_s == 2.0e-6


def test_copy_seconds_per_kind():
    n = 54.8e6
    assert H100.copy_seconds(n, "h2d") == approx(5e-6 + 1e-3)
    assert H100.copy_seconds(52.6e6, "d2h") == approx(5e-6 + 1e-3)
    assert H100.copy_seconds(20e6, "h2d", pinned=False) == approx(5e-6 + 1e-3)
    assert H100.copy_seconds(18e6, "d2h", pinned=False) == approx(5e-6 + 1e-3)
    assert H100.copy_seconds(2984e6, "d2d") == approx(5e-6 + 2e-3)  # reads and writes
    assert H100.copy_seconds(300e6, "peer") == approx(5e-6 + 1e-3)
    with pytest.raises(ValueError, match="unknown copy kind 'h2h'"):
        H100.copy_seconds(1, "h2h")


def test_profiles_figures():
    assert set(PROFILES) == {"h100", "h200", "rtx4090"}
    h200, rtx = get_profile("h200"), get_profile("RTX4090")
    assert H100.memory_bytes == 85_031_714_816 and f"{H100.memory_bytes / GiB:.2f}" == "79.19"
    assert h200.memory_bytes == 150_754_820_096 and h200.hbm_bytes_per_s == 4300e9
    assert h200.eager_op_host_s == PROFILES["h100"].eager_op_host_s and h200.flops_per_s == 600e12
    assert rtx.memory_bytes == 25_757_220_864 and rtx.peer_bytes_per_s == rtx.pinned_h2d_bytes_per_s
    assert all(p.notes for p in PROFILES.values())


def test_unknown_profile_lists_known_names():
    with pytest.raises(PipeLLMError, match="'a100'.*h100, h200, rtx4090"):
        get_profile("a100")
    with pytest.raises(PipeLLMError):
        SimRuntime("a100")


# timing


def test_launch_pays_host_cost_then_runs_after_the_stream():
    rt = SimRuntime(H100, trace=False)
    compute = rt.device(0).default_stream
    assert compute.name == "compute" and rt.host_time == 0.0
    assert compute.launch("long", 1e-3) == approx((30e-6, 30e-6 + 1e-3))
    assert rt.host_time == approx(30e-6)
    # the host is ahead of nothing: the next kernel waits for the stream, not for the host
    assert compute.launch("next", 10e-6) == approx((1.03e-3, 1.04e-3))
    assert rt.host_time == approx(60e-6)
    assert compute.clock == approx(1.04e-3)
    start, end = compute.launch("view", 0.0, host_cost=4e-6)
    assert rt.host_time == approx(64e-6) and start == end == approx(1.04e-3)
    assert rt.elapsed() == approx(1.04e-3)


def test_short_kernels_are_host_bound():
    rt = SimRuntime(H100, trace=False)
    s = rt.device(0).default_stream
    for _ in range(10):
        s.launch("tiny", 2e-6)
    assert rt.host_time == approx(300e-6)
    assert s.clock == approx(302e-6)


def test_two_streams_overlap():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    a = compute.launch("a", 1e-3)
    b = copy.launch("b", 1e-3)
    assert b[0] == approx(60e-6) and b[0] < a[1]  # b starts while a runs
    assert rt.elapsed() == approx(60e-6 + 1e-3)
    rt.synchronize()
    assert rt.host_time == approx(60e-6 + 1e-3)


def test_pinned_copy_overlaps_host_work_but_pageable_blocks():
    rt = SimRuntime(H100, trace=False)
    _, copy = streams(rt)
    start, end = copy.copy("w", int(54.8e6), "h2d", pinned=True)
    assert (start, end) == approx((30e-6, 30e-6 + 5e-6 + 1e-3))
    assert rt.host_time == approx(30e-6)  # returned at once
    rt.host_work(0.5e-3)
    assert rt.host_time == approx(530e-6) and rt.host_time < end

    rt = SimRuntime(H100, trace=False)
    _, copy = streams(rt)
    start, end = copy.copy("w", int(20e6), "h2d", pinned=False)
    assert (start, end) == approx((30e-6, 30e-6 + 5e-6 + 1e-3))
    assert rt.host_time == approx(end)  # the host waited for it
    start, end = copy.copy("out", int(18e6), "d2h", pinned=False)
    assert end - start == approx(5e-6 + 1e-3) and rt.host_time == approx(end)
    start, end = copy.copy("dev", int(2984e6), "d2d", pinned=False)  # pageable means nothing on the device
    assert end - start == approx(5e-6 + 2e-3) and rt.host_time == approx(start)


def test_event_wait_delays_consumer_stream():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    _, copy_end = copy.copy("w", int(54.8e6), "h2d")
    ev = copy.record_event()
    assert ev.time == approx(copy_end) and not ev.query()
    compute.wait_event(ev)
    start, _ = compute.launch("use w", 1e-5)
    assert start == approx(copy_end)
    free_start, _ = rt.device(0).stream("other").launch("independent", 1e-5)
    assert free_start == approx(rt.host_time)  # a stream that did not wait starts at once
    ev.synchronize()
    assert rt.host_time == approx(copy_end) and ev.query()


def test_wait_on_unrecorded_event_is_a_noop_and_wait_stream():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    ev = rt.event()
    assert ev.time is None and not ev.query()
    compute.wait_event(ev)
    ev.synchronize()
    assert compute.clock == 0.0 and rt.host_time == 0.0
    _, end = copy.launch("producer", 1e-3)
    compute.wait_stream(copy)
    assert compute.launch("consumer", 1e-6)[0] == approx(end)


def test_event_on_idle_stream_completes_when_recorded_and_elapsed_time():
    rt = SimRuntime(H100, trace=False)
    compute, _ = streams(rt)
    rt.host_work(1e-3)
    a = compute.record_event()
    assert a.time == approx(1e-3) and a.query()
    compute.launch("k", 2e-3)
    b = compute.record_event()
    assert a.elapsed_time(b) == approx(2.03)  # milliseconds, as torch


def test_synchronize_one_device():
    rt = SimRuntime(H200, n_devices=2, trace=False)
    rt.device(0).default_stream.launch("a", 1e-3)
    rt.device(1).default_stream.launch("b", 5e-3)
    rt.synchronize(0)
    assert rt.host_time == approx(30e-6 + 1e-3)
    rt.synchronize()
    assert rt.host_time == approx(60e-6 + 5e-3)
    with pytest.raises(PipeLLMError, match="no sim GPU 2"):
        rt.device(2)


# memory


def test_allocation_accounting_and_oom_message():
    rt = SimRuntime(H100, trace=False)
    dev = rt.device(0)
    weights = dev.allocate(78 * GiB, "weights")
    with pytest.raises(SimOutOfMemoryError) as err:
        dev.allocate(int(1.5 * GiB), "kv cache")
    assert str(err.value) == ("sim GPU 0 (h100) out of memory: tried to allocate 1.50 GiB (kv cache); "
                              "78.00 GiB of 79.19 GiB already allocated, 1.19 GiB free")
    assert dev.allocated_bytes == 78 * GiB
    kv = dev.allocate(GiB, "kv cache")
    assert dev.allocated_bytes == dev.peak_bytes == 79 * GiB
    dev.free(weights)
    assert dev.allocated_bytes == GiB and dev.peak_bytes == 79 * GiB
    dev.reset_peak()
    assert dev.peak_bytes == GiB
    dev.free(kv)
    assert dev.allocated_bytes == 0 and dev.peak_bytes == GiB
    with pytest.raises(PipeLLMError, match="double free"):
        dev.free(kv)


def test_devices_have_separate_memory():
    rt = SimRuntime("rtx4090", n_devices=2, trace=False)
    a = rt.device(0).allocate(20 * GiB)
    rt.device(1).allocate(20 * GiB)
    with pytest.raises(SimOutOfMemoryError, match=r"sim GPU 1 \(rtx4090\).*tried to allocate 5.00 GiB; "):
        rt.device(1).allocate(5 * GiB)
    with pytest.raises(PipeLLMError, match="not allocated on it"):
        rt.device(1).free(a)


# hazards


def test_read_before_copy_is_ordered_is_a_hazard():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    early = copy.record_event()  # before the copy: orders nothing useful
    copy.copy("copy: layer 3", 1 << 20, "h2d", dst="attn.w")
    compute.wait_event(early)
    host_before, clock_before = rt.host_time, compute.clock
    with pytest.raises(HazardError) as err:
        compute.launch("matmul", 1e-5, reads=["attn.w"])
    assert str(err.value) == ("hazard: 'attn.w' read on GPU 0 stream 'compute' while its write by "
                              "'copy: layer 3' on stream 'copy' may not have completed (no event orders them)")
    assert (rt.host_time, compute.clock) == (host_before, clock_before)  # nothing was queued

    compute.wait_event(copy.record_event())
    compute.launch("matmul", 1e-5, reads=["attn.w"])


def test_overwriting_a_buffer_still_being_read_is_a_hazard():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    compute.launch("matmul", 1e-3, reads=["buf0"], writes=["out"])
    with pytest.raises(HazardError) as err:
        copy.copy("prefetch", 1 << 20, "h2d", dst="buf0")
    assert str(err.value) == ("hazard: 'buf0' written on GPU 0 stream 'copy' while stream 'compute' "
                              "may still be reading it ('matmul', no event orders them)")
    copy.wait_event(compute.record_event())
    copy.copy("prefetch", 1 << 20, "h2d", dst="buf0")
    # and the next reader must wait for the new write
    with pytest.raises(HazardError, match="'buf0' read on GPU 0 stream 'compute'"):
        compute.launch("matmul", 1e-3, reads=["buf0"])


def test_write_after_unordered_write_is_a_hazard():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    compute.launch("fill", 1e-5, writes=["x"])
    with pytest.raises(HazardError, match="'x' written on GPU 0 stream 'copy' while its write by 'fill'"):
        copy.copy("load", 64, "h2d", dst="x")


@pytest.mark.parametrize("sync", ["runtime", "device", "stream", "event"])
def test_host_synchronize_orders_later_work(sync):
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    compute.launch("matmul", 1e-3, reads=["buf0"])
    copy.copy("copy", 64, "h2d", dst="w")
    ev = compute.record_event()
    ev_copy = copy.record_event()
    if sync == "runtime":
        rt.synchronize()
    elif sync == "device":
        rt.device(0).synchronize()
    elif sync == "stream":
        compute.synchronize()
        copy.synchronize()
    else:
        ev.synchronize()
        ev_copy.synchronize()
    copy.copy("prefetch", 64, "h2d", dst="buf0")  # the read is known done
    compute.launch("use", 1e-6, reads=["w"])  # the write is known done


def test_synchronizing_the_wrong_stream_does_not_order():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    copy.copy("copy", 64, "h2d", dst="w")
    compute.synchronize()
    with pytest.raises(HazardError):
        compute.launch("use", 1e-6, reads=["w"])


def test_same_stream_never_a_hazard():
    rt = SimRuntime(H100, trace=False)
    compute, _ = streams(rt)
    compute.launch("a", 1e-6, writes=["x"])
    compute.launch("b", 1e-6, reads=["x"], writes=["y"])
    compute.launch("c", 1e-6, writes=["x"])
    compute.launch("d", 1e-6, reads=["x", "y"], writes=["x"])


def test_ordering_is_transitive_through_events():
    rt = SimRuntime(H100, n_devices=2, trace=False)
    s1, s2 = streams(rt, 0)
    s3 = rt.device(1).default_stream
    s1.launch("produce", 1e-6, writes=["x"])
    s2.wait_event(s1.record_event())
    s2.launch("read", 1e-6, reads=["x"])
    s3.wait_event(s2.record_event())
    s3.launch("overwrite", 1e-6, writes=["x"])  # after both the write and the read
    assert s3.clock >= s2.clock >= s1.clock > 0
    # without the second wait, the overwrite races with the read
    rt = SimRuntime(H100, n_devices=2, trace=False)
    s1, s2 = streams(rt, 0)
    s1.launch("produce", 1e-6, writes=["x"])
    s2.wait_event(s1.record_event())
    s2.launch("read", 1e-6, reads=["x"])
    with pytest.raises(HazardError):
        rt.device(1).default_stream.launch("overwrite", 1e-6, writes=["x"])


def test_peer_copy_checks_across_devices():
    rt = SimRuntime(H200, n_devices=2, trace=False)
    g0, g1 = rt.device(0).default_stream, rt.device(1).default_stream
    g1.launch("layer 20", 1e-3, writes=["hidden"])
    with pytest.raises(HazardError, match="'hidden' read on GPU 0 stream 'compute' while its write by "
                                          "'layer 20' on GPU 1 stream 'compute'"):
        g0.copy("peer", 1 << 20, "peer", src="hidden", dst="hidden@0")
    g0.wait_stream(g1)
    g0.copy("peer", 1 << 20, "peer", src="hidden", dst="hidden@0")


def test_host_access_to_pinned_buffers():
    rt = SimRuntime(H100, trace=False)
    compute, copy = streams(rt)
    copy.copy("logits d2h", 1 << 10, "d2h", dst="pinned_logits")
    with pytest.raises(HazardError, match="'pinned_logits' read on the host while its write by 'logits d2h'"):
        rt.host_work(1e-6, "sample", reads=["pinned_logits"])
    copy.synchronize()
    rt.host_work(1e-6, "sample", reads=["pinned_logits"])
    copy.copy("tokens h2d", 64, "h2d", src="pinned_tokens")
    with pytest.raises(HazardError, match="the host.*may still be reading|'pinned_tokens' written on the host"):
        rt.host_work(1e-6, "refill", writes=["pinned_tokens"])
    # what the host wrote is ordered before anything it issues afterwards
    rt.host_work(1e-6, "fill", writes=["pinned_ids"])
    compute.launch("embed", 1e-6, reads=["pinned_ids"])


def _unordered_accesses(rt):
    """A read of a copy's destination, and a copy over a buffer being read, neither ordered."""
    compute, copy = streams(rt)
    copy.copy("copy", 64, "h2d", dst="w")
    compute.launch("use", 1e-6, reads=["w"])
    compute.launch("matmul", 1e-3, reads=["buf0"])
    copy.copy("prefetch", 64, "h2d", dst="buf0")
    return compute, copy


def test_check_hazards_off():
    with pytest.raises(HazardError, match="'w' read"):  # checked, the same accesses are a hazard
        _unordered_accesses(SimRuntime(H100, trace=False))
    rt = SimRuntime(H100, trace=False)
    rt.check_hazards = False
    compute, copy = _unordered_accesses(rt)
    # unchecked, every operation still ran and took its time
    assert compute.clock == approx(3 * 30e-6 + 1e-3)  # copy, use, matmul issued 30 µs apart; matmul 1 ms
    assert copy.clock > 3 * 30e-6  # the prefetch was issued after the matmul


# trace


def test_chrome_trace(tmp_path):
    rt = SimRuntime(H100, n_devices=2)
    compute, copy = streams(rt)
    compute.launch("matmul", 1e-3)
    copy.copy("weights", int(54.8e6), "h2d")
    rt.host_work(2e-4, "sample")
    rt.device(0).allocate(GiB, "weights")
    path = tmp_path / "trace.json"
    rt.save_trace(path)
    data = json.loads(path.read_text())
    assert data["displayTimeUnit"] == "ms"
    events = data["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert processes == {0: "GPU 0 (h100)", 1: "GPU 1 (h100)", 2: "host"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert threads == {(0, 0): "compute", (0, 1): "copy", (1, 0): "compute", (2, 0): "python"}

    spans = {e["name"]: e for e in events if e["ph"] == "X"}
    assert set(spans) == {"matmul", "weights", "sample"}
    k, c, h = spans["matmul"], spans["weights"], spans["sample"]
    assert (k["cat"], k["pid"], k["tid"], k["ts"], k["dur"]) == ("kernel", 0, 0, approx(30.0), approx(1000.0))
    assert (c["cat"], c["pid"], c["tid"], c["ts"], c["dur"]) == ("copy", 0, 1, approx(60.0), approx(1005.0))
    assert c["args"] == {"bytes": int(54.8e6), "kind": "h2d", "pinned": True}
    assert (h["cat"], h["pid"], h["tid"], h["ts"], h["dur"]) == ("host", 2, 0, approx(60.0), approx(200.0))
    [mem] = [e for e in events if e["ph"] == "C"]
    assert mem["pid"] == 0 and mem["args"] == {"allocated_bytes": GiB}
    assert data["otherData"]["truncated"] is False


def test_trace_cap(tmp_path):
    rt = SimRuntime(H100, max_trace_events=3)
    s = rt.device(0).default_stream
    for i in range(5):
        s.launch(f"k{i}", 1e-6)
    rt.save_trace(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    assert [e["name"] for e in data["traceEvents"] if e["ph"] == "X"] == ["k0", "k1", "k2"]
    assert data["otherData"] == {"simulated": True, "profile": "h100", "n_devices": 1, "max_events": 3,
                                 "dropped_events": 2, "truncated": True}
    assert TraceRecorder().to_dict()["traceEvents"] == []


def test_no_trace():
    rt = SimRuntime(H100, trace=False)
    rt.device(0).default_stream.launch("k", 1e-6)
    assert rt.trace is None
    with pytest.raises(PipeLLMError, match="trace=False"):
        rt.save_trace("unused.json")


def test_busy_seconds_of_a_stream_and_of_a_timed_step():
    """Each stream adds up the time of its work; a virtual step timer gives what each stage's
    stream ran within the step, not the work before it."""
    from pipellm_core.sim.timer import VirtualTimer

    rt = SimRuntime(H100, n_devices=2, trace=False)
    gpu0, gpu1 = rt.device(0).default_stream, rt.device(1).default_stream
    gpu0.launch("before the step", 1e-3)
    rt.synchronize()  # as the engine's steps start: the host has seen the work before complete
    busy = lambda: [gpu0.busy_seconds, gpu1.busy_seconds]  # noqa: E731
    with VirtualTimer(rt, busy) as t:
        gpu0.launch("a", 2e-3)
        gpu1.launch("b", 3e-3, host_cost=0.0)
        gpu0.copy("c", 10**6, "peer")
    assert gpu0.busy_seconds == pytest.approx(3e-3 + H100.copy_seconds(10**6, "peer"))
    assert t.busy == pytest.approx([2e-3 + H100.copy_seconds(10**6, "peer"), 3e-3])
    assert t.seconds == pytest.approx(30e-6 + 3e-3)  # GPU 1's kernel, issued after one launch
    assert VirtualTimer(rt).busy is None
