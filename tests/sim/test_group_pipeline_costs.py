"""Groups in flight against one GPU and today's layer split at the same total batch, on the
h200 profile with the Llama-8B shape priced on the meta device (sim figures, no math): the
second GPU pays where the step grows with the batch, and barely where weights dominate."""

import dataclasses

import pytest
from gguf import GGMLQuantizationType as GGMLType

from pipellm_core.gguf.synthetic import SHAPES
from pipellm_core.sim.group_pipeline_costs import ring_figures, stage_layers

LLAMA_8B = SHAPES["llama-8b"].config()
STEPS = 32  # per group: the fill and drain of the ring are a few percent of the run


def speedups(stages: int, per_group: int):
    one = ring_figures(LLAMA_8B, "h200", 1, 1, stages * per_group, steps_per_group=STEPS)
    split = ring_figures(LLAMA_8B, "h200", stages, 1, stages * per_group, steps_per_group=STEPS)
    groups = ring_figures(LLAMA_8B, "h200", stages, stages, per_group, steps_per_group=STEPS)
    assert one.tokens == split.tokens == groups.tokens
    return (groups.tokens_per_second / one.tokens_per_second,
            groups.tokens_per_second / split.tokens_per_second, groups)


def test_stage_layers_are_contiguous_and_cover_the_model():
    assert stage_layers(32, 2) == [range(0, 16), range(16, 32)]
    assert stage_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]


def test_two_groups_on_two_gpus_where_the_step_grows_with_the_batch():
    vs_one, vs_split, groups = speedups(2, 128)
    assert vs_one >= 1.6 and vs_split >= 1.6  # 1.78 at commit c83dcc3
    assert min(groups.stage_busy) >= 0.95


def test_two_groups_gain_little_where_weights_dominate():
    vs_one, _vs_split, _ = speedups(2, 32)
    # only the per-sequence work (KV cache reads, activations) splits over the GPUs; 1.28 at c83dcc3
    assert 1.0 < vs_one < 1.3


@pytest.mark.parametrize("per_group, least", [(256, 3.3)])
def test_four_groups_on_four_gpus(per_group, least):
    vs_one, vs_split, groups = speedups(4, per_group)
    assert vs_one >= least and vs_split >= least  # 3.71 at c83dcc3
    assert min(groups.stage_busy) >= 0.94


def test_bubble_is_the_stages_idle_share_and_within_fill_and_drain_plus_overhead():
    _, _, groups = speedups(2, 128)
    assert groups.bubble == pytest.approx(1.0 - sum(groups.stage_busy) / 2)
    fill_and_drain = 1 / (2 * STEPS + 1)
    assert fill_and_drain < groups.bubble < fill_and_drain + 0.02  # 2.6% at 2cf7660


def test_the_kernel_path_prices_a_model_no_card_holds():
    """The Llama-70B shape in Q4_0 on two rtx4090s, on pipellm's kernel path: each GPU reads its
    stage's weights once per group step, as the layer split reads them once per step of both
    groups' sequences, so only the per-sequence work (KV cache reads) splits: a small gain."""
    llama_70b = dataclasses.replace(SHAPES["llama-70b"].config(), vocab_size=128256)
    split = ring_figures(llama_70b, "rtx4090", 2, 1, 64, ctx=512, steps_per_group=8, qtype=GGMLType.Q4_0)
    groups = ring_figures(llama_70b, "rtx4090", 2, 2, 32, ctx=512, steps_per_group=8, qtype=GGMLType.Q4_0,
                          trace=True)
    assert split.tokens == groups.tokens
    assert 1.0 < groups.tokens_per_second / split.tokens_per_second < 1.3
    events = groups.runtime.trace.events()
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    crossings = [e for e in events if e.get("ph") == "X" and tracks.get((e["pid"], e["tid"])) == "hand-over"]
    assert {e["pid"] for e in crossings} == {1} and len(crossings) == 2 * 8  # every group step, on GPU 1


def test_kv_offload_priced_on_a_model_too_large_for_its_cache():
    """Eight groups of 16 of the Llama-70B shape on two rtx4090s, their KV caches (context 512)
    coming in over PCIe for every turn: the copies and the compute overlap in the trace, and
    the copies, 1.25 GiB per stage and turn each way (about 54 ms over PCIe) against a step of
    some 21 ms, set the pace."""
    llama_70b = dataclasses.replace(SHAPES["llama-70b"].config(), vocab_size=128256)
    resident = ring_figures(llama_70b, "rtx4090", 2, 8, 16, ctx=512, steps_per_group=4, qtype=GGMLType.Q4_0)
    offload = ring_figures(llama_70b, "rtx4090", 2, 8, 16, ctx=512, steps_per_group=4, qtype=GGMLType.Q4_0,
                           trace=True, kv_offload=True)
    assert offload.tokens == resident.tokens
    assert offload.tokens_per_second < 0.5 * resident.tokens_per_second
    events = offload.runtime.trace.events()
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}

    def spans(gpu, track):
        return [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["pid"] == gpu
                and tracks.get((gpu, e["tid"])) == track and e["dur"] > 0]
    for gpu in (0, 1):
        copies_in, compute = spans(gpu, "kv in"), spans(gpu, "compute")
        assert len(copies_in) == 2 * 40 * 8 * 4 and spans(gpu, "kv out")  # keys and values of 40 layers a turn
        assert sum(max(0.0, min(b, d) - max(a, c)) for a, b in copies_in for c, d in compute) > 0
