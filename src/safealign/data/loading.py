"""Data loading and validation: files or `datasets` → typed records, every problem located.

Two layers:
1. `load_rows(source, split)` reads raw rows (dicts) from JSONL, JSON, Parquet, CSV/TSV, a directory saved
   by `datasets` (`save_to_disk`), or anything else `datasets.load_dataset` reads (a hub name, a folder of
   data files). It remembers the file name and each row's number (the line in JSONL/CSV, index + 1
   elsewhere) so that later errors can point at them.
2. `load_preferences`, `load_sft`, `load_prompts` validate rows into the record types of
   `safealign.data.schema` (`data.validate.validate_file` does the same and summarises the data). Every problem raises a
   `DataError` naming FILE, ROW and FIELD. Contradictory safety labels (docs/maths.md §1) are counted and skipped,
   or fatal with `on_contradiction="error"`.

Types are strict: a string is never read as a bool or an int, except in CSV/TSV files, where every cell is
text (`"True"`, `"false"`, `"1"`, `"0"` are read where the schema wants a bool or an int).
"""

from __future__ import annotations

import ast
import csv
import difflib
import io
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from safealign.data.schema import (
    KNOWN_HARM_CATEGORIES,
    PROMPT_KINDS,
    SEVERITY_LEVELS,
    DataError,
    DataFileNotFoundError,
    PreferenceRecord,
    PromptRecord,
    SFTExample,
)

Kind = Literal["preference", "sft", "prompt"]
OnContradiction = Literal["skip", "error"]

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
                ".csv": "csv", ".tsv": "tsv"}
JSON_LIST_KEYS = ("data", "train", "rows", "records", "examples")  # where a JSON object may keep its rows

PREFERENCE_REQUIRED = ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
                       "is_response_0_safe", "is_response_1_safe")
PREFERENCE_OPTIONAL = ("response_0_harm_category", "response_1_harm_category",
                       "response_0_severity_level", "response_1_severity_level")
PREFERENCE_FIELDS = frozenset(PREFERENCE_REQUIRED + PREFERENCE_OPTIONAL)
PROMPT_FIELDS = frozenset(("prompt", "kind", "category"))
SFT_FIELDS = frozenset(("prompt", "response", "messages"))
MAX_REPORTED_ROWS = 10  # contradictory row numbers listed in a summary


# ---------------------------------------------------------------------------------------------------------
# Layer 1: raw rows


class Rows(list):
    """The rows of one source (a list of dicts) plus where they came from, for error messages."""

    def __init__(self, rows: list[dict], source: str, format: str, row_numbers: list[int] | None = None):
        super().__init__(rows)
        self.source = source  # the file (or dataset name) that errors name
        self.format = format  # jsonl, json, parquet, csv, tsv, datasets, hub
        self.row_numbers = row_numbers  # 1-based line numbers (JSONL/CSV); None: index + 1

    def row_number(self, index: int) -> int:
        return self.row_numbers[index] if self.row_numbers is not None else index + 1

    @property
    def cells_are_text(self) -> bool:
        return self.format in ("csv", "tsv")


def load_rows(source: str | os.PathLike, split: str | None = None) -> Rows:
    """Raw rows from a data file, a `datasets` directory, or a `datasets.load_dataset` name.

    `split` picks a split of a `datasets` directory/hub dataset (default: its only split, else "train") or
    the key of a JSON object that holds several lists; flat files ignore it.
    """
    name = str(source)
    path = Path(name).expanduser()
    if path.is_file():
        rows = _read_file(path, split)
    elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        rows = _read_saved_dataset(path, split)
    elif not path.exists() and _looks_like_path(name):
        raise DataFileNotFoundError(name, "no such file or directory")
    else:  # a hub name, or a folder of data files that `load_dataset` reads
        rows = _read_with_load_dataset(name, split)
    if not rows:
        raise DataError(rows.source, "no rows")
    return rows


def _looks_like_path(name: str) -> bool:
    """A hub name is `name` or `owner/name`; anything with a data-file suffix or a path prefix is a path."""
    return (Path(name).suffix.lower() in FILE_FORMATS or name.startswith(("/", "./", "../", "~", "."))
            or "\\" in name or name.count("/") > 1 or os.path.isabs(name))


def _read_file(path: Path, split: str | None) -> Rows:
    file = str(path)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt == "parquet":
        return _read_parquet(path)
    data = path.read_bytes()
    if fmt is None:  # unknown suffix: sniff
        if data.startswith(b"PAR1"):
            return _read_parquet(path)
        head = data.lstrip()[:1]
        if head not in (b"{", b"["):
            raise DataError(file, f"unknown file format '{path.suffix}': use .jsonl, .json, .parquet, .csv or .tsv")
        fmt = "json" if head == b"[" else "jsonl"

    def parse(text: str) -> Rows:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark (Excel, Notepad)
        if fmt in ("csv", "tsv"):
            return _parse_csv(file, text, fmt)
        if fmt == "json" or text.lstrip().startswith("["):
            return _parse_json(file, text, split)
        return _parse_jsonl(file, text)

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _undecodable(file, data, err, parse, line_based=fmt != "json") from None
    return parse(text)


def _undecodable(file: str, data: bytes, err: UnicodeDecodeError, parse, line_based: bool) -> DataError:
    """Locate a non-UTF-8 byte: its offset, its line, and (when the rest parses) its row and field."""
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1)
    message = (f"not valid UTF-8: byte 0x{data[err.start]:02x} at byte offset {err.start} "
               f"(line {line}, byte {column + 1} of the line); re-save the file as UTF-8")
    try:
        rows = parse(data.decode("utf-8", errors="surrogateescape"))
    except DataError:
        rows = Rows([], file, "")
    for index, row in enumerate(rows):
        for key, value in row.items():
            if _has_undecodable(key) or _has_undecodable(value):
                return DataError(file, message, rows.row_number(index), key)
    return DataError(file, message, line if line_based else None)


def _has_undecodable(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate left by errors="surrogateescape"
            return True
        return False
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _parse_jsonl(file: str, text: str) -> Rows:
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows, numbers = [], []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            message = f"invalid JSON ({err.msg.removesuffix(' at')} at column {err.colno})"
            if index == last:
                message += ": the last line looks truncated"
                if not text.endswith("\n"):
                    message += " (the file does not end with a newline)"
            raise DataError(file, message, index + 1, _key_before(line, err.pos)) from None
        if not isinstance(row, dict):
            raise DataError(file, f"expected a JSON object on each line, got {_type_name(row)}", index + 1)
        rows.append(row)
        numbers.append(index + 1)
    return Rows(rows, file, "jsonl", numbers)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')


def _key_before(text: str, position: int) -> str | None:
    """The top-level key whose value `position` falls in, in a JSON object's text (for a broken line)."""
    depth, last_string, key = 0, None, None
    for token in _JSON_TOKEN.finditer(text, 0, position):
        t = token.group()
        if t in ("{", "["):
            depth += 1
        elif t in ("}", "]"):
            depth -= 1
        elif t == ":" and depth == 1:
            key = last_string
        elif t == "," and depth == 1:
            key = None  # between fields
        elif t.startswith('"'):
            last_string = t[1:-1]
    return key


def _parse_json(file: str, text: str, split: str | None) -> Rows:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line, under a .json name (`Dataset.to_json` does this)
            return _parse_jsonl(file, text)
        raise DataError(file, f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if isinstance(document, dict) and ("prompt" in document or "messages" in document):
        document = [document]  # one row (its `messages` list is a field, not the rows)
    if isinstance(document, dict):
        lists = [k for k, v in document.items() if isinstance(v, list)]
        if split in lists:
            document = document[split]
        elif split is not None and len(lists) > 1:
            raise DataError(file, f"no list of rows under the key '{split}' (lists found under: {lists})")
        elif lists:
            preferred = [k for k in JSON_LIST_KEYS if k in lists]
            if not preferred and len(lists) > 1:
                raise DataError(file, f"several lists of rows ({lists}) and none named {list(JSON_LIST_KEYS)}: keep one "
                                      "list per file (or pass `split` in Python: load_rows(path, split=...))")
            document = document[(preferred or lists)[0]]
        else:
            document = [document]  # a single record
    if not isinstance(document, list):
        raise DataError(file, f"expected a JSON list of objects, got {_type_name(document)}")
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            raise DataError(file, f"expected a JSON object, got {_type_name(row)}", index + 1)
    return Rows(document, file, "json")


def _parse_csv(file: str, text: str, fmt: str) -> Rows:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    rows, numbers = [], []
    try:
        header = next(reader, None)
        if header is None:
            return Rows([], file, fmt)
        duplicated = [name for name, n in Counter(header).items() if n > 1]
        if duplicated:
            raise DataError(file, f"the header repeats the column(s) {duplicated}", 1, duplicated[0])
        previous = reader.line_num
        for cells in reader:
            start, previous = previous + 1, reader.line_num
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise DataError(file, f"has {len(cells)} values but the header has {len(header)} columns", start)
            rows.append(dict(zip(header, cells)))
            numbers.append(start)
    except csv.Error as err:
        raise DataError(file, f"invalid CSV: {err}", reader.line_num) from None
    return Rows(rows, file, fmt, numbers)


def _read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(str(path), f"cannot read as Parquet: {err}") from None
    return Rows(table.to_pylist(), str(path), "parquet")


def _read_saved_dataset(path: Path, split: str | None) -> Rows:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged directory fails in many ways inside `datasets`
        raise DataError(str(path), f"cannot load this `datasets` directory ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(str(path), list(loaded), split)]
    # A single saved Dataset is taken as the split the caller asked for.
    return Rows(loaded.to_list(), str(path), "datasets")


def _pick_split(file: str, splits: list[str], split: str | None) -> str:
    if split is None:
        if len(splits) == 1:
            return splits[0]
        split = "train"
    if split not in splits:
        raise DataError(file, f"no split '{split}' (splits: {splits}); pass one of them as the split")
    return split


def _read_with_load_dataset(name: str, split: str | None) -> Rows:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # noqa: BLE001 - the hub/network/builder raise many types; report them all alike
        folder = Path(name).expanduser()
        files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.suffix.lower() in FILE_FORMATS) \
            if folder.is_dir() else []
        hint = (f"; it holds {len(files)} data files ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''}): "
                "give one file") if files else ""
        raise DataError(name, "not a local file or `datasets` directory, and `datasets.load_dataset` could not "
                              f"load it ({type(err).__name__}: {err}){hint}") from None
    return Rows(loaded.to_list(), name, "hub")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------------
# Layer 2: typed fields of one row


_MISSING = object()


class _Row:
    """Typed, located access to the fields of one raw row."""

    def __init__(self, rows: Rows, index: int, kind: str, fields: frozenset[str]):
        self.data, self.file, self.number = rows[index], rows.source, rows.row_number(index)
        self.text_cells, self.kind, self.fields = rows.cells_are_text, kind, fields

    def error(self, message: str, name: str | None) -> DataError:
        return DataError(self.file, message, self.number, name)

    def get(self, name: str, required: bool) -> Any:
        """The value, or None for an absent optional one (null, NaN, an empty CSV cell)."""
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            if not required:
                return None
            message = f"required field is missing (for {self.kind} data)"
            unknown = [k for k in self.data if k not in self.fields]
            guess = difflib.get_close_matches(name, unknown, n=1, cutoff=0.75)
            if guess:
                message += f"; the row has '{guess[0]}': did you mean '{name}'?"
            raise self.error(message, name)
        if value is None or (self.text_cells and value == "") or (type(value) is float and math.isnan(value)):
            if required:
                raise self.error(f"required field has no value (for {self.kind} data)", name)
            return None
        return value

    def text(self, name: str, required: bool = True) -> str | None:
        value = self.get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {_type_name(value)}", name)
        if not value.strip():
            raise self.error("is empty (or only whitespace)", name)
        return value

    def integer(self, name: str, allowed: tuple[int, ...], required: bool = True) -> int | None:
        value = self.get(name, required)
        if value is None:
            return None
        if isinstance(value, str) and self.text_cells:
            try:
                value = float(value.strip()) if "." in value else int(value.strip())
            except ValueError:
                raise self.error(f"expected one of {list(allowed)}, got '{value}'", name) from None
        if isinstance(value, float) and value.is_integer():  # 1.0 from a float column (pandas with NaNs)
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer in {list(allowed)}, got {_type_name(value)} {value!r}", name)
        if value not in allowed:
            raise self.error(f"expected one of {list(allowed)}, got {value}", name)
        return value

    def boolean(self, name: str) -> bool:
        value = self.get(name, required=True)
        if isinstance(value, str) and self.text_cells:
            lowered = value.strip().lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
        if not isinstance(value, bool):
            raise self.error(f"expected true or false, got {_type_name(value)} {value!r}", name)
        return value

    def harm_categories(self, name: str) -> dict[str, bool]:
        value = self.get(name, required=False)
        if value is None:
            return {}
        if isinstance(value, str) and self.text_cells:  # a JSON object (or Python dict repr) in a cell
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    raise self.error(f"expected an object of category: bool, got '{value[:60]}'", name) from None
        if not isinstance(value, dict):
            raise self.error(f"expected an object of category: bool, got {_type_name(value)}", name)
        categories = {}
        for category, flag in value.items():
            if category not in KNOWN_HARM_CATEGORIES:
                guess = difflib.get_close_matches(str(category), KNOWN_HARM_CATEGORIES, n=1, cutoff=0.6)
                hint = f"; did you mean '{guess[0]}'?" if guess else " (see safealign.data.schema.HARM_CATEGORIES)"
                raise self.error(f"unknown harm category '{category}'{hint}", name)
            if flag is None:  # a category absent from this row, in a column-typed file (Parquet, Arrow)
                continue
            if not isinstance(flag, bool):
                raise self.error(f"category '{category}': expected true or false, got {_type_name(flag)} {flag!r}",
                                 name)
            categories[category] = flag
        return categories

    def extra(self) -> dict:
        return {k: v for k, v in self.data.items() if k not in self.fields}


def _preference(rows: Rows, index: int) -> PreferenceRecord:
    row = _Row(rows, index, "preference", PREFERENCE_FIELDS)
    return PreferenceRecord(
        prompt=row.text("prompt"),
        response_0=row.text("response_0"),
        response_1=row.text("response_1"),
        better_response_id=row.integer("better_response_id", (0, 1)),
        safer_response_id=row.integer("safer_response_id", (0, 1)),
        is_response_0_safe=row.boolean("is_response_0_safe"),
        is_response_1_safe=row.boolean("is_response_1_safe"),
        response_0_harm_category=row.harm_categories("response_0_harm_category"),
        response_1_harm_category=row.harm_categories("response_1_harm_category"),
        response_0_severity_level=row.integer("response_0_severity_level", SEVERITY_LEVELS, required=False),
        response_1_severity_level=row.integer("response_1_severity_level", SEVERITY_LEVELS, required=False),
        extra=row.extra(),
    )


def sft_example(rows: Rows, index: int) -> SFTExample:
    data = rows[index]
    if "messages" in data:
        return _chat(_Row(rows, index, "chat SFT", SFT_FIELDS))
    if "response" not in data and "response_0" in data:  # a preference row: its more helpful response
        row = _Row(rows, index, "preference", PREFERENCE_FIELDS)
        better = row.integer("better_response_id", (0, 1))
        return SFTExample(prompt=row.text("prompt"), response=row.text(f"response_{better}"))
    row = _Row(rows, index, "SFT", SFT_FIELDS)
    return SFTExample(prompt=row.text("prompt"), response=row.text("response"))


def _chat(row: _Row) -> SFTExample:
    """A chat row: [system,] user, assistant. Longer conversations are refused, not silently cut."""
    messages = row.get("messages", required=True)
    if isinstance(messages, str) and row.text_cells:
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise row.error("expected a JSON list of {role, content} messages", "messages") from None
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _type_name(messages)
        raise row.error(f"expected a non-empty list of {{role, content}} messages, got {got}", "messages")
    roles = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise row.error(f"expected an object with 'role' and 'content', got {_type_name(message)}", where)
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise row.error(f"role must be system, user or assistant, got {role!r}", f"{where}.role")
        if not isinstance(content, str):
            raise row.error(f"expected a string, got {_type_name(content)}", f"{where}.content")
        if not content.strip():
            raise row.error("is empty (or only whitespace)", f"{where}.content")
        roles.append(role)
    if roles[-1] != "assistant":
        raise row.error(f"the last message must be the assistant's (the response), got '{roles[-1]}'",
                        f"messages[{len(roles) - 1}].role")
    turns = roles[1:] if roles[0] == "system" else roles
    if turns != ["user", "assistant"]:
        raise row.error(f"only single-turn conversations ([system,] user, assistant) are supported for now; "
                        f"this one has roles {roles}", "messages")
    system = messages[0]["content"] if roles[0] == "system" else None
    return SFTExample(prompt=messages[-2]["content"], response=messages[-1]["content"], system=system)


def _prompt(rows: Rows, index: int, kind: str) -> PromptRecord:
    """A prompt row (kind and category optional), or the prompt of a preference/SFT row."""
    data = rows[index]
    if kind == "sft" and "messages" in data:
        return PromptRecord(prompt=_chat(_Row(rows, index, "chat SFT", SFT_FIELDS)).prompt)
    row = _Row(rows, index, kind, PROMPT_FIELDS)
    prompt_kind = row.get("kind", required=False)
    if prompt_kind is not None and prompt_kind not in PROMPT_KINDS:
        guess = difflib.get_close_matches(str(prompt_kind), PROMPT_KINDS, n=1, cutoff=0.6)
        raise row.error(f"expected one of {list(PROMPT_KINDS)}, got {prompt_kind!r}"
                        + (f"; did you mean '{guess[0]}'?" if guess else ""), "kind")
    return PromptRecord(prompt=row.text("prompt"), kind=prompt_kind, category=row.text("category", required=False),
                        extra=row.extra() if kind == "prompt" else {})


# ---------------------------------------------------------------------------------------------------------
# Public loaders


@dataclass
class PreferenceDataset:
    """Validated preference records; contradictory ones (docs/maths.md §1) already left out and counted."""

    records: list[PreferenceRecord]
    source: str
    num_contradictory_skipped: int = 0
    contradictory_rows: list[int] = field(default_factory=list)  # their row numbers, for reports

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PreferenceRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> PreferenceRecord:
        return self.records[index]


def detect_kind(rows: Rows) -> Kind:
    """preference, sft or prompt, from the fields of the first row (near misspellings count)."""
    keys = set(rows[0])
    preference, sft, prompt = set(PREFERENCE_REQUIRED) - {"prompt"}, {"response", "messages"}, {"prompt"}
    # Exact names first, then near misses (which validation then reports with a "did you mean").
    for kind, names, cutoff in (("preference", preference, 1.0), ("sft", sft, 1.0), ("preference", preference, 0.85),
                                ("sft", sft, 0.85), ("prompt", prompt, 1.0), ("prompt", prompt, 0.85)):
        if any(difflib.get_close_matches(key, names, n=1, cutoff=cutoff) for key in keys):
            return kind
    raise DataError(rows.source, f"cannot tell the kind of data from the fields {sorted(keys)}: expected preference "
                                 f"rows ({', '.join(PREFERENCE_REQUIRED)}), SFT rows (prompt + response, or messages) "
                                 "or prompt rows (prompt); or pass the kind explicitly", rows.row_number(0))


def rows_of_kind(source: str | os.PathLike, split: str | None, kind: str) -> tuple[Rows, Kind]:
    if kind not in ("auto", "preference", "sft", "prompt"):
        raise DataError(str(source), f"unknown kind '{kind}': expected auto, preference, sft or prompt")
    rows = load_rows(source, split)
    return rows, detect_kind(rows) if kind == "auto" else kind


def preferences_from_rows(rows: Rows, on_contradiction: OnContradiction) -> PreferenceDataset:
    if on_contradiction not in ("skip", "error"):
        raise ValueError(f"on_contradiction must be 'skip' or 'error', got {on_contradiction!r}")
    records, contradictory = [], []
    for index in range(len(rows)):
        record = _preference(rows, index)
        if record.is_contradictory:
            number = rows.row_number(index)
            if on_contradiction == "error":
                raise DataError(rows.source, f"contradictory safety labels: the safer response "
                                             f"(response_{record.safer_response_id}) is labelled unsafe while the "
                                             f"other is labelled safe", number, "safer_response_id")
            contradictory.append(number)
        else:
            records.append(record)
    return PreferenceDataset(records, rows.source, len(contradictory), contradictory)


def load_preferences(source: str | os.PathLike, split: str | None = None,
                     on_contradiction: OnContradiction = "skip") -> PreferenceDataset:
    """PKU-SafeRLHF-format preference pairs (docs/maths.md §1), validated.

    Contradictory rows (the safer response labelled unsafe, the other safe) are skipped and counted, or
    raise a DataError with `on_contradiction="error"`. Unknown fields go to `record.extra`.
    """
    return preferences_from_rows(load_rows(source, split), on_contradiction)


def load_sft(source: str | os.PathLike, split: str | None = None) -> list[SFTExample]:
    """SFT examples from {prompt, response} rows, single-turn chat rows {messages: [...]}, or preference
    rows (their more helpful response)."""
    rows, kind = rows_of_kind(source, split, "auto")
    if kind == "prompt":
        raise DataError(rows.source, "has prompts but no responses: SFT needs prompt + response, messages, "
                                     "or preference rows", rows.row_number(0), "response")
    return [sft_example(rows, index) for index in range(len(rows))]


def load_prompts(source: str | os.PathLike, split: str | None = None) -> list[PromptRecord]:
    """Prompts from prompt rows (optional `kind`, `category`), or the prompts of a preference/SFT file,
    deduplicated in order of first appearance."""
    rows, kind = rows_of_kind(source, split, "auto")
    return prompts_from_rows(rows, kind)


def prompts_from_rows(rows: Rows, kind: str) -> list[PromptRecord]:
    prompts: dict[str, PromptRecord] = {}
    for index in range(len(rows)):
        record = _prompt(rows, index, kind)
        prompts.setdefault(record.prompt, record)
    return list(prompts.values())


# ---------------------------------------------------------------------------------------------------------
# Responses to judge (`safealign judge`)


@dataclass(frozen=True)
class ResponseRow:
    """One response to judge: its prompt, its text, and the input row's other fields (kept for the output)."""

    prompt: str
    response: str
    fields: dict[str, Any]


def load_responses(source: str | os.PathLike, split: str | None = None) -> list[ResponseRow]:
    """Responses to judge, in input order: `{prompt, response}` rows, or PKU-SafeRLHF rows whose two responses
    become two rows (`response_index` 0 and 1 added to their fields). An empty response is judged like any other;
    a missing or non-string one is a located error."""
    rows = load_rows(source, split)
    responses: list[ResponseRow] = []
    for index, data in enumerate(rows):
        pku = "response" not in data and ("response_0" in data or "response_1" in data)
        names = ("response_0", "response_1") if pku else ("response",)
        row = _Row(rows, index, "response", frozenset(("prompt", *names)))
        prompt = row.text("prompt")
        kept = {k: v for k, v in data.items() if k not in names}
        for i, name in enumerate(names):
            if row.text_cells and data.get(name, None) == "":
                response = ""  # an empty CSV cell: an empty answer
            else:
                response = row.get(name, required=True)
            if not isinstance(response, str):
                raise row.error(f"expected a string, got {_type_name(response)}", name)
            responses.append(ResponseRow(prompt, response, {**kept, "response": response,
                                                            **({"response_index": i} if pku else {})}))
    return responses


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out of `fraction` of the examples (at least one when fraction > 0)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held_out = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held_out], [examples[i] for i in sorted(held_out)]
