"""Write the random-weight benchmark models into DIR (the shapes of BENCHMARKS.md), with
SmolLM2's vocabulary from DIR/smollm2-vocab.gguf; DIR/models.done marks the end."""

import sys
import time
from pathlib import Path

from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.synthetic import q4_k_m_mix, write_random_gguf

MODELS = [
    ("smollm2-135m-q4_1.gguf", "smollm2-135m", GGMLType.Q4_1, dict(embedding_type=GGMLType.Q8_0)),
    ("llama-8b-q4_0.gguf", "llama-8b", GGMLType.Q4_0, dict(embedding_type=GGMLType.Q4_0, output_type=GGMLType.Q6_K)),
    ("llama-8b-q4_k_m.gguf", "llama-8b", GGMLType.Q4_K,
     dict(embedding_type=GGMLType.Q4_K, output_type=GGMLType.Q6_K, layer_types=q4_k_m_mix)),
    ("llama-8b-f16.gguf", "llama-8b", GGMLType.F16, {}),
]

out = Path(sys.argv[1])
vocab = str(out / "smollm2-vocab.gguf")
for name, shape, qtype, extra in MODELS:
    if (out / name).exists():
        continue
    start = time.time()
    tmp = out / (name + ".part")
    write_random_gguf(str(tmp), shape, qtype, tokenizer_from=vocab, **extra)
    tmp.rename(out / name)
    print(f"{name}: {(out / name).stat().st_size / 1e9:.2f} GB in {time.time() - start:.0f} s", flush=True)
(out / "models.done").touch()
