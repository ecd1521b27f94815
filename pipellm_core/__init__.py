"""PipeLLM: GGUF language models in PyTorch, made faster by plugins."""

__version__ = "0.1.0"

from pipellm_core.errors import (ChatTemplateError, ContextLengthError, GGUFError,  # noqa: E402
                                 PipeLLMError, PluginError, UnsupportedModelError)
from pipellm_core.hooks.specs import hookimpl  # noqa: E402


def __getattr__(name):
    # heavy imports (torch, llama.cpp) only when asked for
    if name == "LLM":
        from pipellm_core.frontends.llm import LLM
        return LLM
    if name == "ablate":
        from pipellm_core.bench.ablation import ablate
        return ablate
    if name == "Engine":
        from pipellm_core.runtime.engine import Engine
        return Engine
    raise AttributeError(name)


__all__ = ["LLM", "Engine", "ablate", "hookimpl", "PipeLLMError", "GGUFError", "UnsupportedModelError",
           "ContextLengthError", "PluginError", "ChatTemplateError", "__version__"]
