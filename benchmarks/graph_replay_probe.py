"""Does every CUDA-graph replay of the decode step give the eager step's logits? Runs greedy
decode steps through the graphs plugin and, after each replay, the eager step on the same static
inputs, and prints the worst difference per step.

    python benchmarks/graph_replay_probe.py MODEL.gguf|SHAPE:TYPE [--batches 8,32] [--steps 6]
                                            [--no-empty-cache] [--blas cublaslt]

SHAPE:TYPE (e.g. llama-1b:F16) writes a random-weight model first, with the tokenizer of
PIPELLM_TEST_VOCAB. CUBLAS_WORKSPACE_CONFIG in the environment is cuBLAS's own setting.
"""

import os
import sys

import torch
from gguf import GGMLQuantizationType as GGMLType

import pipellm_graphs
from pipellm_core.runtime.engine import Engine
from pipellm_core.runtime.step import StepBatch
from pipellm_core.gguf.synthetic import write_random_gguf
from pipellm_core.runtime import cuda_graph as cuda_capture


class IdTokenizer:
    def is_end_of_generation(self, token):
        return False


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


model = sys.argv[1]
if ":" in model:
    shape, qtype = model.split(":")
    path = f"/tmp/probe-{shape}-{qtype}.gguf"
    if not os.path.exists(path):
        write_random_gguf(path, shape, GGMLType[qtype], tokenizer_from=os.environ["PIPELLM_TEST_VOCAB"])
    model = path
if "--no-empty-cache" in sys.argv:
    cuda_capture.torch.cuda.empty_cache = lambda: None
if "--blas" in sys.argv:
    torch.backends.cuda.preferred_blas_library(arg("--blas", "cublas"))
print("settings:", " ".join(sys.argv[2:]) or "default", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""), flush=True)

for batch in [int(b) for b in arg("--batches", "8,32").split(",")]:
    engine = Engine(model, device="cuda", max_batch=batch, ctx_size=512, progress=False,
                    plugins=["graphs"], tokenizer=IdTokenizer())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 20000, (batch, 64), generator=g).tolist()
    tokens = engine.prefill(prompts, list(range(batch))).argmax(-1)
    worst = []
    for step in range(int(arg("--steps", "6"))):
        pos = 64 + step
        b = StepBatch(tokens, torch.full((batch,), pos, device="cuda"), torch.arange(batch, device="cuda"), pos + 1)
        with engine.running():
            graph = engine.decode_step(b).float().clone()
            runner = pipellm_graphs.runner_of(engine)
            key = next(iter(runner.shapes))
            eager = runner.shapes[key].eager().float().clone()
        torch.cuda.synchronize()
        rel = ((graph - eager).norm(dim=-1) / eager.norm(dim=-1)).max().item()
        flips = int((graph.argmax(-1) != eager.argmax(-1)).sum())
        worst.append(f"{rel:.2g}/{flips}")
        tokens = graph.argmax(-1)
    kept = [g is not None for g in runner.graphs.values()]
    print(f"batch {batch}: graph vs eager per step (rel L2 / argmax flips): {' '.join(worst)}; graphs kept {kept}",
          flush=True)
    del engine, runner
    torch.cuda.empty_cache()
