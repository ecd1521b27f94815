"""How far a CUDA-graph replay of a decode step is from the eager step on the same inputs, next
to how far the eager step is from itself (run again, or on another stream), per batch size.

    python benchmarks/graph_determinism.py MODEL.gguf [--no-reduced-precision] [--blas cublaslt]
                                             [--batches 1,8,32]

(CUBLAS_WORKSPACE_CONFIG in the environment is cuBLAS's own setting.)

Prints, per batch: max |difference| of the logits, relative L2 error, and rows whose argmax differs.
"""

import os
import sys

import torch

from pipellm_core.benchmark import synthetic_prompts
from pipellm_core.engine import Engine
from pipellm_core.step import StepBatch
from pipellm_graphs.cuda_capture import CudaStepGraph
from pipellm_graphs.runner import StepShape

path = sys.argv[1]
if "--no-reduced-precision" in sys.argv:
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
if "--blas" in sys.argv:
    torch.backends.cuda.preferred_blas_library(sys.argv[sys.argv.index("--blas") + 1])
BATCHES = [int(b) for b in sys.argv[sys.argv.index("--batches") + 1].split(",")] if "--batches" in sys.argv else [1, 8, 32]
print("settings:", " ".join(sys.argv[2:]) or "default", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))


def compare(name, a, b):
    a, b = a.float(), b.float()
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()
    flips = int((a.argmax(-1) != b.argmax(-1)).sum())
    print(f"  {name:<22} max|diff| {(a - b).abs().max().item():9.4g}  rel L2 {rel:9.3g}  argmax flips {flips}")


for batch in BATCHES:
    engine = Engine(path, device="cuda", max_batch=batch, ctx_size=264, progress=False)
    prompts = synthetic_prompts(batch, 128, engine.tokenizer.vocab_size)
    first = engine.prefill(prompts, list(range(batch))).argmax(-1)
    step = StepBatch(first, torch.full((batch,), 128, device="cuda"), torch.arange(batch, device="cuda"), 129)
    shape = StepShape(engine, 0, batch, 264)
    shape.fill(step, None)
    with engine.running():  # the engine's compute stream, where its graphs are captured too
        e1, e2 = shape.eager().clone(), shape.eager().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        e3 = shape.eager().clone()
    torch.cuda.current_stream().wait_stream(side)
    g = CudaStepGraph(shape.eager, torch.cuda.graph_pool_handle(), engine.compute_stream)
    g1 = g.record().clone()
    g2 = g.replay().clone()
    exact = engine.eager_stage_step(0, step, None)  # ctx 129, not the bucket's 264
    print(f"batch {batch}: logits scale {e1.abs().max().item():.3g}")
    compare("eager vs eager", e2, e1)
    compare("other stream vs eager", e3, e1)
    compare("graph vs eager", g1, e1)
    compare("graph vs graph", g2, g1)
    compare("ctx 129 vs bucket 264", exact, e1)
    del engine, g
    torch.cuda.empty_cache()
