"""A Gemma-style chat template (turns as `<start_of_turn>role ... <end_of_turn>`, the system
message folded into the first user turn, `assistant` named `model`, content trimmed, alternation
enforced) through the sandboxed renderer, against llama.cpp's own Gemma chat formatting."""

import ctypes

import pytest

from pipellm_core.errors import ChatTemplateError
from pipellm_core.text.chat_template import render_chat

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_text = messages[0]['content'] | trim ~ '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system_text = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' ~ role ~ '\n' ~ (system_text if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue.\n"}, {"role": "user", "content": "Another?"}],
]


def llamacpp_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    import llama_cpp
    chat = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for slot, m in zip(chat, messages):
        role, content = m["role"].encode(), m["content"].encode()
        keep += [role, content]
        slot.role, slot.content = role, content
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(messages), add_generation_prompt,
                                            buf, len(buf))
    assert n > 0, "llama.cpp did not recognise the template"
    return buf.raw[:n].decode()


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_template_renders_as_llamacpp(messages, add_generation_prompt):
    ours = render_chat(GEMMA_TEMPLATE, messages, add_generation_prompt=add_generation_prompt)
    assert ours == llamacpp_render(GEMMA_TEMPLATE, messages, add_generation_prompt)


def test_gemma_template_refuses_non_alternating_roles():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat(GEMMA_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
