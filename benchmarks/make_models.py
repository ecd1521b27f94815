"""Write the random-weight benchmark models (shapes of `pipellm_core.gguf.synthetic.SHAPES`) into
DIR, with the tokenizer of DIR/smollm2-vocab.gguf (the Gemma 3 model: DIR/gemma3-vocab.gguf);
DIR/models.done marks the end. NAMEs pick some (default: all); `--layers N` writes them with N
layers, small enough for a quick check of the files and the commands that read them."""

import argparse
import time
from dataclasses import replace
from pathlib import Path

from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.synthetic import SHAPES, q4_k_m_mix, write_random_gguf

Q4_K_M = dict(embedding_type=GGMLType.Q4_K, output_type=GGMLType.Q6_K, layer_types=q4_k_m_mix)

# name: (shape, type of the layer matrices, vocabulary file's prefix, further types)
MODELS = {
    "smollm2-135m-q4_1": ("smollm2-135m", GGMLType.Q4_1, "smollm2", dict(embedding_type=GGMLType.Q8_0)),
    "llama-8b-q4_0": ("llama-8b", GGMLType.Q4_0, "smollm2",
                      dict(embedding_type=GGMLType.Q4_0, output_type=GGMLType.Q6_K)),
    "llama-8b-q4_k_m": ("llama-8b", GGMLType.Q4_K, "smollm2", Q4_K_M),
    "llama-8b-f16": ("llama-8b", GGMLType.F16, "smollm2", {}),
    "qwen3-8b-q4_k_m": ("qwen3-8b", GGMLType.Q4_K, "smollm2", Q4_K_M),
    # tied: the embedding takes the head's Q6_K, and like every row of 640 values llama.cpp's
    # fallback (Q8_0 here, Q5_0 for Q4_K): the types of the real Gemma 3 270M Q4_K_M file
    "gemma3-270m-q4_k_m": ("gemma3-270m", GGMLType.Q4_K, "gemma3",
                           dict(embedding_type=GGMLType.Q6_K, layer_types=q4_k_m_mix)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to write (default: all): {', '.join(MODELS)}")
    parser.add_argument("--layers", type=int, help="write each model with this many layers")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]}; known: {', '.join(MODELS)}")
    for name in args.names or MODELS:
        path = args.dir / f"{name}.gguf"
        if path.exists():
            continue
        shape_name, qtype, vocab, extra = MODELS[name]
        shape = SHAPES[shape_name]
        if args.layers:
            shape = replace(shape, n_layers=args.layers)
        start = time.time()
        tmp = path.with_suffix(".part")
        write_random_gguf(str(tmp), shape, qtype, tokenizer_from=str(args.dir / f"{vocab}-vocab.gguf"), **extra)
        tmp.rename(path)
        print(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB in {time.time() - start:.0f} s", flush=True)
    (args.dir / "models.done").touch()


if __name__ == "__main__":
    main()
