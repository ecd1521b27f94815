"""Chat templates from GGUF metadata, rendered in jinja2's immutable sandbox: a template inside a
downloaded file is untrusted, so it may format messages but never reach Python objects."""

from __future__ import annotations

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from pipellm_core.errors import ChatTemplateError


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def render_chat(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    if not template:
        raise ChatTemplateError("the model has no chat template (tokenizer.chat_template)")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt)
    except SecurityError as e:
        raise ChatTemplateError(f"chat template tried to leave its sandbox: {e}") from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
