"""Errors that PipeLLM reports to users as one clear line (the CLI prints them without a traceback)."""


class PipeLLMError(Exception):
    """Base class: anything a user can cause by bad input or settings."""


class GGUFError(PipeLLMError):
    """The file is missing, not a GGUF, truncated or corrupt."""


class UnsupportedModelError(PipeLLMError):
    """The GGUF is valid but its architecture or a tensor type is not supported."""


class ContextLengthError(PipeLLMError):
    """A prompt plus the tokens to generate do not fit the context."""


class PluginError(PipeLLMError):
    """An unknown plugin was asked for, or a plugin cannot apply to the chosen backend."""


class ChatTemplateError(PipeLLMError):
    """A chat template is missing, broken, or tried to leave its sandbox."""


class SimOutOfMemoryError(PipeLLMError):
    """A simulated GPU was asked for more memory than it has left."""


class HazardError(PipeLLMError):
    """Simulated streams used a buffer without an event ordering the accesses."""


class LlamaCppError(PipeLLMError, RuntimeError):
    """llama.cpp failed: it could not load a file or decode, or its worker process died."""
