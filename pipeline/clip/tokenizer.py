"""A small CLIP-style tokenizer trained on captions with Hugging Face `tokenizers`.

Text handling as CLIP's tokenizer (NFC, whitespace folding, lower-case; words, single
digits and punctuation runs as pre-tokens), plus accent stripping; then BPE without the
byte-level alphabet: the vocabulary starts from the printable ASCII characters and a
word-start marker `\u2581` (anything else maps to `<|unk|>`), so every ASCII word can be
spelled. The marker is a prefix rather than CLIP's `</w>` suffix because the BPE trainer
assigns ids to suffixed characters in hash-map order (different in every process);
with a plain-character alphabet ids and merges are the same on every run.

Saved as `tokenizer.json` + `tokenizer_config.json`, so `AutoTokenizer.from_pretrained`
opens it like any checkpoint's tokenizer and adds `<|startoftext|>` ... `<|endoftext|>`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
SPECIALS = [PAD, UNK, BOS, EOS]  # ids 0..3; EOS must not be id 2 (transformers' legacy CLIP path)
MARK = "\u2581"  # word-start marker (as SentencePiece's)
# CLIP's pre-tokenizer pattern (openai/clip simple_tokenizer.py), minus the byte-level step.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
ALPHABET = sorted(set(string.ascii_lowercase + string.digits + string.punctuation + MARK))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 1
) -> Tokenizer:
    """Train a lower-case BPE tokenizer on `texts`; ids 0..3 are pad, unk, bos, eos."""
    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.Metaspace(replacement=MARK, prepend_scheme="always", split=False),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=MARK, prepend_scheme="always", split=False)
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path, context_length: int) -> None:
    """Write `tokenizer.json` + `tokenizer_config.json` loadable by `AutoTokenizer`."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(folder))
