"""The torch engine: loads a GGUF through the plugin hooks and generates for many sequences at
once, with continuous batching over a static KV cache."""

from __future__ import annotations

import torch

from pipellm_core.runtime.batching import ContinuousBatcher, check_context_size
from pipellm_core.runtime.distributed_stages import StageGroup, StagePass, launched_processes
from pipellm_core.runtime.group_batching import generate_in_groups
from pipellm_core.runtime.platform import make_platform
from pipellm_core.errors import PipeLLMError
from pipellm_core.model.load_plan import LoadPlan
from pipellm_core.gguf.model_file import ModelFile
from pipellm_core.hooks.manager import make_plugin_manager, parse_plugin_list
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


def check_stage_processes(plugins, sim) -> None:
    """Under torchrun each process runs one pipeline stage, eagerly: the pipeline plugin, alone."""
    if sim is not None:
        raise PipeLLMError("the sim backend runs in one process; drop torchrun or --backend sim")
    names = parse_plugin_list(plugins)
    if "pipeline" not in names:
        raise PipeLLMError("under torchrun each process runs one pipeline stage: add --plugins pipeline")
    others = [n for n in names if n != "pipeline"]
    if others:
        raise PipeLLMError(f"under torchrun the stages run eagerly; {', '.join(others)} not yet "
                           f"(use --plugins pipeline alone)")


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


class Engine(ContinuousBatcher):
    """A loaded model ready to generate; `plugins` are names of installed pipellm plugins.

    With `sim="h100"` (or another profile) the engine runs on the sim backend: the math on the
    CPU, the time and memory on `sim_devices` virtual GPUs of that profile (`engine.sim`); the
    layers of pipeline stage s are charged to virtual GPU s (modulo their number). Whatever
    differs between the CPU, CUDA and the sim is asked of `engine.platform`.
    On CUDA and the sim, decode steps run in fixed shapes (`step_shapes.StepShapes`) so that a
    captured graph gives the eager step's bits; `batch_buckets` and `ctx_buckets` ("1,2,4" or a
    list) replace the default ones. On the CPU steps keep their exact shape unless
    `pad_steps=True`: no graph runs there, and exact shapes are what llama.cpp computes.
    `plugin_options` holds settings of plugins, keyed "plugin.setting".
    Under torchrun (`stage_group`) each process is one pipeline stage and holds only its layers;
    rank 0 generates, the other ranks run `serve_stage` (`runtime.distributed_stages`).
    """

    def __init__(self, model_path: str, *, device: str = "cpu", plugins=(), max_batch: int = 1,
                 ctx_size: int = 2048, dtype: torch.dtype | None = None, progress: bool = True,
                 extra_plugins: tuple = (), tokenizer: Tokenizer | None = None,
                 sim: str | None = None, sim_devices: int = 1, plugin_options: dict | None = None,
                 batch_buckets=None, ctx_buckets=None, pad_steps: bool | None = None):
        if sim is not None and device != "cpu":
            raise PipeLLMError("the sim backend computes on the CPU; leave --device at cpu")
        if launched_processes() > 1:
            check_stage_processes(plugins, sim)
        self.stage_group = StageGroup.join(device)  # None unless launched by torchrun
        self.device = self.stage_group.device if self.stage_group else resolve_device(device)
        self.platform = make_platform(self.device, sim, sim_devices)
        self.sim = getattr(self.platform, "runtime", None)  # the sim's runtime, for traces and memory figures
        self.progress = progress
        self.plugin_options = dict(plugin_options or {})
        self.plugin_state: dict[str, object] = {}  # what each plugin keeps for this engine, by plugin name
        self.file = ModelFile(model_path)
        self.config = self.file.config
        check_context_size(ctx_size, self.config.context_length)
        if max_batch <= 0:
            raise PipeLLMError(f"batch size must be positive, got {max_batch}")
        self.max_batch, self.ctx_size = max_batch, ctx_size
        self.shapes = StepShapes.for_engine(max_batch, ctx_size, batch_buckets, ctx_buckets)
        if pad_steps is None:
            pad_steps = self.device.startswith("cuda") or sim is not None
        self.pad_steps = pad_steps
        self.dtype = dtype or default_dtype(self.device)
        self.pm = make_plugin_manager(plugins, extra_plugins)
        # sequences per group whose waiting groups' KV caches live in host memory (set by a `load`
        # hook, `pipeline.kv_offload`); None: every sequence has its cache slot on the GPUs
        self.group_kv_offload: int | None = None
        self.plan = LoadPlan.empty(self.config.n_layers)
        self.pm.hook.load(plan=self.plan, config=self.config, engine=self)
        self.pm.hook.check_plan(plan=self.plan, engine=self)
        if self.stage_group and len(self.plan.stages) != self.stage_group.size:
            raise PipeLLMError(f"the pipeline plugin gave {len(self.plan.stages)} stages for "
                               f"{self.stage_group.size} processes")
        self.weights = load_weights(self.file, self.plan, progress)
        self.cache = self._kv_cache(self.weights.layer_devices)
        self.pad_slot = self.kv_slots  # the cache's extra slot
        self.platform.place(self)
        self.model = Transformer(self.config, self.weights, self.cache, self.dtype)
        self.model.charge_kernels = self.platform.kernel_charges()
        self.tokenizer = tokenizer or Tokenizer(self.file.path)
        self.stats = GenerationStats()
        self.pm.hook.setup(engine=self)
        self.pm.hook.capture(engine=self)

    def _kv_cache(self, layer_devices) -> KVCache:
        # fp16 keys and values, as llama.cpp keeps them by default; one slot more than the batch
        # for the padding rows of fixed-shape (graph) steps to write into
        return KVCache(self.config, self.kv_slots + 1, self.ctx_size, torch.float16, layer_devices)

    @property
    def kv_slots(self) -> int:
        """Cache slots on the GPUs: one per sequence, or with the KV offload of waiting groups
        two groups' worth for the steps in turn and one for admissions (`group_kv_offload`)."""
        return self.max_batch if self.group_kv_offload is None else 3 * self.group_kv_offload

    @property
    def kv_cache_bytes(self) -> int:
        """The KV cache's size, known before the weights load (measured on the meta device)."""
        return self._kv_cache([torch.device("meta")] * self.config.n_layers).nbytes

    @property
    def residual_dtype(self) -> torch.dtype:
        """The dtype of the hidden state between layers and between stages."""
        return Transformer.residual_dtype

    def running(self):
        """Context of every forward pass: on CUDA the engine's compute streams, on the sim the
        costing of every operation (`Platform.running`)."""
        return self.platform.running()

    def step_timer(self):
        return self.platform.step_timer()

    def stage_device(self, stage: int) -> str:
        return self.plan.layers[self.plan.stages[stage][0]].device

    # --- one step -------------------------------------------------------------------------

    def _before_layer(self, layer: int, hidden: torch.Tensor):
        self.platform.enter_layer(layer, hidden)
        self.pm.hook.before_layer(engine=self, layer=layer)
        for answer in self.pm.hook.prefetch(engine=self, layer=layer):  # the deprecated alias
            if answer is not None:
                return answer
        return self.pm.hook.layer_weights(engine=self, layer=layer)

    def _forward(self, tokens, positions, slots, ctx_len: int, layers: range, **kw) -> torch.Tensor:
        """One forward pass over `layers`, signalled to the plugins (`begin_pass`)."""
        self.pm.hook.begin_pass(engine=self, layers=layers)
        return self.model.forward(tokens, positions, slots, ctx_len, layers=layers,
                                  before_layer=self._before_layer, **kw)

    def stage_layers(self, stage: int) -> range:
        layers = self.plan.stages[stage]
        return range(layers[0], layers[-1] + 1)

    def eager_stage_step(self, stage: int, batch: StepBatch, hidden: torch.Tensor | None):
        """The core's decode: the stage's layers run eagerly; logits [B, vocab] from the last."""
        out = self._forward(batch.tokens[:, None], batch.positions[:, None], batch.slots,
                            batch.ctx_len, self.stage_layers(stage), hidden=hidden)
        return out[:, -1] if stage == len(self.plan.stages) - 1 else out

    def decode_step(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, vocab] of one decode step for every sequence in `batch`. Under torchrun
        the whole batch passes the stage processes in order (no `schedule` or `decode` hook)."""
        if self.stage_group:
            with self.running():
                return self._all_layers(batch.tokens[:, None], batch.positions[:, None], batch.slots,
                                        batch.ctx_len)[:, -1]
        schedule = self.pm.hook.schedule(engine=self, batch=batch)
        outputs: dict[int, torch.Tensor] = {}
        with self.running():
            for tick in schedule.ticks:
                for stage, m in tick:
                    outputs[m] = self.decode_stage(stage, schedule.micro_batches[m], outputs.get(m))
            return torch.cat([outputs[m].to(self.device) for m in range(len(schedule.micro_batches))])

    def decode_stage(self, stage: int, batch: StepBatch, hidden: torch.Tensor | None):
        """One stage's decode step for one micro-batch, inside `running()`: the platform enters
        the stage (the hidden state moves to its GPU), then the `decode` hooks answer."""
        hidden = self.platform.enter_stage(stage, hidden)
        return self.pm.hook.decode(engine=self, stage=stage, batch=batch, hidden=hidden)

    def prefill(self, prompts: list[list[int]], slots: list[int], all_logits: bool = False):
        """Run whole prompts (right-padded into one batch) into their cache slots.

        Returns the logits of each prompt's last token [B, vocab], or of every position
        [B, T, vocab] with `all_logits`. Padding writes past a prompt's end are harmless:
        later positions are masked until a decode step overwrites them.
        """
        length = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), length, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = torch.tensor(p)
        dev = self.plan.embedding_device
        positions = torch.arange(length).expand(len(prompts), length).to(dev)
        last = None if all_logits else torch.tensor([len(p) - 1 for p in prompts], device=dev)
        with self.running():
            out = self._all_layers(tokens.to(dev), positions, torch.tensor(slots, device=dev), length, last)
            return out if all_logits else out[:, 0]

    def _all_layers(self, tokens, positions, slots, ctx_len: int, logits_index=None) -> torch.Tensor:
        """A forward pass through every layer, to the logits: in this process, or across the
        stage processes, announced by rank 0 (`stage_group`)."""
        if not self.stage_group:
            return self._forward(tokens, positions, slots, ctx_len, range(self.config.n_layers),
                                 logits_index=logits_index)
        p = StagePass(positions, slots, ctx_len, logits_index)
        self.stage_group.begin(p)
        return self._own_stage(p, tokens)

    def _own_stage(self, p: StagePass, tokens=None) -> torch.Tensor | None:
        """This process's stage of pass `p`: the hidden state from the stage before (on rank 0
        the embedding of `tokens`) through its layers, the output on to the next stage. Rank 0
        returns the logits the last stage sends back."""
        group, p = self.stage_group, p.on(self.device)
        hidden = None if group.first else group.receive_hidden(p.hidden_shape(self.config.n_embd),
                                                               self.residual_dtype)
        out = self._forward(tokens, p.positions, p.slots, p.ctx_len, self.stage_layers(group.rank),
                            hidden=hidden, logits_index=p.logits_index)
        group.pass_on(out)
        return group.receive_logits(p.logits_shape(self.config.vocab_size)) if group.first else None

    # --- stage processes (torchrun) -------------------------------------------------------------

    def serve_stage(self) -> None:
        """Ranks above 0: run this process's stage of every pass rank 0 announces, until rank 0
        calls `stop_stages`."""
        while (p := self.stage_group.next_pass()) is not None:
            with self.running():
                self._own_stage(p)
        self.stage_group.leave()

    def stop_stages(self) -> None:
        """Rank 0: end the other ranks' `serve_stage`."""
        if self.stage_group and self.stage_group.first:
            self.stage_group.stop()
            self.stage_group.leave()

    # --- generation ----------------------------------------------------------------------

    def sequence_groups(self) -> int:
        """Groups of sequences the `schedule` hook asks to keep in flight across steps (1: one
        batch, each step through every stage before the next). Asked once, with a one-row
        step of the padding slot."""
        if not hasattr(self, "_sequence_groups"):
            dev = self.plan.embedding_device
            probe = StepBatch(torch.zeros(1, dtype=torch.long, device=dev), torch.zeros(1, dtype=torch.long, device=dev),
                              torch.full((1,), self.pad_slot, dtype=torch.long, device=dev), 1)
            self._sequence_groups = max(1, self.pm.hook.schedule(engine=self, batch=probe).groups)
        return self._sequence_groups

    def generate(self, requests):
        """`ContinuousBatcher.generate`; with several groups in flight (`sequence_groups`), the
        groups' steps overlap across the pipeline stages (`group_batching`)."""
        groups = self.sequence_groups()
        if groups > 1:
            return generate_in_groups(self, requests, groups)
        return super().generate(requests)

    def group_step_batch(self, reqs: list[Request]) -> StepBatch:
        """The step of one group of sequences, padded to its shape like a whole batch's."""
        return self._step_batch(reqs)

    def prefill_logits(self, admitted: list[Request]) -> torch.Tensor:
        return self.prefill([r.prompt_tokens for r in admitted], [r.slot for r in admitted])

    def decode_logits(self, active: list[Request]) -> torch.Tensor:
        return self.decode_step(self._step_batch(active))[: len(active)]

    def _step_batch(self, active: list[Request]) -> StepBatch:
        """The step of `active`, padded to its shape: extra rows write to the scratch slot."""
        positions = [r.position for r in active]
        dev = self.plan.embedding_device
        exact = StepBatch(tokens=torch.tensor([r.generated[-1] for r in active], device=dev),
                          positions=torch.tensor(positions, device=dev),
                          slots=torch.tensor([r.slot for r in active], device=dev),
                          ctx_len=max(positions) + 1)
        if not self.pad_steps:
            return exact
        return exact.padded(*self.shapes.pick(len(exact), exact.ctx_len), self.pad_slot)
