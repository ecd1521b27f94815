import torch

from pipellm_core.runtime.sampling import Sampler, SamplingParams, apply_repeat_penalty, filter_logits
from pipellm_core.text.stop_strings import StopMatcher

LOGITS = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])


def kept(p: SamplingParams) -> list[int]:
    return torch.isfinite(filter_logits(LOGITS, p)).nonzero().flatten().tolist()


def test_greedy_picks_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS, []) == 0


def test_top_k():
    assert kept(SamplingParams(temperature=1, top_k=3, top_p=1.0, min_p=0.0)) == [0, 1, 2]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)
    p = float(probs[0] + probs[1]) - 1e-4  # the first two reach p
    assert kept(SamplingParams(temperature=1, top_k=0, top_p=p, min_p=0.0)) == [0, 1]


def test_min_p_relative_to_top():
    # exp(-1)=0.37 and exp(-2)=0.135 of the top probability: min_p 0.2 keeps tokens 0 and 1
    assert kept(SamplingParams(temperature=1, top_k=0, top_p=1.0, min_p=0.2)) == [0, 1]


def test_repeat_penalty_follows_llamacpp_sign_rule():
    out = apply_repeat_penalty(LOGITS, [0, 7], 2.0, 64)
    assert out[0] == 2.5 and out[7] == -4.0 and out[1] == 4.0


def test_seed_reproduces_and_samples_spread():
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    a = [Sampler(p)(LOGITS, []) for _ in range(20)]
    b = [Sampler(p)(LOGITS, []) for _ in range(20)]
    assert a == b
    s = Sampler(p)
    draws = [s(LOGITS, []) for _ in range(200)]
    assert len(set(draws)) > 2 and draws.count(0) > draws.count(3)


def test_high_temperature_flattens():
    p_hot = SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    p_cold = SamplingParams(temperature=0.2, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    hot, cold = Sampler(p_hot), Sampler(p_cold)
    assert len({hot(LOGITS, []) for _ in range(200)}) > len({cold(LOGITS, []) for _ in range(200)})


def test_stop_strings_across_pieces():
    m = StopMatcher(["STOP"])
    out = [m.push(t) for t in ["hello S", "TO", "P world"]]
    assert "".join(t for t, _ in out) == "hello " and out[-1][1]
    m = StopMatcher(["STOP"])
    assert m.push("ST") == ("", False) and m.push("ay") == ("STay", False)


def test_extreme_settings_still_sample():
    """A temperature near zero picks the top token; penalties that overflow leave tokens out
    instead of making the probabilities NaN."""
    logits = torch.tensor([1.0, 5.0, -3.0, 4.9])
    wide = dict(top_k=0, top_p=1.0, min_p=0.0, seed=3)
    for temperature in (1e-45, 1e-30):
        assert Sampler(SamplingParams(temperature=temperature, **wide))(logits, []) == 1
    for penalty in (1e-30, 1e30):
        token = Sampler(SamplingParams(temperature=0.8, repeat_penalty=penalty, **wide))(logits, [0, 2])
        assert 0 <= token < 4


def test_a_failing_sampler_ends_only_its_request():
    import pytest

    from pipellm_core.runtime.batching import ContinuousBatcher
    from pipellm_core.runtime.request import Request

    def broken(logits, history):
        raise RuntimeError("sampler failed")

    reqs = [Request([1, 2], 4, SamplingParams(temperature=0.7, seed=s)) for s in range(3)]
    reqs[1].sampler = broken
    logits = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])
    failed = []
    picks = ContinuousBatcher.pick_tokens(reqs, logits, lambda r, e: failed.append((r, str(e))))
    assert picks[1] is None and failed == [(reqs[1], "sampler failed")]
    assert picks[0] in (0, 1, 2) and picks[2] in (0, 1, 2)
    with pytest.raises(RuntimeError, match="sampler failed"):
        ContinuousBatcher.pick_tokens(reqs, logits)
