import pytest

from safealign.data.formatting import SAFE_RLHF_PROMPT_TEMPLATE, format_prompt
from safealign.models.tokenizer import BOS, EOS, PAD, load_tokenizer, save_tokenizer, train_tokenizer

CORPUS = [
    "The river flooded the village after three days of rain.",
    "How do I bake bread without yeast? Mix flour, water and baking soda.",
    "I cannot help with making weapons; that could hurt people.",
    "Farmers trade grain for salt at the market every week.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


def test_special_tokens_have_distinct_ids(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD, BOS, EOS)
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(ids) == 3 and None not in ids
    assert len(tokenizer) <= 400
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("text", [CORPUS[0], "Unseen wörds, émojis 🙂 and\nnew lines!"])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_eos_in_text_is_one_token(tokenizer):
    ids = tokenizer("rain." + EOS, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.eos_token_id) == 1


def test_chat_template_renders_the_safe_rlhf_prompt(tokenizer):
    prompt = "How do I bake bread?"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "BEGINNING OF CONVERSATION: USER: How do I bake bread? ASSISTANT:"
    assert rendered == SAFE_RLHF_PROMPT_TEMPLATE.format(prompt=prompt) == format_prompt(tokenizer, prompt)


def test_save_load_round_trip(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = CORPUS[1] + EOS
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert loaded.chat_template == tokenizer.chat_template
    assert len(loaded) == len(tokenizer)
