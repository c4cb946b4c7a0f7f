"""The model judges' scores of sampled responses: a reward and a cost model score every (prompt, response) row,
cached per policy so that a re-run of a comparison scores only what changed.

The cache (`cache_dir/<policy>.json`) is keyed by the score models' files (path, sizes, mtimes), `max_length` and
a hash of the texts; a score model is loaded only when something must be scored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safealign.io import atomic_write_json
from safealign.models.presets import resolve_device
from safealign.models.score_model import load_score_model, score_texts
from safealign.models.tokenizer import load_tokenizer


def _files_signature(model_dir: str) -> dict[str, Any]:
    """What identifies a score model's weights without reading them: its path and its files' sizes and mtimes."""
    path = Path(model_dir).resolve()
    return {"path": str(path), "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns]
                                         for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")}}


def _responses_hash(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["prompt"], row["response"]]).encode("utf-8"))
    return digest.hexdigest()


def score_samples(samples_by_model: dict[str, list[dict[str, Any]]], reward_model: str, cost_model: str,
                  cache_dir: Path, max_length: int = 256, batch_size: int = 64, device: str = "auto",
                  ) -> dict[str, dict[str, list[float] | None]]:
    """{model: {"reward": [...], "cost": [...]}} for every row (None for a score model not given).

    Each model's scores are cached in `cache_dir/<model>.json`; a cached stream is reused when the score
    model's files, max_length and the (prompt, response) texts are unchanged. What is left is scored once per
    distinct (prompt, response) over all models (policies repeat answers: a refusal, a mode they collapsed to), and
    a score model loads only when something must be scored.
    """
    streams = {kind: path for kind, path in (("reward", reward_model), ("cost", cost_model)) if path}
    signatures = {kind: _files_signature(path) for kind, path in streams.items()}
    entries: dict[str, dict[str, Any]] = {}
    missing: dict[str, list[str]] = {kind: [] for kind in streams}  # kind -> models whose scores must be computed
    for name, rows in samples_by_model.items():
        cache_file = cache_dir / f"{name}.json"
        cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        key = {"max_length": max_length, "responses_sha256": _responses_hash(rows)}
        entries[name] = {**key, "reward": None, "cost": None, "reward_model": None, "cost_model": None, "cached": cached}
        for kind in streams:
            old = cached.get(kind)
            if (old is not None and cached.get(f"{kind}_model") == signatures[kind]
                    and all(cached.get(k) == v for k, v in key.items()) and len(old) == len(rows)):
                entries[name][kind] = old
            else:
                missing[kind].append(name)
            entries[name][f"{kind}_model"] = signatures[kind]
    for kind, names in missing.items():
        if not names:
            continue
        texts = list(dict.fromkeys((r["prompt"], r["response"]) for name in names for r in samples_by_model[name]))
        model, tokenizer = load_score_model(streams[kind]).to(resolve_device(device)), load_tokenizer(streams[kind])
        scored = dict(zip(texts, score_texts(model, tokenizer, [p for p, _ in texts], [r for _, r in texts],
                                             max_length, batch_size)))
        for name in names:
            entries[name][kind] = [scored[(r["prompt"], r["response"])] for r in samples_by_model[name]]
    scores: dict[str, dict[str, list[float] | None]] = {}
    for name, entry in entries.items():
        cached = entry.pop("cached")
        if entry != cached:
            atomic_write_json(cache_dir / f"{name}.json", entry)
        scores[name] = {"reward": entry["reward"], "cost": entry["cost"]}
    return scores


def with_scores(rows: list[dict[str, Any]], scores: dict[str, list[float] | None]) -> list[dict[str, Any]]:
    merged = []
    for k, row in enumerate(rows):
        extra = {kind: values[k] for kind, values in scores.items() if values is not None}
        merged.append({**row, **extra})
    return merged
