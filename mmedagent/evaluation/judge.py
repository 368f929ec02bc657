"""Optional LLM-as-judge through any OpenAI-compatible chat endpoint (never required).

The judge sees the question, the reference (gold answer, else MMedAgent's ``fig_caption``, else
the gold report of a report-generation sample) and the answer, and replies with a score from 1 to
10; samples without a reference are not judged. A sample that ended in an error scores the lowest
grade, 1, without a call (it scores as wrong in every metric); when every call fails (the judge is
unreachable or refuses the key) nothing is judged. The endpoint is called through serving's
:class:`mmedagent.serve.remote.OpenAIPlanner`; the key is the caller's (the CLI's ``--judge-key-env``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from mmedagent.evaluation.readers import EvalSample
from mmedagent.evaluation.runner import SampleResult
from mmedagent.evaluation.scoring import reference_answer
from mmedagent.serve.remote import OpenAIPlanner, WorkerError, api_root

PROMPT = (
    "You grade answers of a medical imaging assistant. Compare the answer with the reference and "
    "reply with one integer from 1 (wrong or unhelpful) to 10 (correct and complete), nothing else.\n\n"
    "Question: {question}\nReference: {reference}\nAnswer: {answer}\nScore:"
)
LOWEST = 1.0
_NUMBER = r"(?<![\d.])(10(?:\.0+)?|[1-9](?:\.\d+)?)(?![\d.]*\d)"
_OUT_OF_TEN = re.compile(_NUMBER + r"\s*(?:/|out of)\s*10\b", re.IGNORECASE)
_LEADING = re.compile(r"^\W*(?:(?:score|rating|grade)\W*)?" + _NUMBER + r"(?!\s*(?:/|out of|to|-)\s*\d)", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """The grade of a judge's reply: ``N/10`` or ``N out of 10`` anywhere, else a number from 1 to 10
    the reply opens with (``8``, ``**8**``, ``Score: 8``); ``None`` for any other reply (a number
    elsewhere in it, such as the ``1`` of "on a scale of 1 to 10" or a quoted box, is no grade)."""
    m = _OUT_OF_TEN.search(text) or _LEADING.search(text)
    return float(m.group(1)) if m else None


def judge(samples: Sequence[EvalSample], results: Sequence[SampleResult], url: str, model: str | None = None,
          api_key: str = "") -> list[float | None]:
    """One 1–10 score per sample (1 for a sample that ended in an error; ``None`` where there is no
    reference, no score in the reply, or the judge endpoint failed: a failure is reported on stderr
    and never loses the evaluation). ``url``: the judge's host root, ``.../v1`` or ``.../v1/chat/completions``."""
    client = OpenAIPlanner(api_root(url), model, api_key, list_models=False)
    scores: list[float | None] = []
    failures: list[str] = []
    unparsed = replies = 0
    try:
        for smp, r in zip(samples, results):
            reference = smp.gold_answer or smp.reference.get("fig_caption") or reference_answer(smp)
            if not reference:
                scores.append(None)
                continue
            if r.error:
                scores.append(LOWEST)
                continue
            prompt = PROMPT.format(question=smp.question, reference=reference, answer=r.answer)
            try:
                reply = client.generate([{"role": "user", "content": prompt}], None, temperature=0.0, max_new_tokens=8)
            except (WorkerError, ValueError, LookupError, TypeError, AttributeError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                scores.append(None)
                continue
            replies += 1
            scores.append(parse_score(reply))
            unparsed += scores[-1] is None
    finally:
        client.client.close()
    if failures and not replies:  # never reached: the failed samples' lowest grades alone are no judge score
        print(f"warning: the judge failed on all {len(failures)} samples it was asked about, so nothing is judged; "
              f"first: {failures[0]}", file=sys.stderr)
        return [None] * len(scores)
    if failures:
        print(f"warning: the judge failed on {len(failures)} samples (not judged); first: {failures[0]}", file=sys.stderr)
    if unparsed:
        print(f"warning: {unparsed} judge replies held no grade from 1 to 10 (not judged): is --judge-url a model "
              "that follows instructions?", file=sys.stderr)
    return scores
