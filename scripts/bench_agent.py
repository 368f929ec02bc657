#!/usr/bin/env python
"""Agent-turn latency: plan → tool → answer, with KV-cache reuse vs the naive path, vs a lower bound.

    python scripts/bench_agent.py                       # tiny and CPU-sized LLaVA
    python scripts/bench_agent.py --presets cpu --repeats 5 --plan-tokens 48 --answer-tokens 48

A turn is what the agent loop does for a tool-using question: the planning call (image + question),
the tool (simulated: --tool-ms), the tool-result turn appended, and the answer call. The naive
path re-runs the vision tower and re-prefills the whole conversation for the answer (what
MMedAgent does); KV reuse prefills only the new tokens. Lower bound = one image prefill + decoding
every generated token + tool time. Decoding is fixed-length (EOS ignored) so both paths do the
same work; greedy outputs are checked identical. ``--prompt-lookup N`` adds prompt-lookup decoding
(exact under greedy decoding) to the reuse path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mmedagent  # noqa: F401  - arms the torchvision shim first
from mmedagent.argtypes import at_least


def one_turn(planner, image, question, plan_tokens, answer_tokens, tool_s):
    from mmedagent.protocol import DEFAULT_SYSTEM, ToolOutcome, render_tool_results

    msgs = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": f"<image>\n{question}"}]
    planner.reset()
    t0 = time.perf_counter()
    plan = planner.generate(msgs, image, max_new_tokens=plan_tokens)
    t_plan = time.perf_counter() - t0
    time.sleep(tool_s)
    outcome = ToolOutcome(tool="grounding dino", output={"boxes": [[0.41, 0.54, 0.76, 0.75]], "logits": [0.95],
                                                         "phrases": ["tumor"]})
    msgs += [{"role": "assistant", "content": plan}, {"role": "user", "content": render_tool_results([outcome], question)}]
    t1 = time.perf_counter()
    pieces, first = [], None
    for piece in planner.stream(msgs, image, max_new_tokens=answer_tokens):
        first = first if first is not None else time.perf_counter() - t1
        pieces.append(piece)
    answer = "".join(pieces).rstrip()
    t_answer = time.perf_counter() - t1
    return {"plan_s": t_plan, "answer_s": t_answer, "answer_ttft_s": first or t_answer, "turn_s": time.perf_counter() - t0,
            "reused": planner.last_stats["reused_tokens"], "prompt": planner.last_stats["prompt_tokens"],
            "text": (plan, answer)}


def bench(path: Path, label: str, repeats: int, plan_tokens: int, answer_tokens: int, tool_ms: float,
          dtype: str | None = None, prompt_lookup: int = 0) -> dict:
    from PIL import Image

    from mmedagent.model import load_planner

    image = Image.new("RGB", (300, 240), (40, 40, 40))
    for x in range(80, 160):
        for y in range(60, 140):
            image.putpixel((x, y), (200, 170, 60))
    question = "Can you locate the tumor in this MRI image?"
    tool_s = tool_ms / 1000
    results = {}
    for kv_reuse in (False, True):
        planner = load_planner(path, kv_reuse=kv_reuse, conv_template="vicuna_v1", dtype=dtype,
                               prompt_lookup=prompt_lookup if kv_reuse else 0)
        planner.eos_ids = set()  # fixed-length decoding: both paths do the same amount of work
        one_turn(planner, image, question, 4, 4, 0)  # warm-up
        runs = [one_turn(planner, image, question, plan_tokens, answer_tokens, tool_s) for _ in range(repeats)]
        results[kv_reuse] = runs
        if kv_reuse:
            # lower bound parts: one image prefill (a 1-token call on a fresh state) and the decode rate
            msgs = [{"role": "user", "content": f"<image>\n{question}"}]
            prefill = []
            for _ in range(repeats):
                planner.reset()
                t = time.perf_counter()
                planner.generate(msgs, image, max_new_tokens=1)
                prefill.append(time.perf_counter() - t)
            prefill_s = statistics.median(prefill)
            info = planner.info()
    med = {k: {m: statistics.median(r[m] for r in runs) for m in ("plan_s", "answer_s", "answer_ttft_s", "turn_s")}
           for k, runs in results.items()}
    same = all(a["text"] == b["text"] for a, b in zip(results[False], results[True]))
    per_token = max(med[True]["plan_s"] - prefill_s, 0.0) / max(plan_tokens - 1, 1)
    bound = prefill_s + per_token * (plan_tokens + answer_tokens - 1) + tool_s
    return {
        "label": label, "params_M": info["parameters"] / 1e6, "prompt_tokens": results[True][0]["prompt"],
        "reused_tokens": results[True][0]["reused"], "naive": med[False], "reuse": med[True], "prefill_s": prefill_s,
        "per_token_s": per_token, "bound_s": bound, "same_tokens": same,
    }


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    from mmedagent.model.tiny import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "cpu"], choices=list(PRESETS),
                    help="model sizes (mmedagent.model.tiny.PRESETS)")
    ap.add_argument("--model", action="append", default=[], help="an existing checkpoint to bench as well")
    ap.add_argument("--repeats", type=at_least(1), default=3)
    ap.add_argument("--plan-tokens", type=at_least(1), default=48)
    ap.add_argument("--answer-tokens", type=at_least(1), default=48)
    ap.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, ...); default: the loader's choice")
    ap.add_argument("--prompt-lookup", type=at_least(0), default=0,
                    help="draft tokens per step for prompt-lookup decoding on the reuse path (0: off)")
    ap.add_argument("--tool-ms", type=float, default=50.0, help="simulated tool latency")
    ap.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads")
    a = ap.parse_args()
    if a.tool_ms < 0:
        ap.error("argument --tool-ms: must be at least 0")

    from mmedagent.model.loading import ModelNotFoundError, load_config, resolve_dtype

    try:  # before any model is built or loaded
        resolve_dtype(a.dtype, "cpu")
        for m in a.model:
            load_config(m)
    except (ModelNotFoundError, ValueError) as e:
        fail(str(e))

    import torch

    from mmedagent.model.tiny import make_tiny_model

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = [(make_tiny_model("llava", Path(tmp) / p, preset=p), f"llava-{p}") for p in a.presets]
        targets += [(Path(m), Path(m).name) for m in a.model]
        for path, label in targets:
            rows.append(bench(path, label, a.repeats, a.plan_tokens, a.answer_tokens, a.tool_ms, a.dtype,
                              a.prompt_lookup))
    print(f"\nplan {a.plan_tokens} tokens, answer {a.answer_tokens} tokens, tool {a.tool_ms:.0f} ms, "
          f"median of {a.repeats}, torch threads {torch.get_num_threads()}, reuse path: KV reuse"
          + (f" + prompt lookup {a.prompt_lookup}" if a.prompt_lookup else ""))
    width = max(len("model"), *(len(r["label"]) for r in rows))
    head = (f"{'model':<{width}} {'params':>7} {'prompt':>6} {'reused':>6} | {'naive turn':>10} {'reuse turn':>10} "
            f"{'bound':>7} {'reuse/bound':>11} | {'naive ans':>9} {'reuse ans':>9} {'ans speedup':>11} | "
            f"{'naive 1st':>9} {'reuse 1st':>9} | same")
    print(head)
    print("-" * len(head))
    for r in rows:
        n, k = r["naive"], r["reuse"]
        print(f"{r['label']:<{width}} {r['params_M']:>6.1f}M {r['prompt_tokens']:>6} {r['reused_tokens']:>6} | "
              f"{n['turn_s']:>9.3f}s {k['turn_s']:>9.3f}s {r['bound_s']:>6.3f}s {k['turn_s'] / r['bound_s']:>10.2f}x | "
              f"{n['answer_s']:>8.3f}s {k['answer_s']:>8.3f}s {n['answer_s'] / k['answer_s']:>10.2f}x | "
              f"{n['answer_ttft_s']:>8.3f}s {k['answer_ttft_s']:>8.3f}s | {r['same_tokens']}")
    print("answer = the aggregation call after the tool result; 1st = its time to the first streamed text")


if __name__ == "__main__":
    main()
