"""Before/after: two evaluation reports side by side — Markdown table, bar chart PNG, examples."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from mmedagent.evaluation.scoring import RATE_METRICS, SUMMARY_METRICS, _fmt, metric_label


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read evaluation report {path}: {e}") from None
    if not isinstance(report, dict) or "overall" not in report:
        raise ValueError(f"{path} is not an evaluation report (no 'overall'); write one with --json-out")
    return report


def _name(report: dict[str, Any], fallback: str) -> str:
    return str(report.get("name") or report.get("model") or fallback)


def compare_table(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> str:
    """Overall metrics of both reports plus the per-task tool-selection accuracy, with B − A."""
    rows: list[tuple[str, Any, Any]] = [
        (m, a["overall"].get(m), b["overall"].get(m)) for m in SUMMARY_METRICS
        if a["overall"].get(m) is not None or b["overall"].get(m) is not None
    ]
    for task in sorted(set(a.get("per_task", {})) | set(b.get("per_task", {}))):
        va = a.get("per_task", {}).get(task, {}).get("tool_selection_accuracy")
        vb = b.get("per_task", {}).get(task, {}).get("tool_selection_accuracy")
        if va is not None or vb is not None:
            rows.append((f"tool_selection_accuracy [{task}]", va, vb))
    lines = [f"| metric | {names[0]} | {names[1]} | Δ |", "|---|---|---|---|"]
    ks = {r["overall"].get("k") for r in (a, b) if r["overall"].get("rag_recall_at_k") is not None}
    k = next(iter(ks)) if len(ks) == 1 else "k"  # runs with two k are not like for like (see unlike)
    for m, va, vb in rows:
        delta = f"{vb - va:+.3f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else "–"
        lines.append(f"| {metric_label(m, k)} | {_fmt(va)} | {_fmt(vb)} | {delta} |")
    return "\n".join(lines)


def bar_chart(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], out: str | Path) -> Path:
    """Grouped bars of the [0, 1] metrics both reports have; written as PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in RATE_METRICS if a["overall"].get(m) is not None and b["overall"].get(m) is not None]
    if not metrics:
        raise ValueError("the two reports share no [0, 1] metric to chart")
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(metrics) + 2), 4))
    ax.bar(x - 0.2, [a["overall"][m] for m in metrics], 0.4, label=names[0])
    ax.bar(x + 0.2, [b["overall"][m] for m in metrics], 0.4, label=names[1])
    ax.set_xticks(x, metrics, rotation=35, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _keyed(report: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """A report's samples keyed by (id, how many earlier samples share it): samples sharing an id
    pair in order of appearance instead of collapsing into one."""
    seen: Counter[str] = Counter()
    out = {}
    for s in report.get("samples", []):
        out[(s["id"], seen[s["id"]])] = s
        seen[s["id"]] += 1
    return out


def examples(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str], n: int = 3) -> str:
    """A few questions both reports answered, differing answers first."""
    keyed_b = _keyed(b)
    common = [(s, keyed_b[key]) for key, s in _keyed(a).items() if key in keyed_b]
    common.sort(key=lambda p: p[0]["answer"] == p[1]["answer"])
    parts = []
    for sa, sb in common[:n]:
        parts.append(
            f"**{sa['task']} / {sa['id']}** — {sa['question']}\n\n"
            f"- gold: {sa.get('gold_answer') or '–'} (tools: {', '.join(sa.get('gold_calls') or []) or '–'})\n"
            f"- {names[0]}: {sa['answer'] or '–'} (tools: {', '.join(sa['calls']) or '–'})\n"
            f"- {names[1]}: {sb['answer'] or '–'} (tools: {', '.join(sb['calls']) or '–'})"
        )
    return "\n\n".join(parts)


def unlike(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """How two reports differ in what they measured (data file, samples, tool mode, the planner's system prompt
    or chat template): their deltas are then not a before/after of the same evaluation."""
    # the data file's content decides where both reports record it: one file under two paths is the same
    # data, and a file changed between the runs (a corrected gold answer) is not
    by_content = bool(a.get("data_sha256") and b.get("data_sha256"))
    out = [f"data: {a.get('data')} vs {b.get('data')}{' (other content)' if by_content else ''}"
           for key in ("data_sha256" if by_content else "data",)
           if a.get(key) is not None and b.get(key) is not None and a.get(key) != b.get(key)]
    out += [f"{key}: {a.get(key)} vs {b.get(key)}" for key in ("n_samples", "tool_mode", "system_prompt", "template")
            if a.get(key) is not None and b.get(key) is not None and a.get(key) != b.get(key)]
    ka, kb = (r["overall"].get("k") if r["overall"].get("rag_recall_at_k") is not None else None for r in (a, b))
    if ka is not None and kb is not None and ka != kb:
        out.append(f"RAG recall at k {ka} vs {kb}")
    ids_a, ids_b = (set(_keyed(r)) for r in (a, b))
    if ids_a and ids_b and ids_a != ids_b:
        out.append(f"samples: {len(ids_a & ids_b)} in common, {len(ids_a - ids_b)} only in A, {len(ids_b - ids_a)} only in B")
    return out


def compare(path_a: str | Path, path_b: str | Path, out_dir: str | Path, n_examples: int = 3) -> tuple[str, Path]:
    """Write ``compare.md`` and ``compare.png`` to ``out_dir``; returns the Markdown and the PNG path."""
    a, b = load_report(path_a), load_report(path_b)
    names = (_name(a, "A"), _name(b, "B"))
    if names[0] == names[1]:
        names = (f"A: {names[0]}", f"B: {names[1]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = bar_chart(a, b, names, out_dir / "compare.png")
    caveats = unlike(a, b)
    warning = (f"> ⚠️ **Not like for like** — the runs measured different things ({'; '.join(caveats)}); "
               "the deltas below mix model changes with data changes.\n\n") if caveats else ""
    md = (
        f"## {names[0]} vs {names[1]}\n\n{warning}{compare_table(a, b, names)}\n\n![metrics]({png.name})\n\n"
        f"### Examples\n\n{examples(a, b, names, n_examples)}\n"
    )
    (out_dir / "compare.md").write_text(md, encoding="utf-8")
    return md, png
