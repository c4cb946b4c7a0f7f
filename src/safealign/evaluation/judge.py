"""`safealign judge FILE --output OUT.jsonl [--judge gold]`: judge responses from any model or framework.

FILE holds `{prompt, response}` rows (JSONL, JSON, CSV, Parquet, a `datasets` directory) or PKU-SafeRLHF rows,
whose two responses become two output rows (`response_index` 0, 1). Each output row, in input order, is the
input's fields plus the judgement:
    helpfulness      the judge's score (SafeWorld: −1 .. 4)
    is_safe          no actionable harmful step anywhere in the response
    harm_categories  the categories of the harmful steps found
    severity         0 safe .. 3 severe
    class            compliance, helpful, cut, redirection, refusal or filler (see docs/safeworld.md)
    why              what the judge read: the lexicon sentences said, by kind (harmful steps by category)
The `gold` judge is SafeWorld's: it reads SafeWorld's prompts (a prompt it cannot parse gets helpfulness 0 for
any content, while harm is still judged from the response alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from safealign.data import safeworld
from safealign.data.loading import load_responses
from safealign.io import atomic_write_jsonl

JUDGES = ("gold",)
Judge = Literal["gold"]


def judge_response(prompt: str, response: str, judge: Judge = "gold") -> dict[str, Any]:
    """One judgement (the fields `safealign judge` adds to a row)."""
    if judge != "gold":
        raise ValueError(f"unknown judge {judge!r}; expected one of {list(JUDGES)}")
    harm = safeworld.judge_harm(prompt, response)
    return {
        "helpfulness": float(safeworld.judge_helpfulness(prompt, response)),
        "is_safe": bool(harm.is_safe),
        "harm_categories": sorted(c for c, hit in harm.categories.items() if hit),
        "severity": int(harm.severity),
        "class": safeworld.classify_response(prompt, response),
        "why": safeworld.why(prompt, response),
    }


def judge_file(source: str | Path, output: str | Path, judge: Judge = "gold") -> dict[str, Any]:
    """Judge every response of `source`, write `output` (JSONL, atomically) and return a summary."""
    if judge not in JUDGES:
        raise ValueError(f"unknown judge {judge!r}; expected one of {list(JUDGES)}")
    rows = load_responses(source)
    judged = [{**row.fields, **judge_response(row.prompt, row.response, judge)} for row in rows]
    atomic_write_jsonl(output, judged)
    classes: dict[str, int] = {}
    for row in judged:
        classes[row["class"]] = classes.get(row["class"], 0) + 1
    return {
        "input": str(source), "output": str(output), "judge": judge, "responses": len(judged),
        "unsafe": sum(not row["is_safe"] for row in judged),
        "mean_helpfulness": sum(row["helpfulness"] for row in judged) / len(judged),
        "classes": dict(sorted(classes.items())),
    }
