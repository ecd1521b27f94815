"""Benchmark results as files: JSON with the device, commit and every parameter; a markdown
table; a PNG bar chart."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from pipellm_core.errors import PipeLLMError


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    if os.environ.get("PIPELLM_COMMIT"):
        return os.environ["PIPELLM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def make_result(model_label: str, model_path: str, device: str, parameters: dict, rows: list[dict]) -> dict:
    return {
        "benchmark": "decode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(device),
        "model": model_label,
        "model_file_bytes": os.path.getsize(model_path),
        "torch": torch.__version__,
        "parameters": parameters,
        "rows": rows,
    }


def markdown_table(result: dict) -> str:
    p = result["parameters"]
    lines = [f"{result['model']} on {result['device']} (commit {result['commit']}, prompt "
             f"{p['prompt_tokens']} tokens, {p['n_predict']} generated, median of {p['repeats']})", "",
             "| backend | plugins | batch | GPU layers | tok/s | ms/step | weight GB/s | stage busy | bubble "
             "| same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = {True: "yes", False: "NO", None: "-"}[r.get("same_tokens")]
        busy = " / ".join(f"{b:.0%}" for b in r["stage_busy"]) if r.get("stage_busy") else "-"
        bubble = f"{r['bubble']:.0%}" if r.get("bubble") is not None else "-"
        lines.append(f"| {r['backend']} | {','.join(r['plugins']) or 'none'} | {r['batch']} | "
                     f"{r.get('gpu_layers', '-')} | {r['tok_s']:.1f} | {r['ms_per_step']:.2f} | "
                     f"{r['gb_s']:.1f} | {busy} | {bubble} | {same} |")
    return "\n".join(lines) + "\n"


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def write_plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipeLLMError("--plot needs matplotlib (pip install matplotlib)") from None
    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(f"{r['backend']}:{','.join(r['plugins']) or 'none'}" for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(batches) * max(1, len(labels)) / 2, 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        ys = [next((r["tok_s"] for r in rows if r["batch"] == b and
                    f"{r['backend']}:{','.join(r['plugins']) or 'none'}" == label), 0) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], ys, width, label=label)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(batches))],
                  [f"batch {b}" for b in batches])
    ax.set_ylabel("tokens/s (all sequences)")
    ax.set_title(f"{result['model']}\n{result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
