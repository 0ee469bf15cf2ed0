"""The built-in default model (kosmos2/assets/default): its layout and size, the README's main command, and a
quick accuracy check on 50 fresh scenes of the synthetic world it was trained on.

The full measurement is `kosmos2 eval synthetic` (≥ 1,000 queries per task, README "Built-in default model");
this check draws its 50 scenes from a seed that neither training nor the evaluation splits use, and scores
against the world's true boxes and answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kosmos2.eval.synthetic import GENERATION
from kosmos2.predictor import DEFAULT_MODEL_ENV, Predictor, default_model_dir

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "kosmos2" / "assets" / "default"
FRESH_SEED = 7_000_001  # not a training seed (0) nor an evaluation split's (1, 2)
# The quick check's floors: the full evaluation of the shipped model (README: test REC 0.981, plain VQA
# 0.937, REG 0.948 on 1,000 queries each) minus ~2.8 binomial standard deviations of a 50-query estimate
# (0.019 at p = 0.981, 0.034 at 0.937, 0.031 at 0.948), rounded down, so sampling noise alone fails the
# check about once in 400 draws while a broken model (REC by chance < 0.05) always does.
FLOORS = {"rec": 0.92, "vqa": 0.84, "reg": 0.86}


@pytest.fixture(scope="module")
def predictor(monkeypatch_module) -> Predictor:
    monkeypatch_module.delenv(DEFAULT_MODEL_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Predictor.from_pretrained()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_default_model_is_shipped_in_the_hugging_face_layout():
    files = {p.name for p in ASSET.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert name in files, name
    total = sum(p.stat().st_size for p in ASSET.iterdir())
    assert total <= 25 * 2**20, f"{total / 2**20:.1f} MB"
    config = json.loads((ASSET / "config.json").read_text())
    assert config["latent_query_num"] == 64
    assert config["vision_config"]["image_size"] == 128
    generation = json.loads((ASSET / "generation_config.json").read_text())
    assert generation["no_repeat_ngram_size"] == GENERATION["no_repeat_ngram_size"]


def test_no_path_means_the_shipped_model(predictor, monkeypatch):
    monkeypatch.delenv(DEFAULT_MODEL_ENV, raising=False)
    assert default_model_dir() == ASSET
    assert predictor.num_image_tokens == 64


def test_quick_accuracy_on_50_fresh_scenes(predictor):
    """Scored by kosmos2/eval/synthetic.py (through the training-time check, `world_scores`)."""
    from kosmos2.train.recipes.synthetic import world_scores

    results = world_scores(predictor, "test", 50, tasks=tuple(FLOORS), seed=FRESH_SEED, batch_size=50)
    for task, floor in FLOORS.items():
        assert results[task]["n"] == 50
        metric = "exact_match" if task == "reg" else "accuracy"
        assert results[task][metric] >= floor, (task, results)


def test_readme_main_command_grounds_the_example(tmp_path):
    """The README's command 1 after the install: a real `kosmos2` process, the shipped model, a PNG out."""
    out = tmp_path / "shapes-grounded.png"
    command = [sys.executable, "-m", "kosmos2.cli", "ground", str(ROOT / "examples" / "shapes.png")]
    env_free = {k: v for k, v in os.environ.items() if k != DEFAULT_MODEL_ENV}
    done = subprocess.run(
        command + ["--draw", str(out), "--json"], capture_output=True, text=True, timeout=120, env=env_free
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    from PIL import Image

    assert Image.open(out).size == Image.open(ROOT / "examples" / "shapes.png").size
    # against the scene's truth (examples/make_shapes.py): each of the three shapes is named with its colour
    # and boxed at IoU >= 0.5
    from kosmos2.grounding import iou

    spec = importlib.util.spec_from_file_location("make_shapes", ROOT / "examples" / "make_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scene = module.example_scene()
    assert len(result["entities"]) == len(scene.objects)
    for o in scene.objects:
        named = [e for e in result["entities"] if o.colour in e["phrase"] and o.shape in e["phrase"]]
        assert named, (o.words, result["caption"])
        boxes = [b for e in named for b in e["pixel_boxes"]]
        assert max(iou(b, o.box) for b in boxes) >= 0.5, (o.words, boxes, o.box)
