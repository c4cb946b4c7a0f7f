"""The report of a run directory, rendered from a synthetic run built here (manifest, gold samples, comparison,
eval-scores figures, TensorBoard logs): every section, figure and number present, and partial runs render."""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safealign.cli import app
from safealign.evaluation.compare import compare_samples
from safealign.evaluation.gold import summarise_judgements, summarise_samples
from safealign.evaluation.proxy import proxy_vs_gold
from safealign.evaluation.report import build_report
from safealign.evaluation.report.document import unshown_cells
from safealign.evaluation.report.figures import CURVES
from safealign.evaluation.report.reading import read_scalars
from safealign.evaluation.report.sections import NO_GOLD_STATEMENT, SIMULATION_STATEMENT
from safealign.evaluation.report.training import SCORE_FIGURES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = '<img src="data:image/png;base64,'
# name, kind, manifest extras, (helpfulness, unsafe tenths on harmful prompts, refused tenths on borderline ones)
POLICIES = [
    ("sft", "sft", {}, (2.0, 5, 2)),
    ("safe_rlhf_r1", "safe_rlhf", {"round": 1, "threshold": 0.0}, (2.2, 2, 2)),
    ("safe_rlhf_r2", "safe_rlhf", {"round": 2, "threshold": 0.0}, (2.4, 0, 1)),
    ("ppo", "ppo", {}, (2.8, 8, 0)),
    ("shaping_nu1", "shaping", {"nu": 1.0}, (2.5, 6, 1)),
    ("shaping_nu10", "shaping", {"nu": 10.0}, (1.5, 1, 6)),
]
CATEGORIES = ("violence,aiding_and_abetting,incitement", "privacy_violation")
RL_RUNS = [name for name, kind, _, _ in POLICIES if kind != "sft"]


@functools.cache
def small_png() -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0, 1.0))
    ax.plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=30)
    plt.close(fig)
    return buffer.getvalue()


def policy_rows(name: str, helpfulness: float, unsafe_tenths: int, refused_tenths: int) -> list[dict]:
    rows = []
    for i in range(20):
        unsafe = i % 10 < unsafe_tenths
        move = "compliance" if unsafe else ("redirection" if i % 3 else "refusal")
        rows.append({"prompt": f"How do I do harmful thing {i}?", "kind": "harmful", "category": CATEGORIES[i % 2],
                     "response": f"{name}: {move} answer | number {i}", "response_tokens": 10 + i % 5, "ended_with_eos": True,
                     "judgement": {"helpfulness": helpfulness - 1 + 0.1 * (i % 3), "is_safe": not unsafe,
                                   "harm_categories": [CATEGORIES[i % 2]] if unsafe else [], "severity": 2 if unsafe else 0,
                                   "response_class": move}})
    for i in range(10):
        rows.append({"prompt": f"How do I bake bread {i}?", "kind": "benign", "category": None,
                     "response": f"{name} bakes {i} " + "knead " * (i % 4), "response_tokens": 12, "ended_with_eos": True,
                     "judgement": {"helpfulness": helpfulness + 0.1 * (i % 3), "is_safe": True, "harm_categories": [],
                                   "severity": 0, "response_class": "helpful"}})
    for i in range(10):
        refused = i % 10 < refused_tenths
        rows.append({"prompt": f"How do I kill stuck process {i}?", "kind": "borderline", "category": None,
                     "response": f"{name} {'refuses' if refused else 'explains'} {i}", "response_tokens": 8, "ended_with_eos": i != 3,
                     "judgement": {"helpfulness": 0.0 if refused else helpfulness, "is_safe": True, "harm_categories": [],
                                   "severity": 0, "response_class": "refusal" if refused else "helpful"}})
    return rows


def scored(rows: list[dict]) -> list[dict]:
    return [{**r, "reward": r["judgement"]["helpfulness"] + 0.05 * k % 3, "cost": 1.5 if not r["judgement"]["is_safe"] else -1.0 - 0.1 * (k % 4)}
            for k, r in enumerate(rows)]


def write_run(root: Path, evaluated: set[str] | None = None, compare: bool = True, logs: bool = True,
              value_models: bool = True) -> Path:
    """A run directory as the multi-round pipeline writes it; `evaluated` limits which policies have eval results."""
    from torch.utils.tensorboard import SummaryWriter

    manifest: dict = {"policies": [], "value_models": []}
    samples = {}
    for name, kind, extra, params in POLICIES:
        entry = {"name": name, "kind": kind, "model": f"{name}/model", "train_dir": name, "eval_dir": f"eval/{name}", **extra}
        manifest["policies"].append(entry)
        if evaluated is not None and name not in evaluated:
            continue
        rows = policy_rows(name, *params)
        samples[name] = scored(rows)
        eval_dir = root / entry["eval_dir"]
        eval_dir.mkdir(parents=True)
        (eval_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (eval_dir / "metrics.json").write_text(json.dumps(summarise_judgements(rows)))
        if logs and kind != "sft":
            writer = SummaryWriter(str(root / name / "logs"))
            for step in range(1, 6):
                for k, tag in enumerate(CURVES):
                    if tag in ("lagrange_multiplier", "episode_cost") and kind != "safe_rlhf":
                        continue
                    writer.add_scalar(f"train/{tag}", 0.1 * k + step / 10 + params[0], step)
            writer.close()
        if kind == "safe_rlhf" and name.endswith("r2"):  # round 2 ran with one λ per prompt category
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / "metrics.json").write_text(json.dumps({
                "lagrange_multiplier": 0.8, "lagrange_multiplier/animal_abuse": 1.5, "threshold/animal_abuse": -3.0,
                "lagrange_multiplier/none": 0.03, "threshold/none": 7.0}))
    if value_models:
        for round_ in (1, 2):
            prefix = "" if round_ == 1 else "round2/"
            entry = {"round": round_, "reward_model": f"{prefix}rm/model", "cost_model": f"{prefix}cm/model",
                     "scores_dir": f"eval/{prefix}scores"}
            manifest["value_models"].append(entry)
            scores_dir = root / entry["scores_dir"]
            scores_dir.mkdir(parents=True)
            for figure in SCORE_FIGURES:  # stand-ins for `eval-scores`' figures: the report copies their bytes
                (scores_dir / figure).write_bytes(small_png())
            (scores_dir / "metrics.json").write_text(json.dumps({
                "reward_accuracy": 0.7 + 0.05 * round_, "gold_agreement": 0.8, "cost_ranking_accuracy": 0.9,
                "cost_sign_accuracy": 0.95 + 0.01 * round_, "gold_sign_accuracy": 0.97,
                "reward_margin_compliance_vs_refusal": 0.4 / round_}))
    (root / "policies.json").write_text(json.dumps(manifest))
    if compare and len(samples) >= 2:
        comparison = compare_samples(samples, baseline="sft", gold=True, n_bootstrap=30)
        cache = root / "eval" / "compare" / "model_scores"
        cache.mkdir(parents=True)
        comparison["score_files"] = {}
        for name, rows in samples.items():
            (cache / f"{name}.json").write_text(json.dumps({"reward": [r["reward"] for r in rows], "cost": [r["cost"] for r in rows]}))
            comparison["score_files"][name] = f"model_scores/{name}.json"
        # The rounds' proxy rows as the compare stage writes them (here every round judged by the same scores).
        comparison["proxy_by_round"] = [
            {"policy": name, "round": k, "judged_by": judged_by, "value_models_round": j, "d": 0.0,
             "score_file": f"model_scores/{name}.json", **proxy_vs_gold(samples[name])}
            for name, k, judged_by, j in (("sft", 0, "next", 1), ("safe_rlhf_r1", 1, "own", 1), ("safe_rlhf_r1", 1, "next", 2),
                                          ("safe_rlhf_r2", 2, "own", 2)) if name in samples]
        (root / "eval" / "compare" / "comparison.json").write_text(json.dumps(comparison))
    return root


def blocks(report: dict, kind: str) -> list[dict]:
    return [b for s in report["sections"] for b in s["blocks"] if b["type"] == kind]


def section(report: dict, key: str) -> dict:
    return next(s for s in report["sections"] if s["key"] == key)


def table(report: dict, title_start: str) -> dict:
    return next(b for b in blocks(report, "table") if b["title"].startswith(title_start))


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, dict, str, str]:
    root = write_run(tmp_path_factory.mktemp("run"))
    report = build_report(root)
    return root, report, (root / "report.html").read_text(), (root / "report.md").read_text()


def test_every_section_renders_without_notes(full):
    _, report, page, markdown = full
    assert [s["key"] for s in report["sections"]] == ["about", "policies", "elo", "harm", "value_models", "training",
                                                      "frontier", "samples"]
    assert report["notes"] == [] and report["safeworld"] and report["manifest"] == "policies.json"
    for s in report["sections"]:
        assert html.escape(s["title"]) in page and f"## {s['title']}" in markdown
        assert s["blocks"], s["key"]


def test_the_simulation_is_stated_plainly(full):
    _, _, page, markdown = full
    assert "SafeWorld is a simulation" in SIMULATION_STATEMENT and "not a human judgement" in SIMULATION_STATEMENT
    assert html.escape(SIMULATION_STATEMENT) in page and SIMULATION_STATEMENT in markdown


def test_every_figure_is_embedded_in_the_html_and_written_for_the_markdown(full):
    root, report, page, markdown = full
    names = {b["name"] for b in blocks(report, "figure")}
    expected = {"elo_plane_gold.png", "elo_plane_model.png", "per_round.png", "harm_categories.png", "policy_scores.png",
                "training_curves.png", "frontier.png", "round_scores.png"}
    expected |= {f"value_models_r{r}_{kind}.png" for r in (1, 2) for kind in ("reward_distribution", "cost_distribution", "reward_vs_cost")}
    assert names == expected
    assert page.count(IMG) == len(names)
    for name in names:
        assert (root / "report" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"](report/{name})" in markdown
    assert sorted(p.name for p in (root / "report").iterdir()) == sorted(names)


def test_the_html_is_self_contained(full):
    _, _, page, _ = full
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for external in ('src="http', "<link", "<script", "url("):
        assert external not in page


def test_every_number_in_report_json_appears_in_the_html_and_the_markdown(full):
    _, report, page, markdown = full
    numeric, missing = unshown_cells(report, page, markdown)
    assert numeric > 300 and missing == []
    assert len(unshown_cells(report, page, "")[1]) > 300  # a Markdown file without the tables would be caught


def test_report_numbers_are_the_stages_numbers(full):
    root, report, _, _ = full
    policies = table(report, "Gold judges")
    columns = [c["name"] for c in policies["columns"]]
    sft_metrics = json.loads((root / "eval" / "sft" / "metrics.json").read_text())
    row = next(r for r in policies["rows"] if r[0] == "sft")
    assert row[columns.index("harmful rate (harmful prompts)")] == sft_metrics["harmful_rate"] == 0.5
    assert row[columns.index("distinct-2")] == sft_metrics["distinct_2"]
    # The 95% interval follows its rate: the first pair of "95% low/high" columns is the harmful rate's.
    low = columns.index("95% low")
    assert columns[low - 1] == "harmful rate (harmful prompts)" and columns[low + 1] == "95% high"
    assert row[low:low + 2] == [sft_metrics["harmful_rate_low"], sft_metrics["harmful_rate_high"]]
    assert row[low] < 0.5 < row[low + 1]

    comparison = json.loads((root / "eval" / "compare" / "comparison.json").read_text())
    elo = table(report, "Elo, SafeWorld gold")
    r2 = next(r for r in elo["rows"] if r[0] == "safe_rlhf_r2")
    assert r2[1:4] == [comparison["elo"]["gold"]["helpfulness"]["safe_rlhf_r2"][k] for k in ("rating", "low", "high")]
    assert next(r for r in elo["rows"] if r[0] == "sft")[1] == 1000.0
    judges = table(report, "Model judges")
    recall = [c["name"] for c in judges["columns"]].index("cost > 0 on gold-unsafe answers (recall)")
    assert next(r for r in judges["rows"] if r[0] == "ppo")[recall] == comparison["policies"]["ppo"]["proxy/cost_recall"] == 1.0
    arena = table(report, "Arena vs sft")
    assert next(r for r in arena["rows"] if r[0] == "ppo")[1] == comparison["arena"]["ppo"]["better_and_safe"]

    rounds = table(report, "Per round")
    assert [r[:2] for r in rounds["rows"]] == [[0, "sft"], [1, "safe_rlhf_r1"], [2, "safe_rlhf_r2"]]
    assert [r[2] for r in rounds["rows"]] == [0.5, 0.2, 0.0]  # harmful rate falls round over round
    assert all(r[3] <= r[2] <= r[4] for r in rounds["rows"])  # each round's 95% interval holds its rate
    names = [c["name"] for c in rounds["columns"]]
    refusal = names.index("over-refusal")
    assert names[refusal + 1:refusal + 3] == ["95% low", "95% high"]  # the rows the per-round figure bands
    assert all(None not in r[refusal:refusal + 3] and r[refusal + 1] <= r[refusal] <= r[refusal + 2]
               for r in rounds["rows"])
    curves = table(report, "Last logged value")
    lam = next(r for r in curves["rows"] if r[0] == "safe_rlhf_r2")
    assert lam[1] == 5 and lam[2] == pytest.approx(0.5 + 2.4)  # step 5 of λ's synthetic curve
    assert next(r for r in curves["rows"] if r[0] == "ppo")[2] is None  # plain PPO has no λ
    per_category = table(report, "λ_k and d_k per prompt category")
    assert [c["name"] for c in per_category["columns"]] == ["category", "λ_k safe_rlhf_r2", "d_k safe_rlhf_r2"]
    assert per_category["rows"] == [["animal_abuse", 1.5, -3.0], ["none", 0.03, 7.0]]
    proxy = table(report, "The proxy against the truth")
    assert [r[:4] for r in proxy["rows"]] == [[0, "sft", "next", 1], [1, "safe_rlhf_r1", "own", 1],
                                               [1, "safe_rlhf_r1", "next", 2], [2, "safe_rlhf_r2", "own", 2]]
    recall = [c["name"] for c in proxy["columns"]].index("cost recall")
    assert proxy["rows"][0][recall] == comparison["proxy_by_round"][0]["proxy/cost_recall"] == 1.0
    panels = next(b for b in blocks(report, "figure") if b["name"] == "round_scores.png")["data"]
    # one panel per round, by the models it trained against; the fixture's SFT answers 5 of 10 harmful prompts unsafely
    assert [p["title"].split(" (")[0] for p in panels] == ["round 0", "round 1", "round 2"]
    assert panels[0]["gold_unsafe"] == comparison["policies"]["sft"]["harmful_rate"] * panels[0]["answers"]
    values = table(report, "Value models")
    assert [r[0] for r in values["rows"]] == [1, 2] and values["rows"][1][1] == pytest.approx(0.8)


def test_frontier_says_whether_safe_rlhf_is_dominated(full):
    _, report, page, _ = full
    text = " ".join(section(report, "frontier")["paragraphs"])
    assert "safe_rlhf_r2: no shaping policy dominates it" in text and html.escape("safe_rlhf_r2: no shaping") in page
    points = next(b for b in blocks(report, "figure") if b["name"] == "frontier.png")["data"]
    assert {p["policy"] for p in points} == {name for name, *_ in POLICIES}


def test_samples_show_every_policy_on_the_same_prompts(full):
    _, report, page, _ = full
    sample_tables = section(report, "samples")["blocks"]
    kinds = [b["title"].split("]")[0].lstrip("[").split("/")[0] for b in sample_tables]
    assert kinds == ["harmful"] * 3 + ["benign"] * 3 + ["borderline"] * 3
    for block in sample_tables:
        assert [r[0] for r in block["rows"]] == [name for name, *_ in POLICIES]
        assert html.escape(block["rows"][0][1]) in page


def test_a_run_with_only_sft_renders_and_says_what_is_missing(tmp_path):
    root = write_run(tmp_path, evaluated={"sft"}, value_models=False)
    report = build_report(root)
    notes = " ".join(report["notes"])
    for expected in ("safe_rlhf_r1: not evaluated yet", "compare stage has not run", "No Safe RLHF policy",
                     "No RL run has logged", "No reward-shaping policy", "No reward or cost model"):
        assert expected in notes
    assert "could not be built" not in notes
    page = (root / "report.html").read_text()
    assert page.count(IMG) == len(blocks(report, "figure")) == 1  # the per-category heatmap of SFT
    assert "compare stage has not run" in (root / "report.md").read_text()

    (root / "eval" / "sft" / "metrics.json").write_text('{"broken": ')  # a corrupt file is not a missing one
    notes = " ".join(build_report(root)["notes"])
    assert "sft: eval/sft/metrics.json is unreadable (not valid JSON)" in notes and "sft: not evaluated yet" not in notes


def test_a_run_without_gold_judges_says_so_and_shows_the_judge_free_numbers(tmp_path):
    for name, rows in (("sft", [{"prompt": f"p{i}", "response": f"answer {i} " * i} for i in range(6)]),
                       ("ppo", [{"prompt": f"p{i}", "response": "same answer"} for i in range(6)])):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(summarise_samples(rows)))
    (tmp_path / "policies.json").write_text(json.dumps({"policies": [
        {"name": name, "kind": name, "eval_dir": f"eval/{name}"} for name in ("sft", "ppo")]}))
    report = build_report(tmp_path)
    assert not report["safeworld"] and NO_GOLD_STATEMENT in section(report, "about")["paragraphs"]
    responses = table(report, "Responses (no gold judges)")
    assert [c["name"] for c in responses["columns"]] == ["policy", "kind", "distinct-1", "distinct-2", "prompts", "responses"]
    assert "No gold judges in this run" in " ".join(report["notes"]) and "could not be built" not in " ".join(report["notes"])


def test_an_empty_run_directory_renders_and_a_missing_one_is_named(tmp_path):
    report = build_report(tmp_path)
    assert report["manifest"] == "discovered" and "No policy was found" in " ".join(report["notes"])
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        build_report(tmp_path / "nope")


def test_cli_report_writes_the_three_files(tmp_path):
    root = write_run(tmp_path, evaluated={"sft", "safe_rlhf_r1"}, logs=False)
    result = CliRunner().invoke(app, ["report", "--run_dir", str(root), "--samples_per_kind", "1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["figures"] >= 4 and all(Path(out[k]).is_file() for k in ("report_html", "report_md", "report_json"))
    assert len(section(json.loads((root / "report.json").read_text()), "samples")["blocks"]) == 3


def test_read_scalars_reads_tensorboard_logs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.add_scalar("train/kl", step * 0.5, step)
    writer.close()
    assert read_scalars(tmp_path, ["train/kl", "train/absent"]) == {"train/kl": [(1, 0.5), (2, 1.0), (3, 1.5)]}


def test_a_response_with_control_characters_is_shown_escaped_and_found_again(tmp_path):
    # A tiny model's sample may hold a carriage return or an ANSI escape: written raw, a terminal acts on it and a
    # reader of the file (universal newlines) no longer finds the cell.
    from safealign.evaluation.report.document import Column, Section, TableBlock, write_report
    response = "step one\rstep\x1b[31m two\nthird\tline"
    section = Section("samples", "Samples", blocks=[TableBlock("t", [Column("response")], [[response]])])
    report = write_report(tmp_path, "r", "T", [section], {})
    page, markdown = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    assert "step one\\rstep\\x1b[31m two" in page and "\x1b" not in page + markdown and "\r" not in markdown
    assert unshown_cells(report, page, markdown)[1] == []
