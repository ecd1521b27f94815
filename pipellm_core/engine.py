"""The torch engine: loads a GGUF through the plugin hooks and generates for many sequences at
once, with continuous batching over a static KV cache."""

from __future__ import annotations

import contextlib

import torch

from .batching import ContinuousBatcher
from .errors import ContextLengthError, PipeLLMError
from .load_plan import LoadPlan
from .model_file import ModelFile
from .plugin_manager import make_plugin_manager
from .request import GenerationStats, Request, Timer
from .step import StepBatch
from .step_shapes import StepShapes
from .tokenizer import Tokenizer
from .transformer import KVCache, Transformer
from .weights import load_weights


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
    CPU, the time and memory on a virtual GPU of that profile (`engine.sim`).
    On CUDA and the sim, decode steps run in fixed shapes (`step_shapes.StepShapes`) so that a
    captured graph gives the eager step's bits; `batch_buckets` and `ctx_buckets` ("1,2,4" or a
    list) replace the default ones. On the CPU steps keep their exact shape unless
    `pad_steps=True`: no graph runs there, and exact shapes are what llama.cpp computes.
    `plugin_options` holds settings of plugins, keyed "plugin.setting".
    """

    def __init__(self, model_path: str, *, device: str = "cpu", plugins=(), max_batch: int = 1,
                 ctx_size: int = 2048, dtype: torch.dtype | None = None, progress: bool = True,
                 extra_plugins: tuple = (), tokenizer: Tokenizer | None = None,
                 sim: str | None = None, plugin_options: dict | None = None,
                 batch_buckets=None, ctx_buckets=None, pad_steps: bool | None = None):
        if sim is not None and device != "cpu":
            raise PipeLLMError("the sim backend computes on the CPU; leave --device at cpu")
        self.device = resolve_device(device)
        self.sim = self.costing = None
        if sim is not None:
            from .sim import SimRuntime
            from .sim.op_costs import SimOpCosting
            self.sim = SimRuntime(sim)
            self.costing = SimOpCosting(self.sim)
        self.progress = progress
        self.plugin_options = dict(plugin_options or {})
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
        # every forward pass runs on this stream, graph captures included: libraries (cuBLAS)
        # may pick another algorithm on another stream, and then a replay would not give the
        # eager step's bits
        self.compute_stream = torch.cuda.Stream(self.device) if self.device.startswith("cuda") else None
        if self.sim is not None:
            self._place_on_sim()
        self.model = Transformer(self.config, self.weights, self.cache, self.dtype)
        self.tokenizer = tokenizer or Tokenizer(self.file.path)
        self.stats = GenerationStats()
        self.pm.hook.capture(engine=self)

    def _place_on_sim(self) -> None:
        """Charge the virtual GPU for what would live on it: resident weights and the KV cache."""
        dev = self.sim.device(0)
        w = self.weights
        resident = sum(lw.nbytes for lw, p in zip(w.layers, self.plan.layers) if p.resident)
        head = w.output.nbytes if w.output is not w.token_embd else 0
        dev.allocate(resident + w.token_embd.nbytes + head, "weights")
        dev.allocate(self.cache.nbytes, "kv cache")

    def running(self):
        """Context of every forward pass: on the sim backend, the operations are charged to it;
        on CUDA they run on the engine's compute stream."""
        if self.costing is not None:
            return self.costing
        if self.compute_stream is not None:
            return self._on_compute_stream()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _on_compute_stream(self):
        stream = self.compute_stream
        caller = torch.cuda.current_stream(stream.device)
        if caller == stream:  # already on it (a capture inside a step)
            yield
            return
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            yield
        caller.wait_stream(stream)

    def step_timer(self):
        if self.sim is None:
            return Timer()
        from .sim.timer import VirtualTimer
        return VirtualTimer(self.sim)

    def stage_device(self, stage: int) -> str:
        return self.plan.layers[self.plan.stages[stage][0]].device

    # --- one step -------------------------------------------------------------------------

    def _before_layer(self, layer: int):
        return self.pm.hook.prefetch(engine=self, layer=layer)

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
