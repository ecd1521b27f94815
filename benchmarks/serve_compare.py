"""`pipellm serve` against llama.cpp's llama-server on the same GGUF, through serve_bench.py's
streaming clients: for each number of clients, each server is started with that many slots
(`-np`; or once for all with `--slots`), waited for (`/health`), measured and stopped. pipellm
runs with `--plugins graphs` and every graph captured before the first request
(`--graphs-capture all`) on CUDA; llama-server with every layer on the GPU there, and
otherwise its defaults. Both get `--ctx-size` tokens of context per slot. The JSON and
markdown are written again after every row.

    python benchmarks/serve_compare.py -m model.gguf --llama-server build/bin/llama-server \\
        --device cuda --clients 1,8,32,64 --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (add_load_options, load_parameters, markdown_rows, parse_clients,  # noqa: E402
                         run_clients, write_outputs)

HOST = "127.0.0.1"


def pipellm_command(args, port: int, slots: int) -> list[str]:
    cmd = [sys.executable, "-m", "pipellm_core.frontends.cli", "serve", "-m", args.model, "--host", HOST,
           "--port", str(port), "-np", str(slots), "-c", str(args.ctx_size), "--device", args.device,
           "--plugins", args.plugins, "--no-progress"]
    if "graphs" in args.plugins.split(",") and args.device == "cuda":
        cmd += ["--graphs-capture", "all"]
    return cmd + shlex.split(args.pipellm_args)


def llama_server_command(args, port: int, slots: int) -> list[str]:
    cmd = [args.llama_server, "-m", args.model, "--host", HOST, "--port", str(port), "-np", str(slots),
           "-c", str(args.ctx_size * slots)]
    if args.device == "cuda":
        cmd += ["-ngl", "999"]
    return cmd + shlex.split(args.llama_server_args)


def wait_ready(process: subprocess.Popen, port: int, timeout: float, log_path: str | None) -> float:
    """Seconds until GET /health answers 200; an error if the server exits or `timeout` passes."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready"
                               + (f" (log: {log_path})" if log_path else ""))
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", required=True, help="GGUF file both servers load")
    parser.add_argument("--llama-server", metavar="PATH", help="llama-server binary (without it: pipellm alone)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where both run (default cuda)")
    parser.add_argument("--plugins", default="graphs", help="pipellm's plugins (default graphs)")
    parser.add_argument("--ctx-size", type=int, default=512, help="context per slot, in tokens (default 512)")
    parser.add_argument("--slots", type=int,
                        help="start each server once with this many slots for every number of clients "
                             "(default: as many slots as clients, one start for each number)")
    parser.add_argument("--port", type=int, default=8090,
                        help="first port; each server start takes the next one (default 8090)")
    parser.add_argument("--pipellm-args", default="",
                        help="more flags for `pipellm serve`, as one string (--pipellm-args='...')")
    parser.add_argument("--llama-server-args", default="",
                        help="more flags for llama-server, as one string (--llama-server-args='...')")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds a server may take to load (default 300)")
    parser.add_argument("--log", metavar="FILE", help="append the servers' output here (default: discarded)")
    add_load_options(parser)
    args = parser.parse_args()
    from pipellm_core.bench.report import device_name, git_commit

    servers = [("pipellm", pipellm_command)] + ([("llama-server", llama_server_command)] if args.llama_server else [])
    result = {"benchmark": "serve", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(), "device": device_name(args.device), "label": args.label or Path(args.model).name,
              "model_file": Path(args.model).name,
              "parameters": {**load_parameters(args), "ctx_per_slot": args.ctx_size, "pipellm_plugins": args.plugins,
                             "pipellm_args": args.pipellm_args, "llama_server_args": args.llama_server_args},
              "rows": []}
    counts = parse_clients(args.clients)
    if args.slots and max(counts) > args.slots:
        parser.error(f"--slots {args.slots} is fewer than {max(counts)} clients")
    # (slots, the client counts one start of each server serves)
    starts = [(args.slots, counts)] if args.slots else [(n, [n]) for n in counts]
    log = open(args.log, "a") if args.log else subprocess.DEVNULL
    port = args.port
    print("\n".join(markdown_rows([])), flush=True)
    for slots, clients_of_start in starts:
        for name, command in servers:
            cmd = command(args, port, slots)
            if args.log:
                log.write(f"\n=== {name}, {slots} slots: {shlex.join(cmd)}\n")
                log.flush()
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                ready_s = wait_ready(process, port, args.ready_timeout, args.log)
                for clients in clients_of_start:
                    row = run_clients(f"http://{HOST}:{port}/v1", clients, requests=args.requests,
                                      prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                                      warmup_tokens=args.warmup_tokens, seed=args.seed)
                    result["rows"].append({"server": name, "slots": slots, "ready_s": round(ready_s, 1), **row})
                    print(markdown_rows(result["rows"][-1:])[-1], flush=True)
                    write_outputs(result, args.json, args.markdown)
            except RuntimeError as e:  # the row says so and the other servers still run
                result["rows"].append({"server": name, "slots": slots, "clients": clients_of_start[0], "error": str(e)})
                print(markdown_rows(result["rows"][-1:])[-1], flush=True)
                write_outputs(result, args.json, args.markdown)
            finally:
                stop(process)
            port += 1
    if args.log:
        log.close()

if __name__ == "__main__":
    main()
