"""The engine on the sim backend: real tokens, virtual time, device memory, a trace, and the
calibration of the h100 profile against step times measured on the H100 (DESIGN.md)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from pipellm_core import LLM
from pipellm_core.runtime.engine import Engine
from pipellm_core.errors import PipeLLMError, SimOutOfMemoryError
from pipellm_core.sim import get_profile
from pipellm_core.sim.calibration import simulated_step_seconds
from pipellm_core.runtime.step import StepBatch
from pipellm_core.gguf.synthetic import SHAPES

# plain PyTorch bf16 decode step, batch 1, measured on the H100: (eager, one CUDA graph) seconds
MEASURED_H100 = {"smollm2-135m": (25.2e-3, 2.37e-3), "llama-8b": (34.8e-3, 7.98e-3)}


@pytest.mark.parametrize("shape", sorted(MEASURED_H100))
def test_h100_profile_is_calibrated(shape):
    eager, graph = simulated_step_seconds(SHAPES[shape].config(), "h100")
    want_eager, want_graph = MEASURED_H100[shape]
    assert abs(eager / want_eager - 1) < 0.25, (eager, want_eager)
    assert abs(graph / want_graph - 1) < 0.25, (graph, want_graph)


def test_profiles_rank_as_the_hardware_does():
    cfg = SHAPES["llama-8b"].config()
    graph = {p: simulated_step_seconds(cfg, p)[1] for p in ("h100", "h200", "rtx4090")}
    assert graph["h200"] < graph["h100"] < graph["rtx4090"]  # bandwidth-bound: 4.3, 3.0, 1.0 TB/s


def test_sim_gives_the_torch_cpu_tokens_on_smollm2(smollm2_path):
    """The sim computes on the CPU what the CPU backend computes for the GPU's step shapes."""
    prompt = "The capital of France is"
    sim = LLM(smollm2_path, backend="sim", n_ctx=128, max_batch=1, progress=False)
    cpu = LLM(smollm2_path, backend="torch", n_ctx=128, max_batch=1, progress=False, pad_steps=True)
    a = sim.create_completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    b = cpu.create_completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert a == b
    # virtual time: the step is charged as the CUDA kernel path's ~400 launches, issued eagerly:
    # host-bound at ~15 us a launch, about 6 ms (the torch path's ~6400 operations took ~0.1 s)
    assert 0.002 < sim.stats.decode_seconds / sim.stats.decode_steps < 0.02


def test_device_memory_holds_weights_and_cache(smollm2_path):
    engine = Engine(smollm2_path, max_batch=2, ctx_size=256, progress=False, sim="h100")
    dev = engine.sim.device(0)
    expected = engine.weights.token_embd.nbytes + sum(lw.nbytes for lw in engine.weights.layers) \
        + engine.cache.nbytes
    assert dev.allocated_bytes == expected
    b = StepBatch(torch.tensor([5, 6]), torch.tensor([3, 4]), torch.tensor([0, 1]), 5)
    engine.decode_step(b)
    assert dev.peak_bytes > expected  # activations came and went
    assert dev.allocated_bytes == expected


def test_model_larger_than_the_device_is_out_of_memory(smollm2_path):
    small = dataclasses.replace(get_profile("h100"), name="tiny-gpu", memory_bytes=64 * 2**20)
    with pytest.raises(SimOutOfMemoryError, match=r"sim GPU 0 \(tiny-gpu\) out of memory: tried to allocate"):
        Engine(smollm2_path, max_batch=1, ctx_size=64, progress=False, sim=small)


def test_sim_needs_the_cpu_device(smollm2_path):
    with pytest.raises(PipeLLMError, match="sim backend computes on the CPU"):
        Engine(smollm2_path, device="cuda", sim="h100", progress=False)


def pipellm(*args):
    return subprocess.run([sys.executable, "-m", "pipellm_core.frontends.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_cli_run_on_sim_writes_a_trace(tmp_path, tiny_models):
    trace = tmp_path / "t.json"
    r = pipellm("run", "-m", tiny_models["llama"], "-p", "Hello", "-n", "4", "--temp", "0",
                "--backend", "sim", "--sim-profile", "rtx4090", "--plugins", "graphs",
                "--trace", str(trace), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "decode:" in r.stderr and "(sim, cpu, plugins: graphs)" in r.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    names = {(e["ph"], e["name"], e["args"]["name"]) for e in events if e["ph"] == "M" and "name" in e.get("args", {})}
    assert ("M", "process_name", "GPU 0 (rtx4090)") in names and ("M", "thread_name", "compute") in names
    kernels = [e for e in events if e["ph"] == "X" and e.get("cat") == "kernel"]
    assert any(e["name"].startswith("graph (") for e in kernels)  # replays
    assert any(e["name"].startswith("mm") for e in kernels)  # the eager prefill


def test_cli_trace_needs_sim(tiny_models, tmp_path):
    r = pipellm("run", "-m", tiny_models["llama"], "-p", "Hi", "-n", "1", "--trace", str(tmp_path / "t.json"))
    assert r.returncode == 1 and "--trace records the sim backend" in r.stderr


def test_cli_bench_ablation_on_sim(tiny_models, tmp_path):
    out = tmp_path / "r.json"
    r = pipellm("bench", "-m", tiny_models["llama"], "--backend", "sim", "--ablate", "none;graphs",
                "-b", "2", "--prompt-tokens", "8", "-n", "4", "--repeats", "1", "--json", str(out),
                "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["backend"], row["plugins"], row["same_tokens"]) for row in rows] == \
        [("sim", [], True), ("sim", ["graphs"], True)]
    assert rows[1]["ms_per_step"] < rows[0]["ms_per_step"]
