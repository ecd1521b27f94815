"""Decode speed of plugin sets on a random-weight model, without llama.cpp (token ids only):
for machines where only pipellm's own runs are wanted (the `pipellm bench` harness needs
llama.cpp for the tokenizer).

    python benchmarks/decode_probe.py SHAPE:TYPE OUT.json [--batches 1,8,32,64]
                                      [--configs "none;graphs;pipeline@2;pipeline,graphs@2"]

A config is comma-separated plugins, with @N for the pipeline's micro-batches. The model is
written first with the tokenizer of PIPELLM_TEST_VOCAB. Rows: tok/s and ms/step per (config,
batch), and whether the greedy tokens equal the first config's.
"""

import gc
import json
import os
import sys

import torch
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.bench.measure import measure_decode
from pipellm_core.runtime.engine import Engine
from pipellm_core.gguf.synthetic import write_random_gguf


class IdTokenizer:
    vocab_size = 49152

    def is_end_of_generation(self, token):
        return False


spec, out_path = sys.argv[1], sys.argv[2]
batches = [int(b) for b in (sys.argv[sys.argv.index("--batches") + 1] if "--batches" in sys.argv else "1,8,32,64").split(",")]
shape, qtype = spec.split(":")
path = f"/tmp/pipeline-{shape}-{qtype}.gguf"
if not os.path.exists(path):
    write_random_gguf(path, shape, GGMLType[qtype], tokenizer_from=os.environ["PIPELLM_TEST_VOCAB"])
configs = sys.argv[sys.argv.index("--configs") + 1] if "--configs" in sys.argv else \
    "none;graphs;pipeline@1;pipeline@2;pipeline,graphs@1;pipeline,graphs@2"
CONFIGS = []
for c in configs.split(";"):
    names, _, micro = c.partition("@")
    CONFIGS.append(([p for p in names.split(",") if p and p != "none"], int(micro) if micro else None))
rows = []
for batch in batches:
    reference = None
    for plugins, micro in CONFIGS:
        options = {"pipeline.micro_batches": micro} if micro else {}
        engine = Engine(path, device="cuda", max_batch=batch, ctx_size=256, progress=False, plugins=plugins,
                        plugin_options=options, tokenizer=IdTokenizer())
        m = measure_decode(engine, batch=batch, prompt_tokens=64, n_predict=32, repeats=2, warmup=1,
                           plugins=plugins, device="cuda")
        reference = reference if reference is not None else m.tokens
        row = dict(m.row(), micro_batches=micro, gpus=len({str(d) for d in engine.weights.layer_devices}),
                   same_tokens=m.tokens == reference)
        rows.append(row)
        print(f"batch {batch:3d} {'+'.join(plugins) or 'none':16s} micro {micro}  {row['tok_s']:9.1f} tok/s "
              f"{row['ms_per_step']:8.2f} ms/step  gpus {row['gpus']}  same tokens {row['same_tokens']}", flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
json.dump({"model": spec, "device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
           "commit": os.environ.get("PIPELLM_COMMIT", "unknown"), "prompt_tokens": 64, "n_predict": 32,
           "repeats": 2, "rows": rows}, open(out_path, "w"), indent=1)
