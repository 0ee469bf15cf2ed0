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
from kosmos2.predictor import Predictor, default_model_dir
from kosmos2.tokenizer import Kosmos2Tokenizer
from kosmos2.train.collate import Collator, UnknownWordsError, check_vocabulary, unknown_words
from kosmos2.train.finetune import FinetuneConfig, finetune


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
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    # row 0: the target is 4 added tokens, looked up by name, then </s>
    learned = [
        tok.token_to_id(t) for t in ("<object>", "<patch_index_0000>", "<patch_index_0231>", "</object>")
    ]
    learned.append(tok.eos_id)
    ids, targets = batch["input_ids"][0], batch["targets"][0]
    n = int((ids != tok.pad_id).sum())
    prompt_end = n - 5  # the last prompt token predicts the first target token
    assert targets[prompt_end - 1 : n - 1].tolist() == learned
    assert (targets[: prompt_end - 1] == -100).all() and (targets[n - 1 :] == -100).all()
    assert ids[:2].tolist() == [tok.bos_id, tok.image_start_id] and batch["image_mask"][0].sum() == 64
    # row 1: the target "a dog" + </s>; the shorter row is padded on the right with <pad>, no loss there
    target_ids = tok.encode("a dog") + [tok.eos_id]
    n1 = int((batch["input_ids"][1] != tok.pad_id).sum())
    assert batch["targets"][1][n1 - len(target_ids) - 1 : n1 - 1].tolist() == target_ids
    assert (batch["input_ids"][1][n1:] == tok.pad_id).all() and (batch["targets"][1][n1 - 1 :] == -100).all()
    assert int((batch["targets"] != -100).sum()) == 5 + len(target_ids)


def test_collate_drops_and_reports_unusable_samples(kosmos2_tokenizer_dir, coco_dir):
    tok = Kosmos2Tokenizer.from_pretrained(kosmos2_tokenizer_dir)
    report = Report()
    image = str(coco_dir / "images" / "0.png")
    good = Sample(image, "<grounding>", "a dog", "text", "file.jsonl line 1", image)
    broken = Sample(b"not an image", "<grounding>", "a dog", "text", "file.jsonl line 2", "x")
    long = Sample(image, "<grounding>", "dog " * 600, "text", "file.jsonl line 3", image)
    batch = Collator(tok, 28, max_length=512, report=report)([good, broken, long])
    assert batch["input_ids"].shape[0] == 1
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


def _cfg(checkpoint: Path, data: str, **kw) -> FinetuneConfig:
    base = dict(model=str(checkpoint), data=(data,), holdout=0.25, steps=4, batch_size=4, eval_every=2)
    base.update(eval_limit=2, checkpoint_every=2, log_every=1, lr=1e-3, warmup_steps=1)
    return FinetuneConfig(**{**base, **kw})


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def test_finetune_writes_the_hf_layout_logs_and_resumes_exactly(tiny_checkpoint_dir, coco_dir, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "a"
    result = finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir)), out, progress=False)
    for name in (
        "recipe.json",
        "checkpoint.pt",
        "log.jsonl",
        "eval.json",
        "model/config.json",
        "best/config.json",
    ):
        assert (out / name).is_file(), name
    for folder in ("model", "best"):
        assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {
            p.name for p in (out / folder).iterdir()
        }
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3, 4]
    evals = [e for e in events if "eval" in e]
    assert [e["step"] for e in evals] == [2, 4]
    assert all({"rec_acc", "caption_precision", "caption_recall", "score"} <= set(e["eval"]) for e in evals)
    assert result["best"]["step"] in (2, 4) and result["last"]["step"] == 4
    predictor = Predictor.from_pretrained(out / "best")  # the output loads unchanged
    assert predictor.tokenizer.vocab_size == Kosmos2Tokenizer.from_pretrained(tiny_checkpoint_dir).vocab_size

    # killed after step 2 (its checkpoint written), then the same command again: equals the straight run
    finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir)), tmp_path / "b", progress=False, stop_after=2)
    assert not (tmp_path / "b" / "model").exists()
    finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir)), tmp_path / "b", progress=False)
    straight, resumed = _weights(out), _weights(tmp_path / "b")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6), name
    with pytest.raises(ValueError, match="differs in \\['lr'\\]"):
        finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), lr=5e-4), tmp_path / "b", progress=False)


def test_frozen_vision_and_connector_stay_as_they_were(tiny_checkpoint_dir, coco_dir, tmp_path):
    frozen = ("vision_model", "image_to_text_projection")
    cfg = _cfg(
        tiny_checkpoint_dir, _spec(coco_dir), steps=2, eval_every=0, freeze=frozen, grad_accum=2, holdout=0.0
    )
    finetune(cfg, tmp_path / "f", progress=False)
    before = load_pretrained(tiny_checkpoint_dir).state_dict()
    after = load_pretrained(tmp_path / "f" / "model").state_dict()
    names = [n for n in before if n.startswith(frozen)]
    assert names and all(torch.equal(before[n], after[n]) for n in names)
    name = "text_model.model.layers.0.ffn.fc1.weight"
    assert not torch.equal(before[name], after[name])


def test_lora_run_merges_by_default_and_saves_the_adapter_on_request(tiny_checkpoint_dir, coco_dir, tmp_path):
    common = dict(steps=2, eval_every=0, holdout=0.0, lora=True, lora_rank=4, lora_alpha=8, lr=1e-2)
    common["freeze"] = ("vision_model",)
    finetune(_cfg(tiny_checkpoint_dir, _spec(coco_dir), **common), tmp_path / "merged", progress=False)
    before = load_pretrained(tiny_checkpoint_dir).state_dict()
    after = load_pretrained(tmp_path / "merged" / "model").state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # LoRA on the attention projections of the decoder and the connector (vision frozen): only those weights
    projections = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight")
    assert changed and all(n.endswith(projections) for n in changed)
    assert any(n.startswith("image_to_text_projection.") for n in changed)
    assert not any(n.startswith("vision_model.") for n in changed)

    cfg = _cfg(tiny_checkpoint_dir, _spec(coco_dir), save_adapter=True, **common)
    finetune(cfg, tmp_path / "adapter", progress=False)
    files = {p.name for p in (tmp_path / "adapter" / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    config = json.loads((tmp_path / "adapter" / "model" / "adapter_config.json").read_text())
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


def test_cli_finetune_lora_run_and_eval_only(tiny_checkpoint_dir, coco_dir, tmp_path, capsys):
    from kosmos2.cli import main

    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_checkpoint_dir), "--data", _spec(coco_dir), "--out", str(out)]
    args += [
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--eval-limit",
        "2",
        "--holdout",
        "0.25",
    ]
    args += ["--lora", "--lora-rank", "2", "--freeze-vision", "--set", "log_every=1", "--no-progress"]
    assert main(args) == 0
    assert f"wrote {out / 'best'}" in capsys.readouterr().out
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["lora"] and saved["freeze"] == ["vision_model"] and saved["lora_rank"] == 2
    code = main(
        ["finetune", "--eval-only", "--model", str(out / "best"), "--data", _spec(coco_dir)]
        + ["--eval-limit", "2"]
    )
    assert code == 0 and "REC Acc@0.5" in capsys.readouterr().out
