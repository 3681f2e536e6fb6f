"""A small byte-level BPE tokenizer trained locally with ``tokenizers``.

Byte-level, so any text (code indentation, newlines) round-trips exactly. Special tokens
follow Llama's ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, plus ``<pad>`` 3. No BOS is added
when encoding: training and lm-eval both feed the plain prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: Path):
    """Train a BPE tokenizer on ``texts`` and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tokenizer.padding_side = "left"
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
