"""The torch engine: loads a GGUF through the plugin hooks and generates for many sequences at
once, with continuous batching over a static KV cache."""

from __future__ import annotations

import contextlib

import torch

from pipellm_core.runtime.batching import ContinuousBatcher
from pipellm_core.errors import ContextLengthError, PipeLLMError
from pipellm_core.model.load_plan import LoadPlan
from pipellm_core.gguf.model_file import ModelFile
from pipellm_core.hooks.manager import make_plugin_manager
from pipellm_core.runtime.request import GenerationStats, Request, Timer
from pipellm_core.runtime.step import StepBatch
from pipellm_core.runtime.step_shapes import StepShapes
from pipellm_core.text.tokenizer import Tokenizer
from pipellm_core.model.transformer import KVCache, Transformer
from pipellm_core.model.weights import load_weights


def resolve_device(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PipeLLMError("--device cuda asked for, but this torch sees no CUDA GPU")
        return str(torch.device("cuda", dev.index or 0))
    if dev.type != "cpu":
        raise PipeLLMError(f"unsupported device {device!r} (supported: cpu, cuda)")
    return "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


class Engine(ContinuousBatcher):
    """A loaded model ready to generate; `plugins` are names of installed pipellm plugins.

    With `sim="h100"` (or another profile) the engine runs on the sim backend: the math on the
    CPU, the time and memory on `sim_devices` virtual GPUs of that profile (`engine.sim`); the
    layers of pipeline stage s are charged to virtual GPU s (modulo their number).
    On CUDA and the sim, decode steps run in fixed shapes (`step_shapes.StepShapes`) so that a
    captured graph gives the eager step's bits; `batch_buckets` and `ctx_buckets` ("1,2,4" or a
    list) replace the default ones. On the CPU steps keep their exact shape unless
    `pad_steps=True`: no graph runs there, and exact shapes are what llama.cpp computes.
    `plugin_options` holds settings of plugins, keyed "plugin.setting".
    """

    def __init__(self, model_path: str, *, device: str = "cpu", plugins=(), max_batch: int = 1,
                 ctx_size: int = 2048, dtype: torch.dtype | None = None, progress: bool = True,
                 extra_plugins: tuple = (), tokenizer: Tokenizer | None = None,
                 sim: str | None = None, sim_devices: int = 1, plugin_options: dict | None = None,
                 batch_buckets=None, ctx_buckets=None, pad_steps: bool | None = None):
        if sim is not None and device != "cpu":
            raise PipeLLMError("the sim backend computes on the CPU; leave --device at cpu")
        self.device = resolve_device(device)
        self.sim = self.costing = None
        if sim is not None:
            from pipellm_core.sim import SimRuntime
            from pipellm_core.sim.op_costs import SimOpCosting
            self.sim = SimRuntime(sim, n_devices=sim_devices)
            self.costing = SimOpCosting(self.sim)
        self.progress = progress
        self.plugin_options = dict(plugin_options or {})
        self.plugin_state: dict[str, object] = {}  # what each plugin keeps for this engine, by plugin name
        self.file = ModelFile(model_path)
        self.config = self.file.config
        if ctx_size <= 0:
            raise ContextLengthError(f"context size must be positive, got {ctx_size}")
        if ctx_size > self.config.context_length:
            raise ContextLengthError(f"context size {ctx_size} exceeds the model's trained context "
                                     f"of {self.config.context_length}")
        if max_batch <= 0:
            raise PipeLLMError(f"batch size must be positive, got {max_batch}")
        self.max_batch, self.ctx_size = max_batch, ctx_size
        self.shapes = StepShapes.for_engine(max_batch, ctx_size, batch_buckets, ctx_buckets)
        if pad_steps is None:
            pad_steps = self.device.startswith("cuda") or sim is not None
        self.pad_steps = pad_steps
        self.dtype = dtype or default_dtype(self.device)
        self.pm = make_plugin_manager(plugins, extra_plugins)
        self.plan = LoadPlan.empty(self.config.n_layers)
        self.pm.hook.load(plan=self.plan, config=self.config, engine=self)
        self.weights = load_weights(self.file, self.plan, progress)
        # fp16 keys and values, as llama.cpp keeps them by default; one slot more than the batch
        # for the padding rows of fixed-shape (graph) steps to write into
        self.cache = KVCache(self.config, max_batch + 1, ctx_size, torch.float16, self.weights.layer_devices)
        self.pad_slot = max_batch
        # every forward pass runs on these streams (one per GPU the model uses), graph captures
        # included: kernels may pick another algorithm on another stream, and then a
        # replay would not give the eager step's bits
        gpus = {d for d in [str(x) for x in self.weights.layer_devices] + [self.device] if d.startswith("cuda")}
        self.compute_streams = {d: torch.cuda.Stream(d) for d in sorted(gpus)}
        self.compute_stream = self.compute_streams.get(self.device)
        self._sim_layer_device = []
        if self.sim is not None:
            n = len(self.sim.devices)
            self._sim_layer_device = [p.stage % n for p in self.plan.layers]
            self._place_on_sim()
        self.model = Transformer(self.config, self.weights, self.cache, self.dtype)
        self.tokenizer = tokenizer or Tokenizer(self.file.path)
        self.stats = GenerationStats()
        self.pm.hook.capture(engine=self)

    def _place_on_sim(self) -> None:
        """Charge each virtual GPU for what would live on it: resident weights and KV cache of
        its layers; the embedding on the first layer's GPU, the head on the last's."""
        w, devices = self.weights, self._sim_layer_device
        first, last = self.sim.device(devices[0]), self.sim.device(devices[-1])
        for index in sorted(set(devices)):
            mine = [i for i, d in enumerate(devices) if d == index]
            resident = sum(w.layers[i].nbytes for i in mine if self.plan.layers[i].resident)
            cache = sum(self.cache.k[i].numel() * self.cache.k[i].element_size() * 2 for i in mine)
            self.sim.device(index).allocate(resident, "weights")
            self.sim.device(index).allocate(cache, "kv cache")
        first.allocate(w.token_embd.nbytes, "embedding")
        if w.output is not w.token_embd or last is not first:
            last.allocate(w.output.nbytes, "output head")

    def running(self):
        """Context of every forward pass: on the sim backend, the operations are charged to it
        (starting on the first layer's virtual GPU); on CUDA they run on the engine's compute
        streams."""
        if self.costing is not None:
            self.costing.device = self._sim_layer_device[0]
            return self.costing
        if self.compute_streams:
            return self._on_compute_streams()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _on_compute_streams(self):
        with contextlib.ExitStack() as stack:
            # entering a stream makes its GPU current: the engine's own GPU last, so it stays current
            for device, stream in sorted(self.compute_streams.items(), key=lambda kv: kv[0] == self.device):
                stack.enter_context(self._on_stream(stream))
            yield

    @staticmethod
    @contextlib.contextmanager
    def _on_stream(stream):
        caller = torch.cuda.current_stream(stream.device)
        if caller == stream:  # already on it (a capture inside a step)
            yield
            return
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            yield
        caller.wait_stream(stream)

    def compute_stream_of(self, device) -> torch.cuda.Stream:
        return self.compute_streams[str(torch.device(device))]

    def step_timer(self):
        if self.sim is None:
            return Timer()
        from pipellm_core.sim.timer import VirtualTimer
        return VirtualTimer(self.sim)

    def stage_device(self, stage: int) -> str:
        return self.plan.layers[self.plan.stages[stage][0]].device

    # --- one step -------------------------------------------------------------------------

    def _before_layer(self, layer: int, hidden: torch.Tensor):
        if self.costing is not None:
            # charged to the layer's virtual GPU; crossing to another GPU waits for the work queued
            # so far on the previous one and receives the hidden state, as a copy between CUDA
            # devices orders their current streams
            self._sim_switch(self._sim_layer_device[layer], hidden.numel())
        for answer in self.pm.hook.prefetch(engine=self, layer=layer):
            if answer is not None:
                return answer
        return self._host_layer_on_device(layer)

    def enter_stage(self, stage: int) -> None:
        """Before a stage's decode step (or its capture). On the sim: its virtual GPU becomes
        the one charged, and a stage after the first receives its micro-batch's hidden state
        from the stage before. On CUDA the streams and copies order themselves."""
        if self.costing is None:
            return
        first = self.plan.stages[stage][0]
        if stage == 0:
            self.costing.device = self._sim_layer_device[first]
            return
        prev = self.plan.stages[stage - 1][-1]
        self.costing.device = self._sim_layer_device[prev]
        rows = self.max_batch  # the hidden state's size only sets the copy's (tiny) cost
        self._sim_switch(self._sim_layer_device[first], rows * self.config.n_embd)

    def _sim_switch(self, index: int, hidden_numel: int) -> None:
        c = self.costing
        if index == c.device:
            return
        done = self.sim.event()
        c.record(c.stream, done)
        c.device = index
        c.wait(c.stream, done)
        c.copy(c.stream, "hidden state", hidden_numel * c.float_bytes, "peer")

    def _host_layer_on_device(self, layer: int):
        """A layer left in host memory that no plugin streamed: copied to its device now,
        blocking (correct, and as slow as it sounds); None where it can be used as it is."""
        w = self.weights.layers[layer]
        device = self.plan.layers[layer].device
        if w.host is None or torch.device(device).type == "cpu":
            return None
        return w.host.view(w.host.buffer.to(device))

    def stage_layers(self, stage: int) -> range:
        layers = self.plan.stages[stage]
        return range(layers[0], layers[-1] + 1)

    def eager_stage_step(self, stage: int, batch: StepBatch, hidden: torch.Tensor | None):
        """The core's decode: the stage's layers run eagerly; logits [B, vocab] from the last."""
        out = self.model.forward(batch.tokens[:, None], batch.positions[:, None], batch.slots,
                                 batch.ctx_len, layers=self.stage_layers(stage), hidden=hidden,
                                 before_layer=self._before_layer)
        return out[:, -1] if stage == len(self.plan.stages) - 1 else out

    def decode_step(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, vocab] of one decode step for every sequence in `batch`."""
        schedule = self.pm.hook.schedule(engine=self, batch=batch)
        outputs: dict[int, torch.Tensor] = {}
        with self.running():
            for tick in schedule.ticks:
                for stage, m in tick:
                    self.enter_stage(stage)
                    outputs[m] = self.pm.hook.decode(engine=self, stage=stage,
                                                     batch=schedule.micro_batches[m], hidden=outputs.get(m))
            return torch.cat([outputs[m].to(self.device) for m in range(len(schedule.micro_batches))])

    def prefill(self, prompts: list[list[int]], slots: list[int], all_logits: bool = False):
        """Run whole prompts (right-padded into one batch) into their cache slots.

        Returns the logits of each prompt's last token [B, vocab], or of every position
        [B, T, vocab] with `all_logits`. Padding writes past a prompt's end are harmless:
        later positions are masked until a decode step overwrites them.
        """
        T = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p)
        dev = self.plan.embedding_device
        positions = torch.arange(T).expand(len(prompts), T).to(dev)
        last = None if all_logits else torch.tensor([len(p) - 1 for p in prompts], device=dev)
        with self.running():
            out = self.model.forward(tokens.to(dev), positions, torch.tensor(slots, device=dev), T,
                                     before_layer=self._before_layer, logits_index=last)
            return out if all_logits else out[:, 0]

    # --- generation ----------------------------------------------------------------------

    def prefill_logits(self, admitted: list[Request]) -> torch.Tensor:
        return self.prefill([r.prompt_tokens for r in admitted], [r.slot for r in admitted])

    def decode_logits(self, active: list[Request]) -> torch.Tensor:
        return self.decode_step(self._step_batch(active))[: len(active)]

    def _step_batch(self, active: list[Request]) -> StepBatch:
        """The step of `active`, padded to its shape: extra rows write to the scratch slot."""
        positions = [r.position for r in active]
        batch, ctx = len(active), max(positions) + 1
        if self.pad_steps:
            batch, ctx = self.shapes.pick(batch, ctx)
        pad = batch - len(active)
        dev = self.plan.embedding_device
        return StepBatch(
            tokens=torch.tensor([r.generated[-1] for r in active] + [0] * pad, device=dev),
            positions=torch.tensor(positions + [0] * pad, device=dev),
            slots=torch.tensor([r.slot for r in active] + [self.pad_slot] * pad, device=dev),
            ctx_len=ctx,
        )
