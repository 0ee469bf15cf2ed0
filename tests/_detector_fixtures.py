"""Tiny random-weight Grounding DINO and OWLv2 directories for the detector and GRIT tests.

Each builder makes the model from a small config through the real transformers classes, builds its tokenizer
and image processor locally (no hub), and saves all of it with save_pretrained, the layout the detectors load.
"""

from __future__ import annotations

from pathlib import Path

WORDS = "a an the dog dogs cat man woman red ball grass field on in of with park frisbee sits runs".split()


def _bert_vocab() -> dict[str, int]:
    """A WordPiece vocabulary with BERT's ids for the tokens Grounding DINO treats specially.

    Grounding DINO splits its prompt at ids 101 ([CLS]), 102 ([SEP]), 1012 (".") and 1029 ("?"), hard-coded
    for BERT's vocabulary, so the tiny vocabulary keeps those ids.
    """
    vocab = {"[PAD]": 0}
    vocab.update({f"[unused{i}]": i for i in range(1, 100)})
    vocab.update({"[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
    for word in list("abcdefghijklmnopqrstuvwxyz") + [w for w in WORDS if len(w) > 1]:
        vocab[word] = len(vocab)
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab["##" + letter] = len(vocab)
    while len(vocab) < 1012:
        vocab[f"[unused{len(vocab)}]"] = len(vocab)
    vocab["."] = 1012
    while len(vocab) < 1029:
        vocab[f"[unused{len(vocab)}]"] = len(vocab)
    vocab["?"] = 1029
    vocab[","] = 1030
    vocab["'"] = 1031
    return vocab


def build_grounding_dino(directory: Path, seed: int = 0) -> Path:
    """Save a ~0.2M-parameter random Grounding DINO with its processor to `directory`."""
    import torch
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
    )

    vocab = _bert_vocab()
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "image_size": 64,
            "patch_size": 4,
            "embed_dim": 8,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 1, 1],
            "window_size": 4,
            "out_features": ["stage2", "stage3", "stage4"],
            "out_indices": [2, 3, 4],
        },
        text_config={
            "model_type": "bert",
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 64,
        },
        d_model=32,  # GroupNorm(32, d_model) in the input projections needs a multiple of 32
        encoder_layers=1,
        decoder_layers=2,  # the shared box head needs two decoder layers to tie
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=24,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=BertTokenizer(vocab=vocab),
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary in CLIP's layout (every byte, with and without `</w>`) and a few merges."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):  # GPT-2's byte -> unicode table
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def build_owlv2(directory: Path, seed: int = 0) -> Path:
    """Save a ~0.1M-parameter random OWLv2 (64-pixel input, 16 patches) with its processor to `directory`."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
    )

    vocab, merges = _clip_bpe()
    eos = vocab["<|endoftext|>"]
    config = Owlv2Config(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": 64, "width": 64}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16),
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
