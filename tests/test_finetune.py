"""Collation (loss on the target only, right padding, bad samples dropped), the vocabulary check, and
`kosmos2 finetune` end to end on a tiny checkpoint: HF-layout output Predictor loads, held-out evaluation,
JSONL log, resume equal to an uninterrupted run, LoRA merged or saved as an adapter, frozen parts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from kosmos2.checkpoint import load_pretrained
from kosmos2.data.sources import Report, Sample
from kosmos2.finetune_draft.collate import Collator, UnknownWordsError, check_vocabulary, unknown_words
from kosmos2.finetune_draft.finetune import FinetuneConfig, finetune
from kosmos2.predictor import Predictor, default_model_dir
from kosmos2.tokenizer import Kosmos2Tokenizer


def _png(path: Path, boxes: list[tuple[list[int], tuple[int, int, int]]]) -> Path:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    for (x, y, w, h), rgb in boxes:
        image.paste(rgb, (x, y, x + w, y + h))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """12 images with a red dog box and a blue cat box at random places (COCO instances.json)."""
    root = tmp_path_factory.mktemp("coco")
    rng = random.Random(0)
    images, anns = [], []
    for i in range(12):
        dog = [rng.randrange(0, 24), rng.randrange(0, 24), 20, 20]
        cat = [rng.randrange(32, 44), rng.randrange(32, 44), 20, 20]
        _png(root / "images" / f"{i}.png", [(dog, (220, 30, 30)), (cat, (30, 30, 220))])
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        anns += [
            {"id": 2 * i, "image_id": i, "category_id": 1, "bbox": dog, "iscrowd": 0},
            {"id": 2 * i + 1, "image_id": i, "category_id": 2, "bbox": cat, "iscrowd": 0},
        ]
    cats = [{"id": 1, "name": "red dog"}, {"id": 2, "name": "blue cat"}]
    (root / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return root


def _spec(root: Path) -> str:
    return f"coco:{root / 'instances.json'}:images={root / 'images'}:tasks=caption+rec"


# ------------------------------------------------------------------------------------------------------------
# Collation


def test_collate_learns_only_the_target_and_pads_right(kosmos2_tokenizer_dir, coco_dir):
    tok = Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)
    image = str(coco_dir / "images" / "0.png")
    target = "<object><patch_index_0000><patch_index_0231></object>"
    rec = Sample(image, "<grounding><phrase>the dog</phrase>", target, "rec", "r", image)
    caption = Sample(image, "<grounding>An image of", "a dog", "caption", "g", image)
    batch = Collator(tok, image_size=28)([rec, caption])
    assert batch.pixel_values.shape == (2, 3, 28, 28)
    # row 0: the target is 4 added tokens, looked up by name, then </s>
    learned = [
        tok.token_to_id(t) for t in ("<object>", "<patch_index_0000>", "<patch_index_0231>", "</object>")
    ]
    learned.append(tok.eos_id)
    ids, targets = batch.input_ids[0], batch.targets[0]
    n = int((ids != tok.pad_id).sum())
    prompt_end = n - 5  # the last prompt token predicts the first target token
    assert targets[prompt_end - 1 : n - 1].tolist() == learned
    assert (targets[: prompt_end - 1] == -100).all() and (targets[n - 1 :] == -100).all()
    assert ids[:2].tolist() == [tok.bos_id, tok.image_start_id] and batch.image_mask[0].sum() == 64
    # row 1: the target "a dog" + </s>; the shorter row is padded on the right with <pad>, no loss there
    target_ids = tok.encode("a dog") + [tok.eos_id]
    n1 = int((batch.input_ids[1] != tok.pad_id).sum())
    assert batch.targets[1][n1 - len(target_ids) - 1 : n1 - 1].tolist() == target_ids
    assert (batch.input_ids[1][n1:] == tok.pad_id).all() and (batch.targets[1][n1 - 1 :] == -100).all()
    assert batch.loss_tokens == 5 + len(target_ids)


def test_collate_drops_and_reports_unusable_samples(kosmos2_tokenizer_dir, coco_dir):
    tok = Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)
    report = Report()
    image = str(coco_dir / "images" / "0.png")
    good = Sample(image, "<grounding>", "a dog", "text", "file.jsonl line 1", image)
    broken = Sample(b"not an image", "<grounding>", "a dog", "text", "file.jsonl line 2", "x")
    long = Sample(image, "<grounding>", "dog " * 600, "text", "file.jsonl line 3", image)
    batch = Collator(tok, 28, max_length=512, report=report)([good, broken, long])
    assert batch.input_ids.shape[0] == 1
    assert [i["file"] for i in report.items] == ["file.jsonl line 2", "file.jsonl line 3"]
    assert (
        "image cannot be used" in report.items[0]["reason"]
        and "over the model's 512" in report.items[1]["reason"]
    )
    assert Collator(tok, 28, report=report)([broken]) is None


def test_words_the_default_model_cannot_encode_are_named_before_training():
    tok = Kosmos2Tokenizer.from_pretrained(default_model_dir())  # its 256 pieces have no "k" and no "x"
    samples = [
        Sample(
            "a.png", "<grounding><phrase>the blue checkbox</phrase>", "<object></object>", "rec", "w", "a"
        ),
        Sample("a.png", "<grounding>An image of", " a text field and a button.", "caption", "w", "a"),
    ]
    assert unknown_words(tok, samples) == ["checkbox", "text"]
    with pytest.raises(UnknownWordsError, match=r"'checkbox', 'text'.*characters it lacks: kx"):
        check_vocabulary(tok, samples, "default")
    check_vocabulary(tok, samples[:0] + [Sample("a.png", "<grounding>", "a blue button", "text", "w", "a")])


# ------------------------------------------------------------------------------------------------------------
# kosmos2 finetune end to end


def _cfg(checkpoint: Path, data: str, out: Path, **kw) -> FinetuneConfig:
    base = dict(model=str(checkpoint), data=[data], out=str(out), holdout=0.25, steps=4, batch_size=4)
    base.update(eval_every=2, eval_limit=2, save_every=2, threads=1, progress=False, lr=1e-3, warmup=1)
    return FinetuneConfig(**{**base, **kw})


def _state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "train_state.pt", weights_only=False)["params"]


def test_finetune_writes_the_hf_layout_logs_and_resumes_exactly(tiny_checkpoint_dir, coco_dir, tmp_path):
    result = finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), tmp_path / "a"))
    out = tmp_path / "a"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "log.jsonl",
        "eval.json",
        "finetune.json",
    ):
        assert (out / name).is_file(), name
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all("rec_acc" in e and "caption" in e for e in evals)
    assert result["best"]["step"] in (2, 4)
    predictor = Predictor.from_pretrained(out)  # the output loads unchanged
    assert predictor.tokenizer.vocab_size == Kosmos2Tokenizer.from_pretrained(tiny_checkpoint_dir).vocab_size

    # killed after step 2 (its state saved at step 2), then the same command again: equals the straight run
    finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), tmp_path / "b", steps=2))
    finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), tmp_path / "b"))
    straight, resumed = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name
    with pytest.raises(ValueError, match="different settings \\(lr\\)"):
        finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), tmp_path / "b", lr=5e-4))


def test_frozen_vision_and_connector_stay_as_they_were(tiny_checkpoint_dir, coco_dir, tmp_path):
    options = dict(
        steps=2, eval_every=100, freeze_vision=True, freeze_connector=True, grad_accum=2, holdout=0.0
    )
    cfg = _cfg(tiny_checkpoint_dir, _spec(coco_dir), tmp_path / "f", **options)
    finetune(cfg)
    before, after = (
        load_pretrained(tiny_checkpoint_dir).state_dict(),
        load_pretrained(tmp_path / "f").state_dict(),
    )
    frozen = [n for n in before if n.startswith(("vision_model.", "image_to_text_projection."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(
        before["text_model.model.layers.0.ffn.fc1.weight"], after["text_model.model.layers.0.ffn.fc1.weight"]
    )


def test_lora_run_merges_by_default_and_saves_the_adapter_on_request(tiny_checkpoint_dir, coco_dir, tmp_path):
    common = dict(steps=2, eval_every=100, holdout=0.0, lora=True, lora_rank=4, lora_alpha=8, lr=1e-2,
                  freeze_vision=True)  # fmt: skip
    finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), tmp_path / "merged", **common))
    before, after = (
        load_pretrained(tiny_checkpoint_dir).state_dict(),
        load_pretrained(tmp_path / "merged").state_dict(),
    )
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # LoRA on the attention projections of the decoder and the connector (vision frozen): only those weights
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"))
                           for n in changed)  # fmt: skip
    assert not any(n.startswith("vision_model.") for n in changed)

    finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), tmp_path / "adapter", save_adapter=True, **common))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "vision_model" not in config["target_modules"]


def test_cli_reports_unknown_words_in_one_line(tmp_path, capsys):
    from kosmos2.cli import main

    _png(tmp_path / "images" / "0.png", [([0, 0, 20, 20], (200, 0, 0))])
    phrases = [{"text": "a red checkbox", "boxes": [[0, 0, 20, 20]]}]
    record = {"image": "0.png", "caption": "a red checkbox", "phrases": phrases}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    code = main(["finetune", "--data", f"jsonl:{tmp_path / 'data.jsonl'}:images={tmp_path / 'images'}",
                 "--out", str(tmp_path / "out"), "--steps", "1", "--holdout", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "cannot encode 1 word(s) of the data: 'checkbox'" in err and "Traceback" not in err
