"""The pipeline plugin on the sim backend with two virtual GPUs: the split of layers, the
fill-and-drain schedule, the same greedy tokens as one device (alone and with graphs, whose
per-stage steps are captured per GPU), and two GPUs busy at the same time; with groups of
sequences in flight (`pipeline.groups`), the same tokens while sequences join and leave, and the
two GPUs running different groups' steps at once."""

import warnings

import pytest
from gguf import GGMLQuantizationType as GGMLType

import pipellm_graphs
from pipellm_core.runtime.engine import Engine
from pipellm_core.errors import PluginError
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.runtime.step import StepBatch
from pipellm_core.gguf.synthetic import Shape, write_random_gguf
from pipellm_pipeline.split import end_bytes, micro_batch_rows, pipeline_schedule, split_layers, stage_bytes

SIX_LAYERS = Shape("llama", 6, 64, 128, 4, 2, 2048)


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path):
    path = tmp_path_factory.mktemp("pipeline") / "six-layers-q4.gguf"
    return write_random_gguf(str(path), SIX_LAYERS, GGMLType.Q4_0, tokenizer_from=smollm2_path, std=0.3, seed=9)


def generate(path, **engine_kw):
    """Four sequences decoding together; two finish early, so the batch shrinks."""
    engine = Engine(path, max_batch=4, ctx_size=512, progress=False, **engine_kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((40, 10), (7, 4), (20, 10), (12, 6))]
    for _ in engine.generate(reqs):
        pass
    return [r.generated for r in reqs], engine


def test_layers_split_into_contiguous_stages_of_equal_bytes():
    assert split_layers([1] * 6, 2) == [0, 0, 0, 1, 1, 1]
    assert split_layers([1] * 6, 3) == [0, 0, 1, 1, 2, 2]
    assert split_layers([5, 1, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1, 1]
    assert split_layers([1] * 4, 4) == [0, 1, 2, 3]
    # uneven layers: every stage still gets at least one, in order
    assert split_layers([1, 1, 1, 100], 3) == [0, 0, 1, 2]
    assert split_layers([34, 58, 43, 95], 4) == [0, 1, 2, 3]
    # the embedding and head count in the first and last stages' shares
    assert split_layers([1] * 6, 2, first_bytes=2) == [0, 0, 1, 1, 1, 1]
    assert split_layers([1] * 6, 2, last_bytes=2) == [0, 0, 0, 0, 1, 1]
    # shares: budgets of 2:1 put two thirds of the bytes on stage 0
    assert split_layers([1] * 6, 2, shares=[2, 1]) == [0, 0, 0, 0, 1, 1]
    assert split_layers([1] * 6, 3, shares=[1, 1, 4]) == [0, 1, 2, 2, 2, 2]
    assert stage_bytes([0, 0, 1], [3, 4, 5], 10, 20) == [17, 25]
    assert micro_batch_rows(32, 2) == [(0, 16), (16, 32)]
    assert micro_batch_rows(3, 2) == [(0, 2), (2, 3)] and micro_batch_rows(1, 4) == [(0, 1)]
    # uneven layers and shares: the split that fits, where filling each stage in turn would
    # leave the small middle stage a layer it cannot hold
    assert split_layers([100, 100, 120, 120, 100], 3, [350, 105, 350]) == [0, 1, 2, 2, 2]

    # the split by time of a Llama-8B shape: the head reads 2.4 layers' worth of bytes, the
    # embedding nothing, so the first of two equal GPUs takes 17 layers and the second 15
    assert split_layers([1.0] * 32, 2, [1.0, 1.0], 0, 2.4).count(0) == 17
    # a GPU at half speed gets about half the share
    assert split_layers([1.0] * 32, 2, [1.0, 0.5], 0, 2.4).count(1) == 9


def test_split_options_and_speeds(model, capsys):
    with pytest.raises(PluginError, match="pipeline.split: 'time' or 'bytes'"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.split": "layers"})
    for bad in ("1,x", "1", "1,0", "nan,1", "inf,1"):
        with pytest.raises(PluginError, match="pipeline"):
            Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
                   plugin_options={"pipeline.speeds": bad})
    Engine(model, sim="h100", sim_devices=3, plugins=["pipeline"], progress=True,
           plugin_options={"pipeline.speeds": "1,0.95,0.5"})
    err = capsys.readouterr().err
    # within 10% of the fastest counts as the fastest; the slower GPU's speed is printed
    assert "speed 1.00" in err and "speed 0.50" in err and "speed 0.95" not in err
    Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=True)
    assert "speed" not in capsys.readouterr().err  # the sim's GPUs, measured: all alike


def test_fill_and_drain_ticks():
    import torch
    b = StepBatch(torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4), 512)
    s = pipeline_schedule(b, n_stages=2, n_micro=2)
    assert [len(m) for m in s.micro_batches] == [2, 2]
    assert s.ticks == [[(0, 0)], [(1, 0), (0, 1)], [(1, 1)]]


def test_pipeline_gives_the_one_device_tokens(model):
    one, _ = generate(model, sim="h100")
    two, engine = generate(model, sim="h100", sim_devices=2, plugins=["pipeline"],
                           plugin_options={"pipeline.micro_batches": 2})
    assert two == one
    # split by time: the head's product (49152 rows) outweighs four of this model's layers, the
    # embedding (a lookup) counts for nothing
    assert [p.stage for p in engine.plan.layers] == [0, 0, 0, 0, 0, 1]
    held = [d.allocated_bytes for d in engine.sim.devices]
    assert all(h > 0 for h in held)  # weights and KV cache on both GPUs
    assert engine.sim.device(1).peak_bytes > 0
    plain, engine = generate(model, sim="h100", sim_devices=2, plugins=["pipeline"])  # default: 1 micro-batch
    assert plain == one
    assert engine.sequence_groups() == 1  # without pipeline.groups: step by step, as before
    grouped, engine = generate(model, sim="h100", sim_devices=2, plugins=["pipeline"],
                               plugin_options={"pipeline.groups": 2})  # eager groups in flight
    assert grouped == one and engine.sequence_groups() == 2


def test_pipeline_composes_with_graphs(model):
    one, _ = generate(model, sim="h100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both, engine = generate(model, sim="h100", sim_devices=2, plugins=["pipeline", "graphs"],
                                plugin_options={"pipeline.micro_batches": 2})
    assert both == one
    runner = pipellm_graphs.runner_of(engine)
    stages = {key[0] for key, g in runner.graphs.items() if g is not None}
    assert stages == {0, 1} and runner.eager_fallbacks == 0
    assert set(runner.pools) == {0, 1}  # each GPU's graphs in that GPU's pool
    # each stage's graph runs on its own GPU, and the two GPUs work at the same time
    spans = {0: [], 1: []}
    for e in engine.sim.trace.events():
        if e.get("ph") == "X" and e["name"].startswith("graph") and e["pid"] in spans:
            spans[e["pid"]].append((e["ts"], e["ts"] + e["dur"]))
    assert spans[0] and spans[1]
    assert any(a0 < b1 and a1 < b0 for a0, b0 in spans[0] for a1, b1 in spans[1])


def test_bad_stage_counts(model):
    with pytest.raises(PluginError, match="3 stages asked for, but 2 GPU"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.stages": 3})
    with pytest.raises(PluginError, match="resident_layers counts layers of one GPU"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline", "prefetch"], progress=False,
               plugin_options={"prefetch.resident_layers": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(model, plugins=["pipeline"], progress=False)
    assert any("pipeline" in str(w.message) for w in caught)
    assert len(engine.plan.stages) == 1


def test_budgets_shape_the_split_and_the_partition_is_printed(model, capsys):
    from pipellm_core.gguf.model_file import ModelFile
    from pipellm_core.model.weights import packed_layer_bytes
    tensors = ModelFile(model).tensors
    layer = packed_layer_bytes(tensors, 0)
    first, last = end_bytes(tensors)
    assert last > first > layer  # the tied head is the embedding matrix again, plus its norm
    # stage 1's budget holds the head and one layer, and no more
    budgets = f"{first + 5 * layer},{last + layer}"
    engine = Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=True,
                    plugin_options={"pipeline.budgets": budgets, "pipeline.split": "bytes"})
    assert [p.stage for p in engine.plan.layers] == [0, 0, 0, 0, 0, 1]
    err = capsys.readouterr().err
    assert "stage 0: layers 0-4 + embedding" in err and "stage 1: layers 5-5 + head" in err
    with pytest.raises(PluginError, match="stage 1 holds .* over its budget"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.budgets": f"{first + 6 * layer},{last // 2}"})
    with pytest.raises(PluginError, match="3 budgets .* for 2 stages"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.budgets": "1GiB,1GiB,1GiB"})
    with pytest.raises(PluginError, match="pipeline.budgets: cannot read"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.budgets": "1GiB,lots"})


def generate_joining(path, **engine_kw):
    """Five sequences over three cache slots: two join mid-run as others finish."""
    engine = Engine(path, max_batch=3, ctx_size=512, progress=False, **engine_kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((40, 9), (7, 3), (20, 6), (12, 5), (30, 4))]
    for _ in engine.generate(reqs):
        pass
    return [r.generated for r in reqs], engine


def graph_spans(engine, gpu):
    return [(e["ts"], e["ts"] + e["dur"]) for e in engine.sim.trace.events()
            if e.get("ph") == "X" and e["name"].startswith("graph") and e["pid"] == gpu]


def test_groups_in_flight_give_the_one_device_tokens_with_graphs(model):
    one, _ = generate_joining(model, sim="h100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two, engine = generate_joining(model, sim="h100", sim_devices=2, plugins=["pipeline", "graphs"],
                                       plugin_options={"pipeline.groups": 2})
    assert two == one
    assert engine.sequence_groups() == 2
    assert engine.stats.decode_tokens == sum(len(t) - 1 for t in one)  # the first comes from prefill
    runner = pipellm_graphs.runner_of(engine)
    assert runner.eager_fallbacks == 0 and {k[0] for k in runner.graphs} == {0, 1}
    # GPU 0 runs one group's step while GPU 1 runs the other's: the graphs of the two GPUs overlap
    # for much of the decode, not only at a step's hand-over
    spans0, spans1 = graph_spans(engine, 0), graph_spans(engine, 1)
    overlap = sum(max(0.0, min(b0, b1) - max(a0, a1)) for a0, b0 in spans0 for a1, b1 in spans1)
    assert overlap > 0.3 * sum(b - a for a, b in spans1)


def test_group_options(model):
    with pytest.raises(PluginError, match="micro_batches"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.groups": 2, "pipeline.micro_batches": 2})
    with pytest.raises(PluginError, match="at least 1"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.groups": 0})


def test_busy_and_bubble_fractions_of_the_stages(model):
    """The decode's busy share of each stage's virtual GPU: in a plain layer split the GPUs take
    turns (their shares add up to at most the whole); groups in flight leave a smaller bubble.
    This model's steps are far shorter than the host's work around them (graph captures
    included), so the shares are small either way."""
    _, split = generate_joining(model, sim="h100", sim_devices=2, plugins=["pipeline", "graphs"])
    _, ring = generate_joining(model, sim="h100", sim_devices=2, plugins=["pipeline", "graphs"],
                               plugin_options={"pipeline.groups": 2})
    for engine in (split, ring):
        busy = engine.stats.stage_busy_fractions
        assert len(busy) == 2 and all(0.0 < b <= 1.0 for b in busy)
        assert engine.stats.bubble_fraction == pytest.approx(1.0 - sum(busy) / 2)
    assert sum(split.stats.stage_busy_fractions) <= 1.0 + 1e-9
    assert ring.stats.bubble_fraction < split.stats.bubble_fraction


def test_trace_has_a_track_per_virtual_gpu_and_copy_stream(model):
    """Each decode step's hidden state crosses to GPU 1 on its hand-over stream: one copy per
    group step on that track (a prefill's crossing, within its one pass, is on the compute track)."""
    _, engine = generate_joining(model, sim="h100", sim_devices=2, plugins=["pipeline", "graphs"],
                                 plugin_options={"pipeline.groups": 2})
    events = engine.sim.trace.events()
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert processes == {0: "GPU 0 (h100)", 1: "GPU 1 (h100)", 2: "host"}
    assert {name for (pid, _), name in tracks.items() if pid == 1} == {"compute", "hand-over"}
    hand_over = [e for e in events if e.get("ph") == "X" and e["pid"] == 1 and tracks[(1, e["tid"])] == "hand-over"]
    assert {e["name"] for e in hand_over} == {"hidden state"}
    assert len(hand_over) == engine.stats.decode_steps


def test_a_hand_over_missing_an_event_is_a_hazard(model, monkeypatch):
    """The hazard checks run on every sim run: a hand-over copy not waiting for the stage before,
    or a stage not waiting for its copy, ends the run with a HazardError."""
    from pipellm_core.errors import HazardError
    from pipellm_core.sim.op_costs import SimOpCosting

    wait = SimOpCosting.wait
    for skipped, buffer in ((lambda stream, event: stream.name == "hand-over", "stage output"),
                            (lambda stream, event: event.stream.name == "hand-over", "stage input")):
        monkeypatch.setattr(SimOpCosting, "wait", lambda self, stream, event, skipped=skipped:
                            None if skipped(stream, event) else wait(self, stream, event))
        with pytest.raises(HazardError, match=buffer):
            generate_joining(model, sim="h100", sim_devices=2, plugins=["pipeline"],
                             plugin_options={"pipeline.groups": 2})


def test_prefetch_streams_what_exceeds_each_stage_budget(model):
    """With `prefetch`, a stage over its budget streams its excess layers into a slot on its own
    GPU, on that GPU's copy stream: the tokens of one device, with graphs and groups in flight."""
    import pipellm_prefetch
    from pipellm_core.gguf.model_file import ModelFile
    from pipellm_core.model.weights import packed_layer_bytes
    tensors = ModelFile(model).tensors
    layer = packed_layer_bytes(tensors, 0)
    first, last = end_bytes(tensors)
    # each stage gets three layers; with one slot, room for one resident layer and the slot
    budgets = f"{first + 2 * layer + layer // 5},{last + 2 * layer + layer // 5}"
    one, _ = generate_joining(model, sim="h100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two, engine = generate_joining(model, sim="h100", sim_devices=2, plugins=["pipeline", "prefetch", "graphs"],
                                       plugin_options={"pipeline.budgets": budgets, "pipeline.groups": 2,
                                                       "prefetch.slots": 1})
    assert two == one
    # the split by time would leave stage 0 over its budget: the budgets' split
    assert [p.stage for p in engine.plan.layers] == [0, 0, 0, 1, 1, 1]
    streamed = {s: pipellm_prefetch.plan_of(engine, s).streamed for s in (0, 1)}
    assert streamed == {0: [1, 2], 1: [4, 5]}
    assert [p.resident for p in engine.plan.layers] == [True, False, False, True, False, False]
    assert pipellm_graphs.runner_of(engine).eager_fallbacks == 0
    events = engine.sim.trace.events()
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    copied = {gpu: {e["name"] for e in events if e.get("ph") == "X" and e["pid"] == gpu
                    and tracks.get((gpu, e["tid"])) == "prefetch copies"} for gpu in (0, 1)}
    assert copied == {0: {"layer 1", "layer 2"}, 1: {"layer 4", "layer 5"}}
    for s in (0, 1):
        assert pipellm_prefetch.streamer_of(engine, s).copies >= 2 * engine.stats.decode_steps // 2
    with pytest.raises(PluginError, match="prefetch: stage 1: .* too small"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline", "prefetch"], progress=False,
               plugin_options={"pipeline.budgets": f"{first + 2 * layer},{last // 2}"})


def generate_many(path, **engine_kw):
    """Eleven sequences through eight sequence slots in four groups: sequences join and leave."""
    engine = Engine(path, max_batch=8, ctx_size=512, progress=False, **engine_kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((40, 9), (7, 3), (20, 6), (12, 5), (30, 4), (9, 7), (15, 5), (22, 8), (5, 6), (11, 4),
                         (18, 3))]
    for _ in engine.generate(reqs):
        pass
    return [r.generated for r in reqs], engine


# split by bytes: three layers a GPU, so that both GPUs have copies to overlap with compute
OFFLOAD = {"pipeline.groups": 4, "pipeline.kv_offload": 1, "pipeline.split": "bytes"}


def test_kv_offload_of_waiting_groups_gives_the_one_device_tokens(model):
    """Four groups of two sequences, their KV caches in host memory: each stage's GPU holds the
    rows of three groups (two in turn, one for admissions) and the pad row, not eight
    sequences'; the tokens are one device's, with graphs; the copies in of a stage overlap the
    compute of the group before on its GPU."""
    one, _ = generate_many(model, sim="h100")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        two, engine = generate_many(model, sim="h100", sim_devices=2, plugins=["pipeline", "graphs"],
                                    plugin_options=OFFLOAD)
    assert two == one
    assert engine.group_kv_offload == 2 and engine.cache.k[0].shape[0] == 3 * 2 + 1 < engine.max_batch
    assert pipellm_graphs.runner_of(engine).eager_fallbacks == 0
    events = engine.sim.trace.events()
    tracks = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}

    def spans(gpu, track, prefix=""):
        return [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e["pid"] == gpu
                and tracks.get((gpu, e["tid"])) == track and e["name"].startswith(prefix) and e["dur"] > 0]
    for gpu in (0, 1):
        copies_in, compute = spans(gpu, "kv in", "kv of group"), spans(gpu, "compute")
        assert copies_in and spans(gpu, "kv out", "kv of group")
        overlap = sum(max(0.0, min(b, d) - max(a, c)) for a, b in copies_in for c, d in compute)
        assert overlap > 0.1 * sum(b - a for a, b in copies_in)


def test_kv_offload_copies_missing_an_event_are_hazards(model, monkeypatch):
    """A stage not waiting for its rows to come in, or a write-back not waiting for the stage,
    ends the run with a HazardError."""
    from pipellm_core.errors import HazardError
    from pipellm_core.sim.op_costs import SimOpCosting

    wait = SimOpCosting.wait
    for skipped, race in ((lambda stream, event: event.stream is not None and event.stream.name == "kv in",
                           "'kv set'.* read on .*stream 'compute' while its write by 'kv of group .* stream 'kv in'"),
                          (lambda stream, event: stream.name == "kv out",
                           "'kv set'.* read on .*stream 'kv out' while its write by 'access'")):
        monkeypatch.setattr(SimOpCosting, "wait", lambda self, stream, event, skipped=skipped:
                            None if skipped(stream, event) else wait(self, stream, event))
        with pytest.raises(HazardError, match=race):
            generate_many(model, sim="h100", sim_devices=2, plugins=["pipeline"], plugin_options=OFFLOAD)


def test_kv_offload_needs_groups_and_is_not_for_the_server(model):
    from pipellm_core.errors import PipeLLMError
    from pipellm_core.runtime.scheduler import EngineLoop
    with pytest.raises(PluginError, match="kv_offload .* pipeline.groups of 2 or more"):
        Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False,
               plugin_options={"pipeline.kv_offload": 1})
    engine = Engine(model, sim="h100", sim_devices=2, plugins=["pipeline"], progress=False, max_batch=8,
                    plugin_options=OFFLOAD)
    with pytest.raises(PipeLLMError, match="server steps its batch as one group"):
        EngineLoop(engine, max_waiting=4)
