"""Request bodies checked into what the engine needs (`openai_requests.parse_generation`)."""

import pytest

from pipellm_core.frontends.openai_requests import APIError, SamplingDefaults, parse_generation


def test_ignore_eos_is_read_and_checked():
    body = {"prompt": "hi", "ignore_eos": True}
    assert parse_generation(body, chat=False, defaults=SamplingDefaults()).ignore_eos is True
    assert parse_generation({"prompt": "hi"}, chat=False, defaults=SamplingDefaults()).ignore_eos is False
    with pytest.raises(APIError) as e:
        parse_generation({"prompt": "hi", "ignore_eos": "yes"}, chat=False, defaults=SamplingDefaults())
    assert e.value.status == 400 and e.value.param == "ignore_eos"
