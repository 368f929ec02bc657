"""Evaluation harness: tool-use and answer metrics, readers for evaluation files, the runner
(local planner or OpenAI-compatible endpoint, live or gold tool outputs), per-sample results on disk
(resumable runs, predictions made elsewhere) and before/after reports.

``python scripts/evaluate.py --model PATH_OR_URL --data FILE`` is the command-line entry.
"""
