"""The ablation API: the same decode measurement for each plugin set (and llama.cpp as a row),
with a check that each set produces the same greedy tokens as the run without plugins."""

from __future__ import annotations

import gc

import torch

from pipellm_core.bench.measure import measure_decode
from pipellm_core.gguf.default_model import default_model_path
from pipellm_core.frontends.llm import open_backend
from pipellm_core.gguf.model_file import ModelFile
from pipellm_core.hooks.manager import parse_plugin_list
from pipellm_core.progress import progress_bar
from pipellm_core.runtime.device_choice import choose_device


def _peak_memory(device: str, backend) -> dict:
    if getattr(backend, "sim", None) is not None:
        return {f"sim:{d.index}": d.peak_bytes for d in backend.sim.devices}
    if device.startswith("cuda") and torch.cuda.is_available():
        return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
    return {}


def _gpu_layers(backend, name: str, device: str, baseline_gpu_layers: int | None) -> int:
    """Layers whose weights stay on the GPU (the others stream from host memory, or, for
    llama.cpp, run on the CPU); 0 on a CPU run."""
    n = backend.config.n_layers
    if name == "llamacpp":
        if not device.startswith("cuda"):
            return 0
        return n if baseline_gpu_layers is None or baseline_gpu_layers < 0 else min(n, baseline_gpu_layers)
    if getattr(backend, "sim", None) is None and not device.startswith("cuda"):
        return 0
    return sum(p.resident for p in backend.plan.layers)


def _device_label(backend: str, device: str, options: dict) -> str:
    profile = options.get("sim_profile", "h100")
    return f"sim-{getattr(profile, 'name', profile)}" if backend == "sim" else device


def ablate(model: str | None = None, plugin_sets=([],), *, backend: str = "torch",
           device: str | None = None, batch: int = 1, prompt_tokens: int = 128, n_predict: int = 128,
           repeats: int = 3, warmup: int = 1, baseline: str | None = None,
           baseline_gpu_layers: int | None = None, progress: bool = True, **engine_options) -> list[dict]:
    """Measure decode speed for each plugin set on `backend` (plus `baseline="llamacpp"` as a
    row measured in the same run, with `baseline_gpu_layers` of its layers on the GPU if given). Each row: plugins, tok/s, ms/step, weight GB/s, peak memory
    per device, and `same_tokens` (greedy tokens equal to the first plugin set's).
    `engine_options` go to the engine of every plugin set (`sim_profile`, `plugin_options`).
    `device` None or "auto": CUDA where torch sees a GPU, else the CPU ($PIPELLM_DEVICE first)."""
    device = choose_device(device, backend)
    path = model or default_model_path()
    weight_bytes = ModelFile(path).decode_weight_bytes()
    runs = [(backend, parse_plugin_list(p)) for p in plugin_sets]
    if baseline:
        runs.append((baseline, []))
    bar = progress_bar(total=len(runs) * (warmup + repeats), desc="ablation", enabled=progress)
    rows, reference = [], None
    for name, plugins in runs:
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        options = engine_options if name == backend else (
            {"n_gpu_layers": baseline_gpu_layers} if baseline_gpu_layers is not None else {})
        be = open_backend(path, name, plugins=plugins, device=device,
                          n_ctx=prompt_tokens + n_predict + 8, max_batch=batch, progress=False, **options)
        m = measure_decode(be, batch=batch, prompt_tokens=prompt_tokens, n_predict=n_predict,
                           repeats=repeats, warmup=warmup, backend_name=name, plugins=plugins,
                           device=_device_label(name, device, options), weight_bytes=weight_bytes,
                           progress=bar)
        row = m.row()
        row["peak_memory"] = _peak_memory(device, be)
        row["gpu_layers"] = _gpu_layers(be, name, device, baseline_gpu_layers)
        if name == backend:
            reference = reference if reference is not None else m.tokens
            row["same_tokens"] = m.tokens == reference
        else:
            row["same_tokens"] = None  # another backend: compared in the correctness tests
        rows.append(row)
        if hasattr(be, "close"):
            be.close()
        del be
        gc.collect()
    bar.close()
    return rows
