"""The CLIP's token table: written once into the CLIP folder, read back for any CLIP."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_clip import make_tiny_clip

from pipeline.clip.backbone import load_backbone, weights_sha256
from pipeline.clip.token_table import clip_token_table, save_token_table, table_sha256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_a_plain_folder_gives_the_checkpoint_table(tiny):
    bb = load_backbone(tiny)
    table = clip_token_table(tiny)
    assert torch.equal(table.weight, bb.token_embedding()) and table.revision == bb.revision
    assert table.sha256 == table_sha256(bb.token_embedding())


def test_the_saved_table_is_read_back_and_leaves_the_revision(tiny, tmp_path):
    folder = shutil.copytree(tiny, tmp_path / "clip")
    bb = load_backbone(folder)
    save_token_table(folder, bb)
    assert weights_sha256(folder) == weights_sha256(tiny) == load_backbone(folder).revision
    table = clip_token_table(folder)
    assert torch.equal(table.weight, bb.token_embedding()) and table.revision == bb.revision
    # an unreadable table file: the table comes from the checkpoint again
    (folder / "token_embedding.safetensors").write_bytes(b"not a table")
    assert torch.equal(clip_token_table(folder).weight, bb.token_embedding())


def test_the_fingerprint_is_of_the_values():
    a = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert table_sha256(a) == table_sha256(a.clone()) == table_sha256(a.double())
    assert table_sha256(a).startswith("sha256:") and table_sha256(a) != table_sha256(a + 1e-3)
