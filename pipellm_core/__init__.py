"""PipeLLM: GGUF language models in PyTorch, made faster by plugins."""

__version__ = "0.1.0"

from .errors import (ChatTemplateError, ContextLengthError, GGUFError, PipeLLMError,  # noqa: E402
                     PluginError, UnsupportedModelError)
from .hookspecs import hookimpl  # noqa: E402


def __getattr__(name):
    # heavy imports (torch, llama.cpp) only when asked for
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "ablate":
        from .ablation import ablate
        return ablate
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(name)


__all__ = ["LLM", "Engine", "ablate", "hookimpl", "PipeLLMError", "GGUFError", "UnsupportedModelError",
           "ContextLengthError", "PluginError", "ChatTemplateError", "__version__"]
