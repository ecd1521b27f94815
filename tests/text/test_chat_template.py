import pytest

from pipellm_core.text.chat_template import render_chat
from pipellm_core.errors import ChatTemplateError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_renders_messages():
    t = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    assert render_chat(t, MESSAGES) == "<system>Be brief.<user>Hi<assistant>"


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
])
def test_escape_attempts_are_refused(template):
    with pytest.raises(ChatTemplateError):
        render_chat(template, MESSAGES)


def test_raise_exception_becomes_clear_error():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", MESSAGES)
