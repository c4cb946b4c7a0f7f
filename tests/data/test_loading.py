"""The data layer: every format loads the same records; every bad input is reported with FILE, ROW, FIELD."""

from __future__ import annotations

import json
import time

import pytest

from safealign.data.loading import load_preferences, load_prompts, load_rows, load_sft
from safealign.data.schema import DataError, DataFileNotFoundError, PromptRecord, SFTExample
from safealign.data.validate import validate_file


def assert_located(err: DataError, file, row: int | None, field: str | None, *phrases: str) -> None:
    message = str(err)
    assert (err.file, err.row, err.field) == (str(file), row, field), message
    assert message.startswith(str(file)), message
    if row is not None:
        assert f"row {row}" in message
    if field is not None:
        assert f"field '{field}'" in message
    for phrase in phrases:
        assert phrase in message, message


# ------------------------------------------------------------------ formats


def test_every_format_loads_identical_records(files, tmp_path, rows):
    import datasets

    expected = load_preferences(files.jsonl(tmp_path / "p.jsonl", rows)).records
    assert len(expected) == len(rows) and expected[3].response_1_severity_level == 3
    assert expected[3].response_0_harm_category["discrimination,stereotype,injustice"] is True
    assert expected[0].extra == {"prompt_source": "test"}

    (tmp_path / "list.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "keyed.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    sources = [tmp_path / "list.json", tmp_path / "keyed.json", files.parquet(tmp_path / "p.parquet", rows),
               files.csv(tmp_path / "p.csv", rows)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "saved_dict"))
    sources += [tmp_path / "saved", tmp_path / "saved_dict"]
    for source in sources:
        assert load_preferences(source).records == expected, source
    assert len(load_preferences(tmp_path / "saved_dict", split="test")) == 2


def test_json_lines_under_a_json_name_and_json_split_keys(files, tmp_path, rows):
    files.jsonl(tmp_path / "lines.json", rows)  # what `Dataset.to_json` writes
    assert len(load_rows(tmp_path / "lines.json")) == len(rows)
    (tmp_path / "splits.json").write_text(json.dumps({"train": rows, "test": rows[:1]}), encoding="utf-8")
    assert len(load_rows(tmp_path / "splits.json", split="test")) == 1
    with pytest.raises(DataError, match="no list of rows under the key 'valid'"):
        load_rows(tmp_path / "splits.json", split="valid")


def test_datasets_dict_with_an_unknown_split_lists_the_splits(tmp_path, rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"no split 'test' \(splits: \['train'\]\)"):
        load_rows(tmp_path / "d", split="test")


def test_hub_code_path_reads_a_folder_of_jsonl_files(files, tmp_path, rows):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    files.jsonl(folder / "train.jsonl", rows)
    loaded = load_rows(str(folder))
    assert loaded.format == "hub"
    assert load_preferences(str(folder)).records == load_preferences(folder / "train.jsonl").records


def test_hub_name_goes_to_load_dataset_with_the_split(monkeypatch, rows):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_preferences("PKU-Alignment/PKU-SafeRLHF")) == len(rows)
    load_rows("PKU-Alignment/PKU-SafeRLHF", split="test")
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "train"), ("PKU-Alignment/PKU-SafeRLHF", "test")]


def test_hub_failure_is_a_data_error_naming_the_dataset(monkeypatch):
    import datasets

    def offline(name, split=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_rows("someone/some-dataset")
    assert_located(info.value, "someone/some-dataset", None, None, "ConnectionError: offline")


def test_missing_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub lookup for a missing file"))
    for missing in (tmp_path / "nope.jsonl", "data/train.parquet", "./pairs"):
        with pytest.raises(DataFileNotFoundError) as info:
            load_preferences(missing)
        assert isinstance(info.value, FileNotFoundError)
        assert_located(info.value, missing, None, None, "no such file or directory")


# ------------------------------------------------------------------ bad rows


def _corrupt(row: dict, change) -> dict:
    row = dict(row)
    change(row)
    return row


BAD_ROWS = {
    "misspelled": (lambda r: r.update(beter_response_id=r.pop("better_response_id")),
                   "better_response_id", "did you mean 'better_response_id'?"),
    "missing": (lambda r: r.pop("is_response_1_safe"), "is_response_1_safe", "required field is missing"),
    "bool as string": (lambda r: r.update(is_response_0_safe="true"), "is_response_0_safe", "expected true or false"),
    "int as string": (lambda r: r.update(better_response_id="1"), "better_response_id", "expected an integer"),
    "int as bool": (lambda r: r.update(safer_response_id=True), "safer_response_id", "expected an integer"),
    "id out of range": (lambda r: r.update(safer_response_id=2), "safer_response_id", "expected one of [0, 1], got 2"),
    "null id": (lambda r: r.update(better_response_id=None), "better_response_id", "has no value"),
    "empty prompt": (lambda r: r.update(prompt=""), "prompt", "is empty"),
    "blank response": (lambda r: r.update(response_1=" \n\t"), "response_1", "is empty"),
    "prompt not text": (lambda r: r.update(prompt=["a"]), "prompt", "expected a string, got a list"),
    "unknown category": (lambda r: r.update(response_0_harm_category={"animal_abus": True}),
                         "response_0_harm_category", "unknown harm category 'animal_abus'; did you mean 'animal_abuse'?"),
    "category not bool": (lambda r: r.update(response_1_harm_category={"self_harm": "yes"}),
                          "response_1_harm_category", "category 'self_harm': expected true or false"),
    "categories not a dict": (lambda r: r.update(response_1_harm_category=["self_harm"]),
                              "response_1_harm_category", "expected an object"),
    "severity too high": (lambda r: r.update(response_0_severity_level=4),
                          "response_0_severity_level", "expected one of [0, 1, 2, 3], got 4"),
    "severity negative": (lambda r: r.update(response_1_severity_level=-1), "response_1_severity_level", "got -1"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_reported_with_file_row_and_field(files, tmp_path, rows, case):
    change, field, phrase = BAD_ROWS[case]
    rows[2] = _corrupt(rows[2], change)
    path = files.jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert_located(info.value, path, 3, field, phrase)


def test_bad_row_in_a_json_list_is_numbered_from_one(tmp_path, rows):
    rows[4]["better_response_id"] = 7
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert_located(info.value, path, 5, "better_response_id", "got 7")


def test_csv_reads_bool_and_int_text_but_not_nonsense(files, tmp_path, rows):
    path = files.csv(tmp_path / "p.csv", rows)
    text = path.read_text(encoding="utf-8").replace(",True,", ",true,").replace(",False,", ",0,")
    path.write_text(text, encoding="utf-8")
    assert load_preferences(path).records == load_preferences(files.jsonl(tmp_path / "p.jsonl", rows)).records

    rows[1]["is_response_1_safe"] = "maybe"
    rows[3]["better_response_id"] = "one"
    path = files.csv(tmp_path / "bad.csv", rows[:3])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert_located(info.value, path, 3, "is_response_1_safe", "got a string 'maybe'")  # line 3: header is line 1
    with pytest.raises(DataError) as info:
        load_preferences(files.csv(tmp_path / "bad2.csv", rows[3:]))
    assert_located(info.value, tmp_path / "bad2.csv", 2, "better_response_id", "got 'one'")


def test_csv_row_with_the_wrong_number_of_cells(files, tmp_path, rows):
    path = files.csv(tmp_path / "p.csv", rows[:2])
    path.write_text(path.read_text(encoding="utf-8") + "only,three,cells\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert_located(info.value, path, 4, None, "has 3 values but the header has")


def test_non_utf8_bytes_name_the_row_field_and_byte_offset(files, tmp_path, rows):
    path = files.jsonl(tmp_path / "latin1.jsonl", rows)
    data = path.read_bytes()
    lines = data.split(b"\n")
    lines[3] = lines[3].replace(b"Answer one", b"Answ\xe9r one")  # Latin-1 'é' in row 4's response_1
    path.write_bytes(b"\n".join(lines))
    offset = data.index(b"Answer one to 3") + 4
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert_located(info.value, path, 4, "response_1", "not valid UTF-8", "byte 0xe9", f"byte offset {offset}")

    csv_path = files.csv(tmp_path / "latin1.csv", rows)
    csv_path.write_bytes(csv_path.read_bytes().replace(b"thing 2?", b"thing 2\xff"))
    with pytest.raises(DataError) as info:
        load_preferences(csv_path)
    assert_located(info.value, csv_path, 4, "prompt", "byte 0xff")


def test_truncated_last_line_says_so(files, tmp_path, rows):
    path = files.jsonl(tmp_path / "cut.jsonl", rows)
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.rindex("Answer one")], encoding="utf-8")  # cut inside the last row's response_1
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert_located(info.value, path, len(rows), "response_1", "invalid JSON", "looks truncated",
                   "does not end with a newline")


def test_invalid_json_in_the_middle_is_not_called_truncated(files, tmp_path, rows):
    path = files.jsonl(tmp_path / "broken.jsonl", rows)
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[1] = lines[1].replace('"better_response_id": 0', '"better_response_id": zero')
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert_located(info.value, path, 2, "better_response_id", "invalid JSON")
    assert "truncated" not in str(info.value)


def test_non_object_line(tmp_path, rows):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert_located(info.value, path, 2, None, "expected a JSON object on each line, got a list")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("blank.jsonl", "\n  \n"), ("e.json", "[]"),
                                          ("header.csv", "prompt,response\n")])
def test_empty_file_has_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert_located(info.value, path, None, None, "no rows")


# ------------------------------------------------------------------ contradictions and extras


def _contradictory(rows: list[dict], index: int) -> None:
    rows[index].update(is_response_0_safe=False, is_response_1_safe=True, safer_response_id=0)


def test_contradictory_rows_are_skipped_and_counted_by_default(files, tmp_path, rows):
    _contradictory(rows, 1)
    _contradictory(rows, 4)
    dataset = load_preferences(files.jsonl(tmp_path / "p.jsonl", rows))
    assert (len(dataset), dataset.num_contradictory_skipped, dataset.contradictory_rows) == (4, 2, [2, 5])
    assert all(not r.is_contradictory for r in dataset)
    assert dataset.source == str(tmp_path / "p.jsonl")


def test_contradictory_row_is_fatal_on_request(files, tmp_path, rows):
    _contradictory(rows, 4)
    path = files.jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_preferences(path, on_contradiction="error")
    assert_located(info.value, path, 5, "safer_response_id", "contradictory safety labels")


def test_unknown_fields_are_kept_as_extra(files, tmp_path, rows):
    rows[0].update(annotator_ids=[3, 7], response_0_sha256="abc")
    record = load_preferences(files.jsonl(tmp_path / "p.jsonl", rows))[0]
    assert record.extra == {"prompt_source": "test", "annotator_ids": [3, 7], "response_0_sha256": "abc"}


def test_pku_saferlhf_v1_category_names_are_accepted(files, tmp_path, rows):
    rows[0]["response_0_harm_category"] = {"Privacy Violation": True, "Cybercrime": False}
    assert load_preferences(files.jsonl(tmp_path / "p.jsonl", rows))[0].response_0_harm_category["Privacy Violation"]


# ------------------------------------------------------------------ SFT and prompts


def test_sft_from_prompt_response_chat_and_preference_rows(files, tmp_path, rows):
    plain = files.jsonl(tmp_path / "plain.jsonl", [{"prompt": "Hi?", "response": "Hello.", "source": "x"}])
    assert load_sft(plain) == [SFTExample("Hi?", "Hello.")]
    chat = files.jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]},
    ])
    assert load_sft(chat) == [SFTExample("Hi?", "Hello."), SFTExample("Q", "A", system="Be brief.")]
    examples = load_sft(files.jsonl(tmp_path / "pairs.jsonl", rows))
    assert [e.response for e in examples] == [r[f"response_{r['better_response_id']}"] for r in rows]


CHAT_ERRORS = {
    "multi-turn": ([("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")],
                   "messages", "only single-turn conversations"),
    "ends with user": ([("user", "a"), ("assistant", "b"), ("user", "c")], "messages[2].role", "must be the assistant's"),
    "bad role": ([("human", "a"), ("assistant", "b")], "messages[0].role", "got 'human'"),
    "empty content": ([("user", "a"), ("assistant", " ")], "messages[1].content", "is empty"),
}


@pytest.mark.parametrize("case", list(CHAT_ERRORS))
def test_bad_chat_rows_are_located(files, tmp_path, case):
    turns, field, phrase = CHAT_ERRORS[case]
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    bad = {"messages": [{"role": role, "content": content} for role, content in turns]}
    path = files.jsonl(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(DataError) as info:
        load_sft(path)
    assert_located(info.value, path, 2, field, phrase)


def test_sft_from_a_prompt_only_file_is_refused(files, tmp_path):
    path = files.jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError) as info:
        load_sft(path)
    assert_located(info.value, path, 1, "response", "no responses")


def test_prompts_with_kind_category_and_extra(files, tmp_path):
    path = files.jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Kill a stuck process?", "kind": "borderline", "id": 1},
        {"prompt": "Steal a car?", "kind": "harmful", "category": "financial_crime,property_crime,theft"},
        {"prompt": "Bake bread?"},
    ])
    assert load_prompts(path) == [
        PromptRecord("Kill a stuck process?", kind="borderline", extra={"id": 1}),
        PromptRecord("Steal a car?", kind="harmful", category="financial_crime,property_crime,theft"),
        PromptRecord("Bake bread?"),
    ]
    bad = files.jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "kind": "harmfull"}])
    with pytest.raises(DataError) as info:
        load_prompts(bad)
    assert_located(info.value, bad, 1, "kind", "did you mean 'harmful'?")


def test_prompts_of_preference_and_sft_files_are_deduplicated(files, tmp_path, rows):
    pairs = files.jsonl(tmp_path / "pairs.jsonl", rows + rows[:2])
    assert [p.prompt for p in load_prompts(pairs)] == [r["prompt"] for r in rows]
    sft = files.jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "1"}, {"prompt": "a", "response": "2"}])
    assert load_prompts(sft) == [PromptRecord("a")]


# ------------------------------------------------------------------ validate_file


def test_validate_file_summarises_a_preference_file(files, tmp_path, rows):
    _contradictory(rows, 5)
    summary = validate_file(files.parquet(tmp_path / "p.parquet", rows))
    json.dumps(summary)
    assert summary["kind"] == "preference" and summary["format"] == "parquet"
    assert (summary["rows"], summary["valid_rows"]) == (6, 5)
    assert summary["contradictory"] == {"count": 1, "action": "skip", "first_rows": [6]}
    valid = rows[:5]
    safe = sum(r["is_response_0_safe"] + r["is_response_1_safe"] for r in valid)
    assert summary["responses"] == {"safe": safe, "unsafe": 10 - safe}
    assert sum(summary["pairs"].values()) == 5
    agree = sum(r["better_response_id"] == r["safer_response_id"] for r in valid) / 5
    assert summary["better_is_safer_rate"] == pytest.approx(agree)
    # Rows 1 and 4 (i = 0, 3) carry categories: response_1 of both, response_0 of i = 3, are unsafe.
    assert summary["unsafe_by_category"] == {"privacy_violation": 2, "discrimination,stereotype,injustice": 1}
    assert summary["severity_levels"] == {"0": 1, "1": 0, "2": 1, "3": 2, "unlabelled": 6}


def test_validate_file_detects_sft_and_prompt_files(files, tmp_path):
    sft = files.jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}])
    assert validate_file(sft)["kind"] == "sft"
    prompts = files.jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "kind": "benign"}, {"prompt": "b", "kind": "harmful"},
                                                 {"prompt": "c", "kind": "harmful"}])
    summary = validate_file(prompts)
    assert summary["kind"] == "prompt" and summary["prompt_kinds"] == {"harmful": 2, "benign": 1}


def test_validate_file_with_unrecognisable_fields(files, tmp_path):
    path = files.jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError) as info:
        validate_file(path)
    assert_located(info.value, path, 1, None, "cannot tell the kind of data", "['answer', 'question']")


def test_explicit_kind_reports_what_that_kind_needs(files, tmp_path):
    path = files.jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError) as info:
        validate_file(path, kind="preference")
    assert_located(info.value, path, 1, "response_0", "required field is missing (for preference data)")


def test_twenty_thousand_rows_load_and_validate_quickly(files, tmp_path):
    path = files.jsonl(tmp_path / "big.jsonl", [files.preference_row(i) for i in range(20_000)])
    start = time.perf_counter()
    summary = validate_file(path)
    elapsed = time.perf_counter() - start
    assert summary["valid_rows"] == 20_000
    assert elapsed < 3.0, f"{elapsed:.2f}s"


def test_invalid_json_document_names_line_and_column(tmp_path, rows):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(rows, indent=1).replace('"prompt": "How do I do thing 2?"', '"prompt": How'),
                    encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert_located(info.value, path, None, None, "invalid JSON at line", "Expecting value")


def test_a_json_file_holding_one_row_is_one_row(tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}))
    assert list(load_rows(chat)) == [json.loads(chat.read_text())]
    single = tmp_path / "prompt.json"
    single.write_text(json.dumps({"prompt": "How do I bake bread?", "tags": ["food"]}))
    assert len(load_rows(single)) == 1
    several = tmp_path / "several.json"
    several.write_text(json.dumps({"a": [{"prompt": "x"}], "b": [{"prompt": "y"}]}))
    with pytest.raises(DataError, match="several lists of rows"):
        load_rows(several)
