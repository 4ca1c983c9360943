"""A second, non-Qwen tokenizer folder for tests, trained in a second on a few sentences (no download)."""

from __future__ import annotations

from pathlib import Path

SENTENCES = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokens", "shards and models"]


def make_tiny_tokenizer(folder: Path, eos: str | None = "</s>") -> Path:
    """A byte-level BPE of 300 ids saved as a Hugging Face folder (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 5, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(str(folder))
    return folder
