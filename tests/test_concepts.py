"""The concept vocabulary of the training captions and each caption row's concept targets."""

import torch

from pipeline.caption.concepts import ConceptIndex, concept_vocabulary

BOS, EOS, PAD = 1, 2, 0


def test_vocabulary_counts_images_not_rows_and_drops_the_rare_and_the_everywhere():
    # 12 images: token 10 in all (a stop word), the pair (11, 12) in 6 (half: kept), token
    # 13 in 5, token 14 in 4 (too rare: MIN_IMAGES 5) although one image says it 9 times
    rows = []
    for img in range(12):
        toks = [10] + ([11, 12] if img < 6 else [13] if img < 11 else [14])
        rows.append((img, [BOS, *toks, EOS]))
    rows += [(11, [BOS, 14, EOS])] * 8 + [(img, [BOS, 14, EOS]) for img in (0, 1, 2)]
    vocab = concept_vocabulary(rows, 10, special=(BOS, EOS, PAD))
    # by images, most first, ties in id order; (10,) in all 12 and (10, 11) in 6 kept
    assert vocab == [(10, 11), (11,), (11, 12), (12,), (10, 13), (13,)]
    assert concept_vocabulary(rows, 2, special=(BOS, EOS, PAD)) == [(10, 11), (11,)]


def test_targets_mark_the_unigrams_and_bigrams_a_row_holds():
    ngrams = [(5,), (5, 6), (7,), (6, 5)]
    index = ConceptIndex(ngrams, vocab_size=9, k=6)
    ids = torch.tensor([[BOS, 5, 6, EOS, PAD], [BOS, 6, 5, 7, EOS], [BOS, 8, EOS, PAD, PAD]])
    want = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert torch.equal(index(ids), want.float())
