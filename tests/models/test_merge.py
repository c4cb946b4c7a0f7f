"""`safealign merge` (models/merge.py): P-SACPO's linear merge of policies, tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from safealign.config import ConfigError
from safealign.models.merge import MergeConfig, merge_state_dicts, run
from safealign.models.presets import build_causal_lm
from safealign.models.tokenizer import train_tokenizer


def _policy(tmp_path, name: str, seed: int, tokenizer) -> str:
    path = tmp_path / name
    model = build_causal_lm("tiny", tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_merge_is_the_weighted_sum_of_every_tensor(tmp_path):
    tokenizer = train_tokenizer(["two policies to merge"] * 10, vocab_size=280)
    a, b = _policy(tmp_path, "a", 0, tokenizer), _policy(tmp_path, "b", 1, tokenizer)
    metrics = run(MergeConfig(models=[a, b], weights=[0.75, 0.25], output_dir=str(tmp_path / "merged")))
    merged, pa, pb = (build_causal_lm(p).state_dict() for p in (str(tmp_path / "merged" / "model"), a, b))
    assert merged.keys() == pa.keys()
    for key in pa:
        assert torch.allclose(merged[key], 0.75 * pa[key] + 0.25 * pb[key], atol=1e-6), key
    assert not torch.equal(merged["model.embed_tokens.weight"], pa["model.embed_tokens.weight"])
    assert metrics["weights"] == [0.75, 0.25] and (tmp_path / "merged" / "config.yaml").is_file()


def test_merge_refuses_bad_weights_and_other_architectures():
    with pytest.raises(ConfigError, match="sum to"):
        MergeConfig(models=["a", "b"], weights=[0.5, 0.6])
    with pytest.raises(ConfigError, match="one weight each"):
        MergeConfig(models=["a", "b"], weights=[1.0])
    with pytest.raises(ConfigError, match="shape"):
        merge_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [0.5, 0.5], ["a", "b"])
    with pytest.raises(ConfigError, match="tensors"):
        merge_state_dicts([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [0.5, 0.5], ["a", "b"])
