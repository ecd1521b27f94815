"""The prefetch plugin: which layers stream under a budget, the same greedy tokens as with every
layer resident (alone and with graphs), copies overlapped with compute on the sim, and the
hazard checks catching a copy that does not wait for its slot."""

import warnings
from dataclasses import replace

import pytest
from gguf import GGMLQuantizationType as GGMLType

import pipellm_graphs
import pipellm_prefetch
from pipellm_core import ablate
from pipellm_core.runtime.engine import Engine
from pipellm_core.errors import HazardError, PluginError
from pipellm_core.sim.profiles import get_profile
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams
from pipellm_core.gguf.synthetic import Shape, write_random_gguf
from pipellm_prefetch.budget import parse_size, plan_streaming, spread
from pipellm_core.sim.platform import SimCopyQueue

SIX_LAYERS = Shape("llama", 6, 64, 128, 4, 2, 2048)


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path):
    path = tmp_path_factory.mktemp("prefetch") / "six-layers-q4.gguf"
    return write_random_gguf(str(path), SIX_LAYERS, GGMLType.Q4_0, tokenizer_from=smollm2_path, std=0.3, seed=5)


def generate(path, **engine_kw):
    """Three sequences of different lengths decoding together; two finish early."""
    engine = Engine(path, max_batch=4, ctx_size=512, progress=False, **engine_kw)
    reqs = [Request(list(range(100, 100 + n)), m, SamplingParams(temperature=0), ignore_eos=True)
            for n, m in ((40, 12), (7, 5), (20, 8))]
    for _ in engine.generate(reqs):
        pass
    return [r.generated for r in reqs], engine


def test_sizes_and_spreading():
    assert parse_size("6GiB") == 6 * 2**30 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("800MiB") == 800 * 2**20 and parse_size(4096) == 4096
    with pytest.raises(PluginError, match="as a size"):
        parse_size("lots")
    assert spread(32, 16) == list(range(1, 32, 2))
    assert spread(6, 2) == [2, 5] and spread(4, 0) == [] and spread(3, 3) == [0, 1, 2]


def test_budget_streams_as_few_layers_as_fit():
    layers = [100] * 10
    assert plan_streaming(layers, 50, budget=1050).streamed == []  # everything fits
    p = plan_streaming(layers, 50, budget=900, slots=2)
    # 50 fixed + 2 slots of 100 + resident layers within 900: 6 resident, 4 stream
    assert len(p.streamed) == 4 and p.gpu_bytes <= 900 and p.slot_bytes == 100
    assert plan_streaming(layers, 50, resident_layers=7).streamed == spread(10, 3)
    with pytest.raises(PluginError, match="too small"):
        plan_streaming(layers, 50, budget=240, slots=2)
    one = plan_streaming(layers, 50, resident_layers=9, slots=2)  # one layer streams: one slot is enough
    assert len(one.streamed) == 1 and one.gpu_bytes == 50 + 9 * 100 + 100
    with pytest.raises(PluginError, match="between 0 and 10"):
        plan_streaming(layers, 50, resident_layers=11)


def test_streamed_layers_give_the_resident_tokens(model):
    resident, _ = generate(model, sim="h100")
    streamed, engine = generate(model, sim="h100", plugins=["prefetch"],
                                plugin_options={"prefetch.resident_layers": 2})
    assert streamed == resident
    s = pipellm_prefetch.streamer_of(engine)
    assert s.streamed == [1, 2, 4, 5] and len(s.slots) == 2
    assert [engine.plan.layers[i].resident for i in range(6)] == [True, False, False, True, False, False]
    assert s.copies >= 4 * 12  # every streamed layer, in every prefill and decode step
    # one slot is enough too (no overlap, same numbers)
    one_slot, _ = generate(model, sim="h100", plugins=["prefetch"],
                           plugin_options={"prefetch.resident_layers": 2, "prefetch.slots": 1})
    assert one_slot == resident


def test_prefetch_composes_with_graphs(model):
    resident, _ = generate(model, sim="h100")
    both, engine = generate(model, sim="h100", plugins=["graphs", "prefetch"],
                            plugin_options={"prefetch.resident_layers": 3})
    assert both == resident
    runner = pipellm_graphs.runner_of(engine)
    assert runner.replays > 0 and runner.eager_fallbacks == 0
    graph = next(g for g in runner.graphs.values() if g is not None)
    copies = [n for n in graph.nodes if n.run is not None and n.name.startswith("layer ")]
    assert len(copies) == 3  # the step's copies are captured with it


def test_copies_overlap_compute_on_the_sim(model):
    """On a GPU whose host link is slow enough that copies cost as much as compute, a streamed
    step costs about the larger of the two, not their sum."""
    slow_link = replace(get_profile("h100"), name="slow-link", pinned_h2d_bytes_per_s=7e6)
    rows = ablate(model, [[], ["prefetch"]], backend="sim", batch=2, prompt_tokens=16, n_predict=6,
                  repeats=1, progress=False, sim_profile=slow_link,
                  plugin_options={"prefetch.resident_layers": 0})
    resident, streamed = rows
    assert streamed["same_tokens"] is True
    assert streamed["peak_memory"]["sim:0"] < resident["peak_memory"]["sim:0"]
    _, engine = generate(model, sim=slow_link)
    layer = engine.weights.layers[0].nbytes
    copies = 6 * slow_link.copy_seconds(layer, "h2d") * 1e3  # ms of copies per step
    compute = resident["ms_per_step"]
    assert 0.5 < copies / compute < 2  # comparable, so overlap shows
    assert streamed["ms_per_step"] >= copies  # no faster than the link
    assert streamed["ms_per_step"] < 0.8 * (compute + copies)  # but overlapped with compute


def test_budget_is_respected_on_the_sim(model):
    opts = {"prefetch.workspace": "1MiB"}
    full = Engine(model, sim="h100", max_batch=2, ctx_size=256, progress=False, plugins=["prefetch"],
                  plugin_options=opts)
    whole = pipellm_prefetch.plan_of(full)
    assert whole.streamed == []  # the sim's 80 GB hold it all
    budget = whole.gpu_bytes - max(whole.layer_bytes) // 2
    engine = Engine(model, sim="h100", max_batch=2, ctx_size=256, progress=False, plugins=["prefetch"],
                    plugin_options={**opts, "prefetch.vram_budget": budget})
    plan = pipellm_prefetch.plan_of(engine)
    assert 0 < len(plan.streamed) < 6 and plan.gpu_bytes <= budget
    assert engine.sim.device(0).allocated_bytes <= budget  # weights, cache and slots, before any step
    with pytest.raises(PluginError, match="too small"):
        Engine(model, sim="h100", max_batch=2, ctx_size=256, progress=False, plugins=["prefetch"],
               plugin_options={**opts, "prefetch.vram_budget": "100KiB"})


def test_a_copy_that_does_not_wait_for_its_slot_is_a_hazard(model, monkeypatch):
    def careless_copy(self, dst, src, after, ready, name, buffer):
        with self.costing.uncharged():
            dst.copy_(src)
        self.costing.copy(self.copy_stream, name, src.numel(), "h2d", src=("host", name),
                          dst=buffer)  # no wait for the layer reading the slot
        self.costing.record(self.copy_stream, ready)

    monkeypatch.setattr(SimCopyQueue, "copy", careless_copy)
    with pytest.raises(HazardError):
        generate(model, sim="h100", plugins=["prefetch"], plugin_options={"prefetch.resident_layers": 0})


def test_on_the_cpu_it_says_so_and_streams_nothing(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens, engine = generate(model, plugins=["prefetch"])
    assert any("prefetch" in str(w.message) for w in caught)
    assert pipellm_prefetch.plan_of(engine) is None
    assert all(p.resident for p in engine.plan.layers)


def test_core_runs_layers_left_in_host_memory(model):
    """A plan that leaves layers in host memory with no plugin streaming them still runs
    (the engine copies them itself), with the resident tokens."""
    from pipellm_core import hookimpl

    class HostPlan:
        @hookimpl
        def load(self, plan, config, engine):
            for p in plan.layers[::2]:
                p.resident = False

    resident, _ = generate(model, pad_steps=True)
    hosted, engine = generate(model, pad_steps=True, extra_plugins=(HostPlan(),))
    assert hosted == resident
    assert engine.weights.layers[0].host is not None and engine.weights.layers[1].host is None


def test_cli_budget_too_small_is_one_line_error(capsys):
    from pipellm_core.frontends.cli import main
    code = main(["run", "--backend", "sim", "--plugins", "prefetch", "--vram-budget", "1MiB",
                 "-p", "Hi", "-n", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("pipellm: error:")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1
    assert errors[0].startswith("pipellm: error: prefetch: a VRAM budget of 1.0 MiB is too small")
    code = main(["run", "--backend", "sim", "--plugins", "prefetch", "--vram-budget", "lots", "-p", "Hi"])
    assert code == 1 and "cannot read 'lots' as a size" in capsys.readouterr().err


def test_settings_of_plugins_are_checked(capsys, model):
    from pipellm_core.frontends.cli import main
    assert main(["run", "--backend", "sim", "--vram-budget", "1GiB", "-p", "Hi", "-n", "1"]) == 1
    assert "--vram-budget is a setting of the prefetch plugin, which is not enabled" in capsys.readouterr().err
    with pytest.raises(PluginError, match="unknown option prefetch.vram_budgt"):
        Engine(model, sim="h100", progress=False, plugins=["prefetch"],
               plugin_options={"prefetch.vram_budgt": "1GiB"})
    with pytest.raises(PluginError, match="prefetch.slots takes a whole number"):
        Engine(model, sim="h100", progress=False, plugins=["prefetch"], plugin_options={"prefetch.slots": "two"})
