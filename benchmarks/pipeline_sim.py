"""Sim figures of groups in flight through pipeline stages (docs/pipeline.md), priced on virtual
GPUs without computing (`pipellm_core.sim.group_pipeline_costs.ring_figures`):

- the h200 profile, the Llama-8B shape as a dense bf16 step: p GPUs running p groups against one
  GPU and today's layer split at the same total batch, into OUT/sim-h200/;
- the rtx4090 profile, the Llama-70B shape (its vocabulary of 128256) on pipellm's Q4_0 kernel
  path: 2 and 4 GPUs at 32 and 64 sequences per group, the partition and each GPU's memory for
  weights and KV cache; and more sequences than fit, with the KV offload of waiting groups, into
  OUT/sim-rtx4090/.

Usage: python benchmarks/pipeline_sim.py OUT (e.g. benchmarks/results)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.bench.report import git_commit
from pipellm_core.gguf.synthetic import SHAPES
from pipellm_core.sim.group_pipeline_costs import ring_figures, stage_layers
from pipellm_core.sim.profiles import get_profile
from pipellm_core.sizes import format_size

STEPS = 32  # decode steps per group, fill and drain of the ring included
LLAMA_8B = SHAPES["llama-8b"].config()
LLAMA_70B = dataclasses.replace(SHAPES["llama-70b"].config(), vocab_size=128256)
CTX_8B = 128
CTX_70B = 512  # positions each row attends, and the KV cache's context


def bubble_bound(stages: int, group_steps: int) -> float:
    """The fill-and-drain share of a run of `group_steps` steps through `stages` stages."""
    return (stages - 1) / (group_steps + stages - 1)


def h200_rows() -> list[dict]:
    rows = []
    for stages in (2, 4):
        for per_group in (256, 128, 32):
            total = stages * per_group
            one = ring_figures(LLAMA_8B, "h200", 1, 1, total, CTX_8B, STEPS)
            split = ring_figures(LLAMA_8B, "h200", stages, 1, total, CTX_8B, STEPS)
            groups = ring_figures(LLAMA_8B, "h200", stages, stages, per_group, CTX_8B, STEPS)
            assert one.tokens == split.tokens == groups.tokens
            rows.append(dict(gpus=stages, per_group=per_group, total_batch=total,
                             one_gpu_tok_s=one.tokens_per_second, split_tok_s=split.tokens_per_second,
                             groups_tok_s=groups.tokens_per_second,
                             gain_vs_one=groups.tokens_per_second / one.tokens_per_second,
                             gain_vs_split=groups.tokens_per_second / split.tokens_per_second,
                             stage_busy=groups.stage_busy, bubble=groups.bubble,
                             bubble_bound=bubble_bound(stages, stages * STEPS)))
    return rows


def q4_0_bytes(rows: int, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLType.Q4_0]
    return rows * cols // block * size


def layer_bytes(c) -> int:
    e, hd, kv = c.n_embd, c.head_dim, c.n_kv_heads * c.head_dim
    matrices = [(c.n_heads * hd, e), (kv, e), (kv, e), (e, c.n_heads * hd), (c.n_ff, e), (c.n_ff, e), (e, c.n_ff)]
    return sum(q4_0_bytes(r, k) for r, k in matrices) + 2 * 4 * e  # the two norms in float32


def kv_bytes(c, layers: int, sequences: int, ctx: int) -> int:
    """The engine's fp16 cache of `layers`: one slot per sequence and its padding slot."""
    return (sequences + 1) * ctx * layers * 2 * c.n_kv_heads * c.head_dim * 2


def partition(c, stages: int, sequences: int, ctx: int) -> list[dict]:
    ends = q4_0_bytes(c.vocab_size, c.n_embd)
    out = []
    for k, layers in enumerate(stage_layers(c.n_layers, stages)):
        weights = len(layers) * layer_bytes(c) + (ends if k == 0 else 0) + (ends + 4 * c.n_embd if k == stages - 1 else 0)
        out.append(dict(stage=k, layers=[layers.start, layers.stop - 1], weights_bytes=weights,
                        kv_cache_bytes=kv_bytes(c, len(layers), sequences, ctx)))
    return out


def rtx4090_rows() -> list[dict]:
    memory = get_profile("rtx4090").memory_bytes
    rows = []
    for stages in (2, 4):
        for per_group in (32, 64):
            split = ring_figures(LLAMA_70B, "rtx4090", stages, 1, stages * per_group, CTX_70B, STEPS, GGMLType.Q4_0)
            groups = ring_figures(LLAMA_70B, "rtx4090", stages, stages, per_group, CTX_70B, STEPS, GGMLType.Q4_0)
            parts = partition(LLAMA_70B, stages, stages * per_group, CTX_70B)
            rows.append(dict(gpus=stages, per_group=per_group, total_batch=stages * per_group,
                             split_tok_s=split.tokens_per_second, groups_tok_s=groups.tokens_per_second,
                             gain_vs_split=groups.tokens_per_second / split.tokens_per_second,
                             stage_busy=groups.stage_busy, bubble=groups.bubble,
                             bubble_bound=bubble_bound(stages, stages * STEPS), partition=parts,
                             fits=all(p["weights_bytes"] + p["kv_cache_bytes"] <= memory for p in parts)))
    return rows


def overlapped(runtime, track: str) -> tuple[float, float]:
    """The time the copies on `track` and their GPU's compute stream run at the same time, as
    a share of the copies' time and of the compute's, from the run's trace."""
    events = runtime.trace.events()
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    spans = {}
    for e in events:
        if e.get("ph") == "X" and e["dur"] > 0:
            spans.setdefault(names.get((e["pid"], e["tid"])), []).append((e["pid"], e["ts"], e["ts"] + e["dur"]))
    copies, compute = spans.get(track, []), spans.get("compute", [])
    both = sum(max(0.0, min(b, d) - max(a, c)) for g, a, b in copies for h, c, d in compute if g == h)
    return both / sum(b - a for _, a, b in copies), both / sum(b - a for _, a, b in compute)


def offload_rows() -> list[dict]:
    """More sequences than fit: groups whose KV caches live in host memory, three groups' rows
    on each GPU (`pipeline.kv_offload`)."""
    memory = get_profile("rtx4090").memory_bytes
    rows = []
    for stages, groups, per_group in ((2, 8, 16), (4, 8, 64)):
        figures = ring_figures(LLAMA_70B, "rtx4090", stages, groups, per_group, CTX_70B, STEPS, GGMLType.Q4_0,
                               trace=True, kv_offload=True)
        sequences = groups * per_group
        without = partition(LLAMA_70B, stages, sequences, CTX_70B)
        parts = [dict(p, kv_cache_bytes=kv_bytes(LLAMA_70B, p["layers"][1] - p["layers"][0] + 1,
                                                 3 * per_group, CTX_70B)) for p in without]
        rows.append(dict(gpus=stages, groups=groups, per_group=per_group, sequences=sequences,
                         groups_tok_s=figures.tokens_per_second, stage_busy=figures.stage_busy,
                         bubble=figures.bubble, overlap_of_copies_in_and_compute=overlapped(figures.runtime, "kv in"),
                         partition=parts,
                         fits_without_offload=all(p["weights_bytes"] + p["kv_cache_bytes"] <= memory for p in without),
                         fits=all(p["weights_bytes"] + p["kv_cache_bytes"] <= memory for p in parts)))
    return rows


def offload_table(rows: list[dict]) -> str:
    lines = ["| GPUs | groups × per group | sequences | fits without offload | GPU share with offload: weights + KV "
             "cache | fits | tok/s | stage busy | copies in and compute at once: share of the copies / of the compute |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['groups']} × {r['per_group']} | {r['sequences']} | "
                     f"{'yes' if r['fits_without_offload'] else 'no'} | {largest_share(r['partition'])} | "
                     f"{'yes' if r['fits'] else 'no'} | "
                     f"{r['groups_tok_s']:.0f} | {percent(r['stage_busy'])} | "
                     f"{percent(r['overlap_of_copies_in_and_compute'])} |")
    return "\n".join(lines) + "\n"


def largest_share(partition: list[dict]) -> str:
    """The GPU that holds most, as 'weights + KV cache'."""
    big = max(partition, key=lambda p: p["weights_bytes"] + p["kv_cache_bytes"])
    return f"{format_size(big['weights_bytes'])} + {format_size(big['kv_cache_bytes'])}"


def percent(values) -> str:
    return " / ".join(f"{v:.0%}" for v in values)


def h200_table(rows: list[dict]) -> str:
    lines = ["| GPUs | per group | total batch | one GPU, tok/s | layer split, 1 group, tok/s | p groups in flight, tok/s "
             "| gain vs one / split | stage busy | bubble (fill and drain bound) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['per_group']} | {r['total_batch']} | {r['one_gpu_tok_s']:.0f} | "
                     f"{r['split_tok_s']:.0f} | {r['groups_tok_s']:.0f} | {r['gain_vs_one']:.2f}x / "
                     f"{r['gain_vs_split']:.2f}x | {percent(r['stage_busy'])} | {r['bubble']:.1%} "
                     f"({r['bubble_bound']:.1%}) |")
    return "\n".join(lines) + "\n"


def rtx4090_table(rows: list[dict]) -> str:
    lines = ["| GPUs | per group | total batch | layer split, 1 group, tok/s | p groups in flight, tok/s | gain "
             "| stage busy | bubble | largest GPU share: weights + KV cache | fits in 24 GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['per_group']} | {r['total_batch']} | {r['split_tok_s']:.0f} | "
                     f"{r['groups_tok_s']:.0f} | {r['gain_vs_split']:.2f}x | {percent(r['stage_busy'])} | "
                     f"{r['bubble']:.1%} | {largest_share(r['partition'])} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines) + "\n"


def partition_lines(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        parts = []
        for p in r["partition"]:
            ends = (" + embedding" if p["stage"] == 0 else "") + (" + head" if p["stage"] == r["gpus"] - 1 else "")
            parts.append(f"stage {p['stage']}: layers {p['layers'][0]}-{p['layers'][1]}{ends}, "
                         f"{format_size(p['weights_bytes'])} weights + {format_size(p['kv_cache_bytes'])} KV cache")
        lines.append(f"- {r['gpus']} GPUs, {r['total_batch']} sequences: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def write(folder: Path, name: str, meta: dict, rows: list[dict], text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    (folder / f"{name}.md").write_text(text)


def main(out: Path) -> None:
    commit = git_commit()
    meta = dict(benchmark="pipeline groups in flight, sim (virtual clock, no computing)", commit=commit,
                steps_per_group=STEPS)
    rows = h200_rows()
    write(out / "sim-h200", "pipeline_groups_llama-8b", {**meta, "profile": "h200", "model": "llama-8b shape, dense bf16",
                                                        "ctx": CTX_8B}, rows,
          f"Llama-8B shape, dense bf16 step, sim h200 profile, context {CTX_8B}, {STEPS} steps per group "
          f"(commit {commit})\n\n" + h200_table(rows))
    rows = offload_rows()
    write(out / "sim-rtx4090", "pipeline_kv_offload_llama-70b-q4_0",
          {**meta, "profile": "rtx4090", "model": "llama-70b shape, Q4_0, vocabulary 128256", "ctx": CTX_70B}, rows,
          f"Llama-70B shape (vocabulary 128256), Q4_0 on the kernel path, sim rtx4090 profile, context "
          f"{CTX_70B}, {STEPS} steps per group, KV offload of waiting groups (commit {commit})\n\n"
          + offload_table(rows))
    rows = rtx4090_rows()
    write(out / "sim-rtx4090", "pipeline_groups_llama-70b-q4_0",
          {**meta, "profile": "rtx4090", "model": "llama-70b shape, Q4_0, vocabulary 128256", "ctx": CTX_70B}, rows,
          f"Llama-70B shape (vocabulary 128256), Q4_0 on the kernel path, sim rtx4090 profile, context "
          f"{CTX_70B}, {STEPS} steps per group (commit {commit})\n\n" + rtx4090_table(rows) + "\nPartitions "
          "(weights and KV cache; activations, graph pools and the CUDA context not counted):\n\n"
          + partition_lines(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
