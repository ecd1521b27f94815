"""Decode speed of pipellm's torch engine against llama.cpp on the same GGUF, side by side in one
run. Writes JSON (every parameter, the device and the commit) and a markdown table.

    python benchmarks/decode_speed.py --model FILE.gguf --device cuda --batches 1,8 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipellm_core.benchmark import measure_decode  # noqa: E402
from pipellm_core.llm import open_backend  # noqa: E402
from pipellm_core.model_file import ModelFile  # noqa: E402
from pipellm_core.plugin_manager import parse_plugin_list  # noqa: E402


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return os.environ.get("PIPELLM_COMMIT", "unknown")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--label", help="model label in the table (default: file name)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--n-predict", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="llamacpp,torch")
    ap.add_argument("--plugin-sets", default="", help="';'-separated plugin lists for the torch backend")
    ap.add_argument("--out", required=True, help="folder for the JSON and markdown results")
    ap.add_argument("--name", default="decode_speed", help="file name stem of the results")
    args = ap.parse_args(argv)

    batches = [int(b) for b in args.batches.split(",")]
    mf = ModelFile(args.model)
    weight_bytes = mf.decode_weight_bytes()
    ctx = args.prompt_tokens + args.n_predict + 8
    rows = []
    for backend_name in args.backends.split(","):
        plugin_sets = [parse_plugin_list(s) for s in args.plugin_sets.split(";")] if backend_name == "torch" else [[]]
        for plugins in plugin_sets:
            backend = open_backend(args.model, backend_name, plugins=plugins, device=args.device,
                                   n_ctx=ctx, max_batch=max(batches), progress=False)
            for b in batches:
                m = measure_decode(backend, batch=b, prompt_tokens=args.prompt_tokens,
                                   n_predict=args.n_predict, repeats=args.repeats,
                                   backend_name=backend_name, plugins=plugins, device=args.device,
                                   weight_bytes=weight_bytes)
                rows.append(m.row())
                print(f"{backend_name:9} {','.join(plugins) or '-':12} B={b:<3} {m.tok_s:9.1f} tok/s "
                      f"{m.ms_per_step:8.2f} ms/step {m.gb_s:7.1f} GB/s", flush=True)
            if hasattr(backend, "close"):
                backend.close()
            del backend
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    result = {
        "benchmark": "decode_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(args.device),
        "model": args.label or Path(args.model).name,
        "model_file_bytes": os.path.getsize(args.model),
        "decode_weight_bytes": weight_bytes,
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown_table(result))
    print(markdown_table(result))


def markdown_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']} (commit {result['commit']}, prompt "
             f"{result['parameters']['prompt_tokens']}, {result['parameters']['n_predict']} steps, "
             f"median of {result['parameters']['repeats']})", "",
             "| backend | plugins | batch | tok/s | ms/step | weight GB/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {','.join(r['plugins']) or 'none'} | {r['batch']} | "
                     f"{r['tok_s']:.1f} | {r['ms_per_step']:.2f} | {r['gb_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
