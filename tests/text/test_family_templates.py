"""The chat formats of the Qwen and Phi-3 families (ChatML turns `<|im_start|>role ... <|im_end|>`;
Phi-3's `<|role|> ... <|end|>`) through the sandboxed renderer, against llama.cpp's own
formatting of the same templates. Gemma's is in test_gemma_template.py."""

import pytest

from pipellm_core.text.chat_template import render_chat

from .test_gemma_template import CONVERSATIONS, llamacpp_render

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", [QWEN_TEMPLATE, PHI3_TEMPLATE], ids=["qwen", "phi3"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_family_template_renders_as_llamacpp(template, messages, add_generation_prompt):
    ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt)
    assert ours == llamacpp_render(template, messages, add_generation_prompt)
