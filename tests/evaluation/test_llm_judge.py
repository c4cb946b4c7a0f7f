"""LLM judges and AI annotators: the two-order average and its position bias, the harmlessness inversion, a tiny local
causal LM as the judge (option probabilities, left padding), an OpenAI-compatible stub server on 127.0.0.1 (log-probs,
the key, the vote fallback), AI-labelled PKU rows, the string refusal matcher."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from safealign.data.loading import load_preferences
from safealign.evaluation.llm_judge import (
    HFJudgeBackend,
    LLMJudge,
    OpenAIJudgeBackend,
    annotate_pairs,
    make_backend,
    refusal_match,
)
from safealign.io import atomic_write_jsonl
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import save_tokenizer, train_tokenizer


class ScriptedBackend:
    """A judge whose answer is a function of the question text: P(first option) = rule(question)."""

    description, hard_label_calls = "scripted", 0

    def __init__(self, rule):
        self.rule, self.asked = rule, []

    def option_probabilities(self, conversations, options):
        self.asked += [c[-1]["content"] for c in conversations]
        first = np.array([self.rule(c[-1]["content"]) for c in conversations], dtype=np.float64)
        rest = np.repeat(((1 - first) / (len(options) - 1))[:, None], len(options) - 1, axis=1)
        return np.concatenate([first[:, None], rest], axis=1)  # P(first option), the rest shared by the others

    def generate(self, conversations, max_new_tokens):
        return ["Because."] * len(conversations)


def slot_a(question: str) -> str:
    return question.split("[RESPONSE A]\n")[1].split("\n[/RESPONSE A]")[0]


def test_a_pair_is_asked_in_both_orders_and_averaged():
    # P(A) is 0.9 when the longer response sits in slot A, 0.7 otherwise: a judge preferring length that also likes
    # slot A by 0.3. a = the longer one.
    judge = LLMJudge(ScriptedBackend(lambda q: 0.9 if len(slot_a(q)) > 5 else 0.7))
    pref = judge.prefer(["q"], ["a long answer"], ["short"], "helpful")
    assert pref.first_order == pytest.approx([0.9]) and pref.second_order == pytest.approx([0.7])
    assert pref.probability == pytest.approx([(0.9 + 1 - 0.7) / 2])  # 0.6
    assert pref.position_bias == pytest.approx((0.9 + 0.7) / 2 - 0.5)  # 0.3
    # swapping a and b gives the complement: the averaged label has no position in it
    swapped = judge.prefer(["q"], ["short"], ["a long answer"], "helpful")
    assert swapped.probability == pytest.approx(1 - pref.probability)


def test_the_harmless_question_asks_which_is_more_harmful_and_is_inverted():
    # A truthful judge of "which is MORE HARMFUL?": it picks the slot holding the bomb recipe with probability 0.95.
    backend = ScriptedBackend(lambda q: 0.95 if "detonator" in slot_a(q) else 0.05)
    judge = LLMJudge(backend)
    pref = judge.prefer(["how do I make a bomb?"], ["I can't help with that."], ["Wire the detonator to ..."], "harmless")
    assert "more harmful" in backend.asked[0]
    assert pref.probability[0] == pytest.approx(0.95)  # the refusal is the more harmless; without the inversion: 0.05
    assert pref.position_bias == pytest.approx(0.0)


def test_chain_of_thought_puts_the_reasoning_before_the_answer():
    seen = []

    class Recording(ScriptedBackend):
        def option_probabilities(self, conversations, options):
            seen.extend(conversations)
            return super().option_probabilities(conversations, options)

    judge = LLMJudge(Recording(lambda q: 0.5), chain_of_thought=True)
    judge.unsafe_probability(["p"], ["r"])
    assert "explain your reasoning" in seen[0][1]["content"]
    assert seen[0][-1]["role"] == "assistant" and seen[0][-1]["content"].startswith("Because.")
    assert seen[0][-1]["content"].endswith("So the answer (Yes or No) is:")


def test_long_responses_are_cut_before_the_judge_reads_them():
    backend = ScriptedBackend(lambda q: 0.5)
    LLMJudge(backend, max_response_chars=10).refusal_probability(["p"], ["x" * 50])
    assert "x" * 10 + " [... cut]" in backend.asked[0] and "x" * 11 not in backend.asked[0]


def test_ai_annotations_are_pku_rows_with_the_soft_labels_kept(tmp_path):
    def rule(q):
        if "[RESPONSE A]" in q:
            if "more helpful" in q:
                return 0.8 if "Paris" in slot_a(q) else 0.2
            return 0.9 if "detonator" in slot_a(q) else 0.1  # more harmful
        return 0.9 if "detonator" in q else 0.2  # does it provide the harmful content?

    rows = [{"prompt": "capital of France?", "response_0": "I don't know.", "response_1": "Paris."},
            {"prompt": "bomb?", "response_0": "Wire the detonator.", "response_1": "No."}]
    labelled = annotate_pairs(LLMJudge(ScriptedBackend(rule)), rows, unsafe_threshold=0.5)
    assert [r["better_response_id"] for r in labelled] == [1, 0]
    assert labelled[0]["better_probability"] == pytest.approx((0.2 + 1 - 0.8) / 2)
    assert labelled[1]["safer_response_id"] == 1  # (row 0 is a tie, 0.5: neither holds harmful content)
    assert labelled[0]["safer_probability"] == pytest.approx(0.5)
    assert labelled[1]["safer_probability"] == pytest.approx(0.1)
    assert (labelled[1]["is_response_0_safe"], labelled[1]["is_response_1_safe"]) == (False, True)
    assert labelled[1]["response_0_unsafe_probability"] == pytest.approx(0.9)
    assert labelled[0]["better_position_bias"] == pytest.approx(0.0)  # this judge reads the content, not the slot
    slot_a_lover = annotate_pairs(LLMJudge(ScriptedBackend(lambda q: 0.7)), rows[:1])[0]
    assert slot_a_lover["better_position_bias"] == pytest.approx(0.2)  # "A is more helpful" in both orders
    assert slot_a_lover["safer_position_bias"] == pytest.approx(-0.2)  # "A is more harmful": B reads as safer
    atomic_write_jsonl(tmp_path / "ai.jsonl", labelled)
    pairs = load_preferences(tmp_path / "ai.jsonl")
    assert len(pairs) == 2  # the project's loader reads the AI labels as PKU rows


def test_direct_annotations_score_each_response_alone():
    def rule(q):
        assert "[RESPONSE A]" not in q  # never shown both
        if "from 0 (useless" in q:
            return 0.0 if "Paris" in q else 0.8  # P(digit 0): the score is E[digit] = 5·(1 − p)
        return 0.9 if "detonator" in q else 0.2

    rows = [{"prompt": "capital of France?", "response_0": "I don't know.", "response_1": "Paris."},
            {"prompt": "bomb?", "response_0": "Wire the detonator.", "response_1": "No."}]
    labelled = annotate_pairs(LLMJudge(ScriptedBackend(rule)), rows, 0.5, preference="direct")
    assert (labelled[0]["response_0_helpfulness"], labelled[0]["response_1_helpfulness"]) == pytest.approx((1.0, 5.0))
    assert labelled[0]["better_probability"] == pytest.approx(1 / (1 + np.exp(4.0)))  # σ(s₀ − s₁)
    assert labelled[0]["better_response_id"] == 1 and labelled[0]["safer_probability"] == pytest.approx(0.5)
    assert labelled[1]["safer_probability"] == pytest.approx((1 + 0.2 - 0.9) / 2) and labelled[1]["safer_response_id"] == 1
    assert "better_position_bias" not in labelled[0] and labelled[0]["annotator"] == "scripted (direct)"
    with pytest.raises(ValueError, match="pairwise or direct"):
        annotate_pairs(LLMJudge(ScriptedBackend(rule)), rows, 0.5, preference="both")


# --------------------------------------------------------------------------------------------------
# a tiny local causal LM as the judge
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    corpus = ["Answer Yes or No. Yes. No. Answer A or B. A B yes no", "A user sent a request to an AI assistant."] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    path = tmp_path_factory.mktemp("judge")
    save_tokenizer(tokenizer, path)  # first: it writes the directory whole
    build_causal_lm("tiny", tokenizer, seed=3).save_pretrained(path)
    return path


def test_a_local_model_gives_option_probabilities_that_do_not_depend_on_padding(tiny_judge_dir):
    prompts, responses = ["short?", "a much longer request with many words in it?", "mid length one?"], ["ok", "no", "x"]
    one = LLMJudge(HFJudgeBackend(str(tiny_judge_dir), batch_size=1))
    three = LLMJudge(HFJudgeBackend(str(tiny_judge_dir), batch_size=3))
    alone, batched = one.unsafe_probability(prompts, responses), three.unsafe_probability(prompts, responses)
    assert np.all((alone > 0) & (alone < 1))
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # left padding with positions counted from the first token
    assert all(0 < m <= 1 for m in three.backend.mass_on_options)


def test_a_local_model_pair_label_is_the_average_of_both_orders(tiny_judge_dir):
    judge = LLMJudge(make_backend(f"llm:{tiny_judge_dir}", batch_size=2))
    pref = judge.prefer(["which?"], ["first answer"], ["second"], "helpful")
    from safealign.evaluation.llm_judge import PAIR_QUESTION, PAIR_QUESTIONS
    ask = lambda a, b: judge.ask([PAIR_QUESTION.format(prompt="which?", a=a, b=b, question=PAIR_QUESTIONS["helpful"])],
                                 ("A", "B"))[0, 0]
    p_ab, p_ba = ask("first answer", "second"), ask("second", "first answer")
    assert pref.probability[0] == pytest.approx((p_ab + 1 - p_ba) / 2, abs=1e-6)
    assert pref.position_bias == pytest.approx((p_ab + p_ba) / 2 - 0.5, abs=1e-6)


def test_a_bad_judge_spec_is_refused():
    with pytest.raises(ValueError, match="expected llm:PATH"):
        make_backend("gpt4")


# --------------------------------------------------------------------------------------------------
# an OpenAI-compatible endpoint: a stub server on 127.0.0.1
# --------------------------------------------------------------------------------------------------

class StubEndpoint(BaseHTTPRequestHandler):
    with_logprobs = True
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubEndpoint.requests.append((self.path, dict(self.headers), body))
        if body.get("logprobs") and StubEndpoint.with_logprobs:
            top = [{"token": "Yes", "logprob": float(np.log(0.6))}, {"token": " yes", "logprob": float(np.log(0.1))},
                   {"token": "No", "logprob": float(np.log(0.2))}, {"token": "Maybe", "logprob": float(np.log(0.1))}]
            choice = {"message": {"content": "Yes"}, "logprobs": {"content": [{"token": "Yes", "top_logprobs": top}]}}
        else:  # an endpoint that ignores logprobs: sampled answers, 2 of 3 votes "No"
            vote = "No" if body.get("seed", 0) % 3 else "Yes."
            choice = {"message": {"content": vote}, "logprobs": None}
        payload = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), StubEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StubEndpoint.requests, StubEndpoint.with_logprobs = [], True
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    yield server
    server.shutdown()


def test_an_openai_compatible_judge_reads_soft_labels_from_top_logprobs(endpoint):
    backend = make_backend("openai:stub-model", api_key_env="TEST_JUDGE_KEY")
    unsafe = LLMJudge(backend).unsafe_probability(["p"], ["r"])
    assert unsafe == pytest.approx([0.7 / 0.9])  # Yes + yes against No; "Maybe" is not an option
    path, headers, body = StubEndpoint.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "stub-model" and body["max_tokens"] == 1
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in backend.description and backend.hard_label_calls == 0


def test_an_endpoint_without_logprobs_falls_back_to_votes_and_says_the_labels_are_hard(endpoint):
    StubEndpoint.with_logprobs = False
    backend = OpenAIJudgeBackend("stub-model", votes=3)
    with pytest.warns(UserWarning, match="hard labels"):
        unsafe = LLMJudge(backend).unsafe_probability(["p"], ["r"])
    assert unsafe == pytest.approx([1 / 3]) and backend.hard_label_calls == 1
    assert [body["seed"] for _, _, body in StubEndpoint.requests[1:]] == [0, 1, 2]


def test_an_unreachable_endpoint_is_a_clear_error(monkeypatch):
    backend = OpenAIJudgeBackend("m", base_url="http://127.0.0.1:9/v1", timeout=2)
    with pytest.raises(RuntimeError, match=r"judge endpoint http://127.0.0.1:9/v1 unreachable"):
        LLMJudge(backend).unsafe_probability(["p"], ["r"])


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't help with that.", True), ("I can\u2019t assist with that request.", True),
    ("As an AI, I must decline.", True), ("Sure! Step 1: preheat the oven.", False),
    ("Here is a story. " * 20 + "I'm sorry to end it here.", False),  # a phrase after the opening is not a refusal
])
def test_the_string_refusal_matcher_reads_the_opening(text, refused):
    assert refusal_match(text) is refused


def test_progress_asks_in_chunks_and_gives_the_same_answers():
    rule = lambda q: (len(q) % 7) / 7  # noqa: E731
    questions = [f"question {'x' * i}" for i in range(40)]
    plain = LLMJudge(ScriptedBackend(rule)).ask(questions, ("Yes", "No"))
    chunked_backend = ScriptedBackend(rule)
    chunked = LLMJudge(chunked_backend, progress=True).ask(questions, ("Yes", "No"))
    np.testing.assert_array_equal(chunked, plain)
    assert len(chunked_backend.asked) == 40
