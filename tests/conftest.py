"""Shared pytest fixtures. Each fixture builds what it needs at run time (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kosmos2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Kosmos-2 tokenizer directory in the checkpoint layout.

    `sentencepiece.bpe.model` (a 700-piece SentencePiece BPE trained on test captions), `tokenizer.json` built
    from it as transformers 4.x did, `tokenizer_config.json`, `special_tokens_map.json`. Fairseq ids with the
    Kosmos-2 layout after the 700 pieces: `<mask>` 701, `<image>` 703, `</image>` 704, `<phrase>` 707,
    `<grounding>` 712, `<patch_index_0000>` 713, vocabulary 1737. Load it with
    `kosmos2.tokenizer.Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)`.
    """
    from _tokenizer_fixtures import write_checkpoint_tokenizer

    return write_checkpoint_tokenizer(tmp_path_factory.mktemp("kosmos2_tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory, kosmos2_tokenizer_dir: Path) -> Path:
    """A complete checkpoint directory: the `tiny` random model sized to the test tokenizer, plus its files.

    Loadable by `kosmos2.Predictor.from_pretrained` and by transformers. Tests must not modify it.
    """
    import shutil

    from _model_fixtures import tiny_config, write_tiny_checkpoint

    from kosmos2.tokenizer import Kosmos2Tokenizer

    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    vocab = Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir).vocab_size
    write_tiny_checkpoint(directory, tiny_config(vocab), seed=3)
    for f in kosmos2_tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)
    return directory
