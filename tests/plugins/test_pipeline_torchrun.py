"""The pipeline's stages as processes under torchrun, on the CPU with gloo: two processes give
the text of one, only rank 0 prints, an error on rank 0 still ends the other rank, and each
process holds only its own stage's part of the model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType

import pipellm_core
import pipellm_pipeline
from pipellm_core.errors import PipeLLMError
from pipellm_core.frontends.cli import main
from pipellm_core.gguf.synthetic import Shape, write_random_gguf
from pipellm_core.runtime import engine as engine_module
from pipellm_core.runtime.distributed_stages import StageGroup
from pipellm_core.runtime.engine import Engine

FOUR_LAYERS = Shape("llama", 4, 64, 128, 4, 2, 2048)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_path):
    path = tmp_path_factory.mktemp("torchrun") / "four-layers-q8.gguf"
    return write_random_gguf(str(path), FOUR_LAYERS, GGMLType.Q8_0, tokenizer_from=smollm2_path, std=0.3, seed=11)


def torchrun_pipellm(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`pipellm ARGS` under torchrun in `processes` processes on this host, importing the same
    pipellm_core and plugins as this test."""
    paths = [str(Path(m.__file__).parents[1]) for m in (pipellm_core, pipellm_pipeline)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(processes), "-m", "pipellm_core.frontends.cli", *args],
                          capture_output=True, text=True, env=env, timeout=180)


def one_process_pipellm(args: list[str], capsys) -> str:
    """The same command in this process; what it prints on stdout. One thread, as torchrun
    gives each of its workers, so that both runs sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_two_processes_give_the_text_of_one(model, capsys):
    args = ["run", "-m", model, "--device", "cpu", "--plugins", "pipeline", "-p", PROMPT,
            "-n", "16", "--temp", "0"]
    one = one_process_pipellm(args, capsys)
    two = torchrun_pipellm(args)
    assert two.returncode == 0, two.stderr
    assert len(one.strip()) > 0
    assert two.stdout == one  # rank 0's text once, nothing from rank 1
    # split by time: the head's product outweighs a layer of this model, the embedding is a lookup
    assert "pipeline: stage 0: layers 0-2 + embedding, " in two.stderr and "; stage 1: layers 3-3 + head, " in two.stderr
    assert "decode: 15 tokens" in two.stderr


def test_a_batch_job_across_two_processes(model, tmp_path, capsys):
    """Three prompts in a batch of two: the third joins when the first two end, so prefills and
    decode steps of several sizes cross the processes."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"Once upon a time"\n"The capital of France is"\n"1, 2, 3,"\n')
    args = ["run", "-m", model, "--device", "cpu", "--plugins", "pipeline", "--prompts", str(prompts),
            "-b", "2", "-n", "8", "--temp", "0", "--no-progress"]
    one, two = one_process_pipellm(args, capsys), torchrun_pipellm(args)
    assert two.returncode == 0, two.stderr
    assert len(one.splitlines()) == 3
    assert two.stdout == one


def test_an_error_on_rank_0_ends_the_job(model):
    """A prompt longer than the context fails on rank 0 after the stages are up: rank 1 is
    stopped, the job ends with rank 0's error line."""
    args = ["run", "-m", model, "--device", "cpu", "--plugins", "pipeline", "-p", PROMPT * 4,
            "-c", "8", "-n", "4", "--temp", "0", "--no-progress"]
    two = torchrun_pipellm(args)
    assert two.returncode != 0
    errors = [line for line in two.stderr.splitlines() if line.startswith("pipellm: error:")]
    assert errors == [errors[0]] and "does not fit the context" in errors[0]
    assert two.stdout == ""


def test_each_process_holds_only_its_stage(model, monkeypatch):
    """Rank 1 of 2 (no peers needed to load): layer 3, the head and their KV cache on the CPU;
    layers 0-2 and the embedding on the meta device, never loaded."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(engine_module.StageGroup, "join", staticmethod(lambda device: StageGroup(1, 2, "cpu")))
    engine = Engine(model, plugins=["pipeline"], max_batch=1, ctx_size=64, progress=False)
    assert engine.plan.stages == [[0, 1, 2], [3]]
    where = [str(layer.wq.raw.device) for layer in engine.weights.layers]
    assert where == ["meta", "meta", "meta", "cpu"]
    assert [str(k.device) for k in engine.cache.k] == ["meta", "meta", "meta", "cpu"]
    assert engine.weights.token_embd.raw.device.type == "meta"
    assert engine.weights.output.raw.device.type == "cpu"


def test_under_torchrun_the_pipeline_plugin_is_needed(model, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipeLLMError, match="add --plugins pipeline"):
        Engine(model, plugins=[], progress=False)
    with pytest.raises(PipeLLMError, match="graphs not yet"):
        Engine(model, plugins=["pipeline", "graphs"], progress=False)
