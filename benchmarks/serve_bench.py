"""Streaming clients against an OpenAI-compatible server (`pipellm serve`, llama-server, ...).

For each number of clients N, N clients at once each send `--requests` completion requests one
after another: a prompt of `--prompt-tokens` random token ids (different for every request, so
no server reuses a cached prefix) and `--max-tokens` greedy tokens, streamed. After one
untimed round (every client one short request) the row reports requests/s and generated tok/s
(all clients together, over the wall time from the first request to the last answer) and the
time to first token (the first event that carries text), median and p99.

    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8080/v1 --clients 1,8,32,64 \\
        --json out.json --markdown out.md

Prompts go as token ids, so every server reads the same tokens. Requests ask to ignore the end
of generation (`ignore_eos`, which llama-server and `pipellm serve` read); the rows still give
the tokens each server actually generated (its `usage`, else one per event with text), and
tok/s counts those.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import math
import random
import statistics
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

# ids every vocabulary of the benchmark models has, past their special tokens
PROMPT_IDS = range(1000, 10000)


@dataclass
class RequestResult:
    ttft_s: float | None  # None: no event carried text
    tokens: int
    error: str | None = None


def stream_completion(base_url: str, body: dict, api_key: str | None = None, timeout: float = 600.0) -> RequestResult:
    """POST one streaming request to BASE_URL/completions and read its events to the end."""
    url = urllib.parse.urlsplit(base_url.rstrip("/") + "/completions")
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    first, text_events, usage = None, 0, None
    try:
        conn.request("POST", url.path, json.dumps({**body, "stream": True}), headers)
        response = conn.getresponse()
        if response.status != 200:
            return RequestResult(None, 0, f"HTTP {response.status}: {response.read(300).decode(errors='replace')}")
        for line in response:
            if not line.startswith(b"data:"):  # blank lines between events, keep-alive comments
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return RequestResult(None, 0, json.dumps(event["error"])[:300])
            if any(choice.get("text") for choice in event.get("choices") or []):
                text_events += 1
                if first is None:
                    first = time.perf_counter() - start
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens")
    except (OSError, http.client.HTTPException, ValueError) as e:
        return RequestResult(None, 0, f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    return RequestResult(first, usage if usage is not None else text_events)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of non-empty `values`."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_clients(base_url: str, clients: int, *, requests: int = 2, prompt_tokens: int = 128,
                max_tokens: int = 128, warmup_tokens: int = 8, model: str | None = None,
                api_key: str | None = None, seed: int = 0) -> dict:
    """One row: `clients` clients at once, each `requests` streamed requests in turn, after an
    untimed round of one request of `warmup_tokens` each."""
    rng = random.Random(seed * 1000003 + clients)

    def body(tokens: int) -> dict:
        b = {"prompt": [rng.choice(PROMPT_IDS) for _ in range(prompt_tokens)], "max_tokens": tokens,
             "temperature": 0.0, "ignore_eos": True}
        return {**b, "model": model} if model else b

    def round_of(bodies: list[list[dict]]) -> tuple[list[RequestResult], float]:
        results: list[list[RequestResult]] = [[] for _ in bodies]
        go = threading.Barrier(len(bodies) + 1)

        def client(i: int) -> None:
            go.wait()
            for b in bodies[i]:
                results[i].append(stream_completion(base_url, b, api_key))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
        for t in threads:
            t.start()
        go.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        return [r for rs in results for r in rs], time.perf_counter() - start

    warm, _ = round_of([[body(warmup_tokens)] for _ in range(clients)])
    timed, wall = round_of([[body(max_tokens) for _ in range(requests)] for _ in range(clients)])
    ok = [r for r in timed if r.error is None]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    generated = sum(r.tokens for r in ok)
    errors = [r.error for r in warm + timed if r.error is not None]
    return {
        "clients": clients, "requests": len(ok), "failed": len(timed) - len(ok), "wall_s": round(wall, 3),
        "requests_per_s": len(ok) / wall, "generated_tokens": generated,
        "tokens_per_request": generated / len(ok) if ok else 0.0, "gen_tok_s": generated / wall,
        "ttft_median_ms": statistics.median(ttft) if ttft else None,
        "ttft_p99_ms": percentile(ttft, 99) if ttft else None,
        "errors": errors[:3],
    }


def markdown_rows(rows: list[dict]) -> list[str]:
    def ms(v):
        return "-" if v is None else f"{v:.1f}"
    lines = ["| server | slots | clients | requests/s | generated tok/s | tokens/request | TTFT median ms "
             "| TTFT p99 ms | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('server', '-')} | {r.get('slots', '-')} | {r['clients']} | {r['error']} |")
            continue
        lines.append(f"| {r.get('server', '-')} | {r.get('slots', '-')} | {r['clients']} | {r['requests_per_s']:.2f} | "
                     f"{r['gen_tok_s']:.1f} | {r['tokens_per_request']:.1f} | {ms(r['ttft_median_ms'])} | "
                     f"{ms(r['ttft_p99_ms'])} | {r['failed']} |")
    return lines


def markdown_table(result: dict) -> str:
    p = result["parameters"]
    where = f" on {result['device']} (commit {result['commit']}, " if result.get("device") else " ("
    head = (f"{result['label']}{where}prompt {p['prompt_tokens']} tokens, {p['max_tokens']} greedy tokens "
            f"asked, {p['requests']} streamed requests per client)")
    return "\n".join([head, "", *markdown_rows(result["rows"])]) + "\n"


def write_outputs(result: dict, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(markdown_table(result))


def add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", default="1,8,32,64", help="numbers of concurrent clients (default 1,8,32,64)")
    parser.add_argument("--requests", type=int, default=2, help="timed requests per client (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--max-tokens", type=int, default=128, help="greedy tokens asked per request (default 128)")
    parser.add_argument("--warmup-tokens", type=int, default=8,
                        help="tokens asked by the untimed first round (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
    parser.add_argument("--label", help="what the table is of (default: the server's URL or the model file)")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the rows as a markdown table")


def load_parameters(args) -> dict:
    return {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "requests": args.requests,
            "warmup_tokens": args.warmup_tokens, "seed": args.seed, "greedy": True, "stream": True}


def parse_clients(text: str) -> list[int]:
    clients = [int(c) for c in text.split(",") if c.strip()]
    if not clients or min(clients) < 1:
        raise SystemExit(f"--clients: positive numbers, comma-separated, got {text!r}")
    return clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Rows of N concurrent streaming "
                                     "clients: requests/s, generated tok/s, time to first token.")
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1",
                        help="the server's OpenAI base URL (default http://127.0.0.1:8080/v1)")
    parser.add_argument("--model", help="the model field of requests (default: none)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    add_load_options(parser)
    args = parser.parse_args()
    result = {"benchmark": "serve", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "label": args.label or args.base_url, "base_url": args.base_url,
              "parameters": load_parameters(args), "rows": []}
    for n in parse_clients(args.clients):
        row = run_clients(args.base_url, n, requests=args.requests, prompt_tokens=args.prompt_tokens,
                          max_tokens=args.max_tokens, warmup_tokens=args.warmup_tokens, model=args.model,
                          api_key=args.api_key, seed=args.seed)
        result["rows"].append(row)
        print(markdown_rows([row])[-1], flush=True)
        write_outputs(result, args.json, args.markdown)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
