"""GPU kernels that read GGUF blocks as they are stored (see `quant_matmul`)."""
