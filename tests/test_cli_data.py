"""`safealign data validate`: a summary on good data, a located message (no traceback) on bad data."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from safealign.cli import app

ROW = {"prompt": "How?", "response_0": "Like this.", "response_1": "No.", "better_response_id": 0,
       "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True}
CONTRADICTORY = {**ROW, "safer_response_id": 0}
ENV = {"COLUMNS": "60"}  # a narrow terminal: error messages must still keep each path on one line


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_validate_prints_a_summary_of_a_good_file(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [ROW, CONTRADICTORY, ROW])
    result = CliRunner().invoke(app, ["data", "validate", str(path)], env=ENV)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kind"] == "preference" and (summary["rows"], summary["valid_rows"]) == (3, 2)
    assert summary["contradictory"]["first_rows"] == [2]


def test_validate_strict_fails_on_contradictory_labels(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [ROW, CONTRADICTORY])
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--strict"], env=ENV)
    assert result.exit_code != 0
    output = " ".join(result.output.split())
    assert f"{path}: row 2: field 'safer_response_id': contradictory safety labels" in output


def test_validate_reports_a_bad_row_without_a_traceback(tmp_path):
    folder = tmp_path / ("a_long_folder_name_" * 6)  # longer than any terminal line: rich would fold it mid-word
    folder.mkdir()
    path = _write(folder / "pairs.jsonl", [ROW, {**ROW, "is_response_1_safe": "yes"}])
    result = CliRunner().invoke(app, ["data", "validate", str(path)], env=ENV)
    assert result.exit_code != 0
    output = result.output
    assert f"{path}: row 2: field 'is_response_1_safe': expected true or false" in output  # unbroken, as printed
    assert "Traceback" not in output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught error


def test_validate_a_missing_file(tmp_path):
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path / "nope.jsonl")], env=ENV)
    assert result.exit_code != 0
    assert "nope.jsonl: no such file or directory" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_an_output_path_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "taken").write_text("")
    result = CliRunner().invoke(app, ["world", "generate", "--out", str(tmp_path / "taken" / "w"), "--sft_examples", "10",
                                      "--train_pairs", "10", "--test_pairs", "5"])
    assert result.exit_code == 2 and "Not a directory" in result.output and "Traceback" not in result.output


def test_brackets_in_an_error_message_are_shown_as_written(tmp_path):
    turns = [{"role": r, "content": "x"} for r in ("user", "assistant", "user", "assistant")]
    path = _write(tmp_path / "long.jsonl", [{"messages": turns}])
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--kind", "sft"], env=ENV)
    assert result.exit_code == 2 and "([system,] user, assistant)" in result.output  # not eaten as rich markup
