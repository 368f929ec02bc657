"""Load benchmark of the serving stack on loopback.

Starts ``python serve/controller.py`` (tiny random planner, one ``bright_region`` tool worker — a
weightless tool from the test fixtures, so the figures measure serving rather than a model) unless
``--url`` points at a running loopback stack, then:

1. ``--chats`` chats (default 32) through ``/v1/chat/completions``, all at once (``--concurrency``,
   default = chats): throughput, p50/p99 latency, errors;
2. ``--tool-calls`` tool calls (default 200) through ``/v1/tools/{tool}``: the controller's added
   overhead per call = the dispatcher's round trip minus the worker's own time (PNG encode, HTTP hop,
   JSON, registry lookup); goal ≤ 5 ms p50.

    python scripts/bench_serve.py            # prints two summary lines and a JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402

from _serve_fixtures import ServeProcess, data_url, sample_png, serve_env  # noqa: E402
from mmedagent.argtypes import at_least  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def run_chats(client: httpx.Client, n: int, concurrency: int, image: str, max_tokens: int, deadline: float) -> dict:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": "Where is the bright region?"}]}],
            "max_tokens": max_tokens}
    latencies, errors = [], []
    lock = threading.Lock()

    def one(_):
        if time.monotonic() > deadline:
            with lock:
                errors.append("skipped: time budget spent")
            return
        t0 = time.monotonic()
        try:
            r = client.post("/v1/chat/completions", json=body)
            ok = r.status_code == 200
            err = None if ok else f"{r.status_code}: {r.text[:120]}"
        except httpx.HTTPError as e:
            ok, err = False, type(e).__name__
        with lock:
            (latencies.append(time.monotonic() - t0) if ok else errors.append(err))

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.monotonic() - t0
    return {"chats": n, "concurrency": concurrency, "ok": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "throughput_per_s": len(latencies) / wall, "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99)}


def run_tool_calls(client: httpx.Client, n: int, tool: str, image: str, deadline: float) -> dict:
    overhead, total, errors = [], [], 0
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        t0 = time.monotonic()
        r = client.post(f"/v1/tools/{tool}", json={"params": {}, "image": image})
        if r.status_code != 200:
            errors += 1
            continue
        out = r.json()
        total.append(time.monotonic() - t0)
        overhead.append(out["elapsed_s"] - (out["worker_elapsed_s"] or 0.0))
    ms = 1000.0
    return {"tool_calls": len(total), "errors": errors, "overhead_p50_ms": pct(overhead, 50) * ms,
            "overhead_p99_ms": pct(overhead, 99) * ms, "client_p50_ms": pct(total, 50) * ms, "client_p99_ms": pct(total, 99) * ms}


def start_stack(tool: str, connections: int) -> tuple[ServeProcess, str]:
    """A controller with the tiny planner and one worker for ``tool``, taking ``connections`` client connections
    besides its workers' heartbeats, and its URL; one ``error:`` line if it does not come up."""
    log = Path(tempfile.gettempdir()) / f"bench_serve_{int(time.time())}.log"
    proc = ServeProcess("controller.py", ["--no-web", "--port", "0", "--tools", tool, "--plugin", "_serve_fixtures",
                                          "--max-connections", str(connections + 64)], log, serve_env())
    try:
        url = proc.wait_for(r"controller: (http://\S+)", 60).group(1)
        proc.wait_for(r"^ready: models: \S+", 300)
    except AssertionError:
        proc.stop()
        last = next((line.strip() for line in reversed(proc.lines) if line.strip()), "no output")
        print(f"error: the serving stack did not start: {last} (its log: {log})", file=sys.stderr)
        raise SystemExit(1)
    return proc, url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running controller on loopback (default: start one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--chats", type=at_least(1), default=32)
    p.add_argument("--concurrency", type=at_least(1), default=None, help="chats at once (default: --chats, at most 256)")
    p.add_argument("--max-tokens", type=at_least(1), default=16)
    p.add_argument("--tool-calls", type=at_least(0), default=200)
    p.add_argument("--tool", default="bright_region")
    p.add_argument("--image-size", type=at_least(1), default=224)
    p.add_argument("--max-seconds", type=float, default=600, help="time budget for the whole run")
    args = p.parse_args()
    if args.chats > 1024 or (args.concurrency or 1) > 256:
        p.error("--chats must be 1..1024 and --concurrency 1..256")
    if not args.max_seconds > 0:
        p.error("--max-seconds must be more than 0")
    if args.url is not None and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("the benchmark runs against loopback only")
    args.concurrency = args.concurrency or min(args.chats, 256)
    deadline = time.monotonic() + args.max_seconds
    proc, url = start_stack(args.tool, args.concurrency) if args.url is None else (None, args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=url, headers=headers, timeout=300, trust_env=False,
                          limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
    image = data_url(sample_png((args.image_size, args.image_size)))
    try:
        try:  # warm-up: a controller that is not there, refuses the key or lacks the tool is one line
            r = client.post(f"/v1/tools/{args.tool}", json={"params": {}, "image": image})
        except httpx.HTTPError as e:
            print(f"error: no controller answers at {url}: {e}", file=sys.stderr)
            return 1
        if r.status_code != 200:
            body = " ".join(r.text.split())[:200]
            print(f"error: the warm-up call to /v1/tools/{args.tool} at {url} failed: {r.status_code} {body}",
                  file=sys.stderr)
            return 1
        tools = run_tool_calls(client, args.tool_calls, args.tool, image, deadline)
        chats = run_chats(client, args.chats, args.concurrency, image, args.max_tokens, deadline)
    finally:
        client.close()
        if proc is not None:
            proc.stop()
    print(f"chats: {chats['ok']}/{chats['chats']} ok at concurrency {chats['concurrency']}, {chats['errors']} errors; "
          f"{chats['throughput_per_s']:.2f} chats/s; latency p50 {chats['p50_s']:.2f} s, p99 {chats['p99_s']:.2f} s")
    print(f"tool calls: {tools['tool_calls']} ok, {tools['errors']} errors; controller overhead p50 {tools['overhead_p50_ms']:.2f} ms, "
          f"p99 {tools['overhead_p99_ms']:.2f} ms; client round trip p50 {tools['client_p50_ms']:.2f} ms")
    print(json.dumps({"chats": chats, "tools": tools}))
    ok = chats["errors"] == 0 and tools["errors"] == 0
    if proc is not None and ok:
        proc.log_path.unlink(missing_ok=True)  # kept only when something went wrong
    elif proc is not None:
        print(f"the serving stack's log: {proc.log_path}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
