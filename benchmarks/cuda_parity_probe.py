"""Where pipellm's CUDA engine parts from llama.cpp's CUDA build on the same GGUF, per setting.

    python benchmarks/cuda_parity_probe.py MODEL.gguf OUT.json

For each setting (matrix dtype, kernels on or off) it prints and writes: per prompt, the largest
relative logit error over the prompt's positions and the positions whose top-1 differs; then
how many 32-token greedy continuations are identical. llama.cpp's own greedy tokens go in the
JSON too, to set beside its CPU build's.
"""

import json
import os
import subprocess
import sys

import torch

path, out_path = sys.argv[1], sys.argv[2]
SETTINGS = [("float16", "triton"), ("float16", "torch"), ("float32", "torch")]


def run_setting(dtype: str, kernels: str) -> dict:
    """One setting in a fresh process (the kernel switch is read at import)."""
    env = dict(os.environ, PIPELLM_KERNELS=kernels)
    code = f"""
import json, torch
from pipellm_core.runtime.engine import Engine
from pipellm_core.llamacpp.backend import LlamaCppBackend
from tests.llamacpp.test_parity_llamacpp import PROMPTS, greedy, rel_err
engine = Engine({path!r}, device="cuda", max_batch=1, ctx_size=512, progress=False, dtype=torch.{dtype})
ref = LlamaCppBackend({path!r}, device="cuda", max_batch=1, ctx_size=512)
prompts = []
for p in PROMPTS:
    t = engine.tokenizer.encode(p)
    ours = engine.prefill([t], [0], all_logits=True)[0].float().cpu()
    theirs = ref.prompt_logits(t)
    flips = [i for i in range(len(t)) if int(ours[i].argmax()) != int(theirs[i].argmax())]
    gaps = [float(theirs[i].topk(2).values.diff().abs()) for i in flips]
    prompts.append(dict(prompt=p, max_rel_err=max(rel_err(ours[i], theirs[i]) for i in range(len(t))),
                        top1_flips=flips, flip_gaps=gaps))
ours, theirs = greedy(engine, PROMPTS, 32), greedy(ref, PROMPTS, 32)
prefix = [next((i for i, (s, u) in enumerate(zip(a, b)) if s != u), len(a)) for a, b in zip(ours, theirs)]
print(json.dumps(dict(prompts=prompts, identical=sum(a == b for a, b in zip(ours, theirs)),
                      shared_prefixes=prefix, llamacpp_cuda_greedy=theirs)))
"""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(error=done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


results = {}
for dtype, kernels in SETTINGS:
    name = f"{dtype}-{kernels}"
    r = results[name] = run_setting(dtype, kernels)
    if "error" in r:
        print(f"{name}: failed\n{r['error']}")
        continue
    errs = " ".join(f"{p['max_rel_err']:.3f}" for p in r["prompts"])
    flips = sum(len(p["top1_flips"]) for p in r["prompts"])
    print(f"{name}: max rel err per prompt {errs}; top-1 flips {flips}; "
          f"identical greedy {r['identical']} of 12; shared prefixes {r['shared_prefixes']}")
results["device"] = torch.cuda.get_device_name(0)
results["commit"] = os.environ.get("PIPELLM_COMMIT", "unknown")
with open(out_path, "w") as f:
    json.dump(results, f, indent=1)
