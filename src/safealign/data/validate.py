"""`safealign data validate`: a data source validated completely and summarised (rows, kinds, labels, categories)."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from safealign.data.loading import (
    MAX_REPORTED_ROWS,
    OnContradiction,
    PreferenceDataset,
    preferences_from_rows,
    prompts_from_rows,
    rows_of_kind,
    sft_example,
)
from safealign.data.schema import SEVERITY_LEVELS


def validate_file(path: str | os.PathLike, kind: str = "auto", on_contradiction: OnContradiction = "skip") -> dict:
    """Validate a data source completely and summarise it (JSON-serialisable). Raises DataError."""
    rows, kind = rows_of_kind(path, None, kind)
    summary: dict[str, Any] = {"path": rows.source, "format": rows.format, "kind": kind, "rows": len(rows)}
    if kind == "preference":
        summary.update(_preference_summary(preferences_from_rows(rows, on_contradiction), on_contradiction))
    elif kind == "sft":
        examples = [sft_example(rows, index) for index in range(len(rows))]
        summary.update(valid_rows=len(examples), chat_rows=sum("messages" in row for row in rows),
                       with_system_prompt=sum(e.system is not None for e in examples),
                       unique_prompts=len({e.prompt for e in examples}))
    else:
        prompts = prompts_from_rows(rows, kind)
        summary.update(valid_rows=len(rows), unique_prompts=len(prompts))
        kinds = Counter(p.kind for p in prompts if p.kind is not None)
        if kinds:
            summary["prompt_kinds"] = dict(kinds.most_common())
        categories = Counter(p.category for p in prompts if p.category is not None)
        if categories:
            summary["prompt_categories"] = dict(categories.most_common())
    return summary


def _preference_summary(dataset: PreferenceDataset, on_contradiction: str) -> dict:
    records = dataset.records
    safe = sum(r.is_response_0_safe + r.is_response_1_safe for r in records)
    both_safe = sum(r.is_response_0_safe and r.is_response_1_safe for r in records)
    both_unsafe = sum(not r.is_response_0_safe and not r.is_response_1_safe for r in records)
    categories: Counter[str] = Counter()
    severities: Counter[str] = Counter()
    for r in records:
        for index in (0, 1):
            if not r.is_safe(index):
                harm = r.response_1_harm_category if index else r.response_0_harm_category
                categories.update(c for c, flagged in harm.items() if flagged)
            severity = r.response_1_severity_level if index else r.response_0_severity_level
            severities["unlabelled" if severity is None else str(severity)] += 1
    summary = {
        "valid_rows": len(records),
        "contradictory": {"count": dataset.num_contradictory_skipped, "action": on_contradiction,
                          "first_rows": dataset.contradictory_rows[:MAX_REPORTED_ROWS]},
        "responses": {"safe": safe, "unsafe": 2 * len(records) - safe},
        "pairs": {"both_safe": both_safe, "both_unsafe": both_unsafe,
                  "one_safe": len(records) - both_safe - both_unsafe},
        # How often the more helpful response is also the more harmless one (the paper's tension: low).
        "better_is_safer_rate": (round(sum(r.better_response_id == r.safer_response_id for r in records)
                                       / len(records), 4) if records else None),
        "unsafe_by_category": dict(categories.most_common()),
        "severity_levels": {key: severities[key] for key in [*map(str, SEVERITY_LEVELS), "unlabelled"]},
    }
    # SafeWorld writes `prompt_kind`; other files may say `kind`.
    kinds = Counter(kind for r in records
                    if isinstance(kind := r.extra.get("prompt_kind", r.extra.get("kind")), str))
    if kinds:
        summary["prompt_kinds"] = dict(kinds.most_common())
    return summary
