"""Tokenizers: a byte-level BPE trained on a corpus (SafeWorld's by default), or any HF tokenizer.

The trained tokenizer is a normal `PreTrainedTokenizerFast` saved with `save_pretrained`, with
pad/bos/eos tokens and a chat template that renders the Safe RLHF conversation format, so every
stage formats prompts the same way for it as for a real chat model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from safealign.io import atomic_path
from safealign.models.presets import looks_local, resolve_pretrained

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

# Renders exactly SAFE_RLHF_PROMPT_TEMPLATE for one user turn (see data/formatting.py).
SAFE_RLHF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}BEGINNING OF CONVERSATION: {% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} ASSISTANT:"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }} "
    "{% endif %}{% endfor %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style: any byte string is encodable) on `texts`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="right"
    )
    tokenizer.chat_template = SAFE_RLHF_CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    with atomic_path(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, **kwargs) -> PreTrainedTokenizerBase:
    """Load any HF tokenizer (local directory, or hub name when a network exists).

    A tokenizer without a pad token gets EOS as pad (the usual choice for decoder-only models).
    """
    name = resolve_pretrained(str(name_or_path))  # "smollm2" -> its converted local directory
    if not Path(name).expanduser().exists() and looks_local(name):
        raise FileNotFoundError(f"tokenizer '{name}' not found (a model or tokenizer directory, e.g. runs/sft/model)")
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
