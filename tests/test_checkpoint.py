"""Tests of kosmos2.checkpoint: the Hugging Face layouts, dtype on load, errors, saving, original conversion.

References: the `safetensors` library reading what we write, transformers loading what we write, original
release names produced by a hand-written inverse of the SPEC §7 table (per name prefix, not by reversing the
substring table), and peak RSS measured in a fresh process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _model_fixtures import image_prompt, random_model, tiny_config
from safetensors.torch import load_file, save_file

from kosmos2.checkpoint import (
    EMBED_NAME,
    LM_HEAD_NAME,
    convert_original,
    load_pretrained,
    save_pretrained,
)
from kosmos2.config import Kosmos2Config, TextConfig, VisionConfig
from kosmos2.model import Kosmos2

ROOT = Path(__file__).resolve().parents[1]


def _run(model) -> torch.Tensor:
    ids, mask = image_prompt([64012, 10, 20, 64007, 30, 64008, 64009, 64013 + 5, 64013 + 900, 64010])
    s = model.config.vision.image_size
    pixels = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(torch.tensor([ids]), pixel_values=pixels, image_mask=torch.tensor([mask]))[0].float()


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=11)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("saved")
    save_pretrained(model, directory)
    return directory


# -- layouts -----------------------------------------------------------------------------------------------


def test_save_writes_the_hf_layout(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "kosmos-2" and config["text_config"]["embed_dim"] == 64
    generation = json.loads((saved / "generation_config.json").read_text())
    assert generation["no_repeat_ngram_size"] == 3 and generation["eos_token_id"] == 2
    assert not generation["do_sample"] and generation["num_beams"] == 1
    # the safetensors library reads it; the tied head is not written
    tensors = load_file(saved / "model.safetensors")
    assert LM_HEAD_NAME not in tensors
    state = model.state_dict()
    assert set(tensors) == set(state) - {LM_HEAD_NAME}
    for name, t in tensors.items():
        assert torch.equal(t, state[name]), name


def test_single_file_round_trip(model, saved):
    loaded = load_pretrained(saved)
    assert not loaded.training
    assert loaded.text_model.lm_head.weight is loaded.text_model.model.embed_tokens.weight
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.parameters())
    _assert_same_weights(model, loaded)
    assert torch.equal(_run(model), _run(loaded))
    # saving what was loaded (mmap-backed) over its own directory is safe: files are renamed into place
    save_pretrained(loaded, saved)
    _assert_same_weights(model, load_pretrained(saved))


def test_sharded_safetensors_with_index(model, saved, tmp_path):
    state = {n: t for n, t in model.state_dict().items() if n != LM_HEAD_NAME}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: state[n].contiguous() for n in part}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in shards.items() for n in part}
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    _assert_same_weights(model, load_pretrained(tmp_path))


def test_pytorch_model_bin_with_tied_head_present(model, saved, tmp_path):
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # includes lm_head (shares the embedding)
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    loaded = load_pretrained(tmp_path)
    _assert_same_weights(model, loaded)
    assert loaded.text_model.lm_head.weight is loaded.text_model.model.embed_tokens.weight


def test_bfloat16_on_load(model, saved):
    loaded = load_pretrained(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    state = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, state[name].to(torch.bfloat16)), name
    assert loaded.text_model.lm_head.weight is loaded.text_model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="floating point"):
        load_pretrained(saved, dtype=torch.int64)


def test_bfloat16_file_to_float32(model, tmp_path):
    save_pretrained(copy.deepcopy(model).to(torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    for name, t in loaded.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, model.state_dict()[name].to(torch.bfloat16).float()), name


# -- errors ------------------------------------------------------------------------------------------------


def _with_state(saved: Path, tmp_path: Path, edit) -> Path:
    state = load_file(saved / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_named(saved, tmp_path):
    name = "text_model.model.layers.1.ffn.ffn_layernorm.bias"
    directory = _with_state(saved, tmp_path, lambda s: s.pop(name))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): " + name.replace(".", r"\.")):
        load_pretrained(directory)


def test_unexpected_tensor_is_named(saved, tmp_path):
    directory = _with_state(
        saved, tmp_path, lambda s: s.update({"text_model.model.extra.weight": torch.zeros(3)})
    )
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): text_model\.model\.extra\.weight"):
        load_pretrained(directory)


def test_misshaped_tensor_is_named(saved, tmp_path):
    name = "image_to_text_projection.latent_query"
    directory = _with_state(saved, tmp_path, lambda s: s.update({name: torch.zeros(32, 64)}))
    with pytest.raises(
        ValueError, match=r"image_to_text_projection\.latent_query: file \[32, 64\], model \[64, 64\]"
    ):
        load_pretrained(directory)


def test_missing_files_and_bad_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        load_pretrained(tmp_path)


# -- the original release ----------------------------------------------------------------------------------


def _original_name(hf: str) -> str:
    """HF name -> original release name, written per prefix (not derived from the conversion table)."""
    if hf == LM_HEAD_NAME:
        return "gpt_model.decoder.output_projection.weight"
    if hf.startswith("text_model.model."):
        return "gpt_model.decoder." + hf.removeprefix("text_model.model.")
    if hf.startswith("image_to_text_projection."):
        return "img_connector." + hf.removeprefix("image_to_text_projection.")
    rest = hf.removeprefix("vision_model.model.")
    fixed = {
        "embeddings.class_embedding": "class_embedding",
        "embeddings.position_embedding.weight": "positional_embedding",
        "embeddings.patch_embedding.weight": "conv1.weight",
        "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias",
        "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias",
    }
    if rest in fixed:
        return "img_model.visual." + fixed[rest]
    _, _, i, module, *tail = rest.split(".")  # encoder.layers.{i}.{module}.…
    module = {"self_attn": "ts_attn", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp": "mlp"}[module]
    tail = [{"fc1": "c_fc", "fc2": "c_proj"}.get(t, t) for t in tail]
    return ".".join(["img_model.visual.transformer.resblocks", i, module, *tail])


def _original_state(model) -> dict[str, torch.Tensor]:
    state = {_original_name(n): t.clone() for n, t in model.state_dict().items()}
    state["gpt_model.decoder.output_projection.weight"] = state["gpt_model.decoder.embed_tokens.weight"]
    state["gpt_model.decoder.embed_positions._float_tensor"] = torch.zeros(1)
    state["gpt_model.decoder.self_attn_sope.scale"] = torch.zeros(32)
    return state


def test_original_names_spot_check():
    assert _original_name("vision_model.model.encoder.layers.3.mlp.fc2.bias") == (
        "img_model.visual.transformer.resblocks.3.mlp.c_proj.bias"
    )
    assert (
        _original_name("text_model.model.layers.0.ffn.fc1.weight")
        == "gpt_model.decoder.layers.0.ffn.fc1.weight"
    )


def test_convert_original_round_trip(model, tmp_path):
    original = _original_state(model)
    converted = convert_original(original, tmp_path / "from_dict", config=model.config)
    assert LM_HEAD_NAME not in converted and EMBED_NAME in converted
    _assert_same_weights(model, load_pretrained(tmp_path / "from_dict"))
    # from a fairseq-style file: the state dict under "model" (weights_only loading suffices for tensors)
    torch.save({"model": original}, tmp_path / "kosmos-2.pt")
    convert_original(
        tmp_path / "kosmos-2.pt", tmp_path / "from_file", config=model.config, dtype=torch.bfloat16
    )
    loaded = load_pretrained(tmp_path / "from_file", dtype=torch.bfloat16)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name].to(torch.bfloat16)), name


def test_convert_original_rejects_leftover_missing_and_untied(model, tmp_path):
    original = _original_state(model)
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): vision_model\.model\.proj"):
        convert_original(
            {**original, "img_model.visual.proj": torch.zeros(2)}, tmp_path / "a", config=model.config
        )
    del original["img_connector.latent_query"]
    with pytest.raises(ValueError, match=r"missing tensors \(1\): image_to_text_projection\.latent_query"):
        convert_original(original, tmp_path / "b", config=model.config)
    original = _original_state(model)
    original["gpt_model.decoder.output_projection.weight"] = (
        original["gpt_model.decoder.output_projection.weight"] + 1
    )
    with pytest.raises(ValueError, match="output projection differs"):
        convert_original(original, tmp_path / "c", config=model.config)
    with pytest.raises(ValueError, match="wrong shape"):
        convert_original(_original_state(model), tmp_path / "d")  # default config: the released sizes
    assert not (tmp_path / "a").exists()  # nothing is written when a check fails


# -- transformers reads what we write ----------------------------------------------------------------------


@pytest.mark.reference
def test_transformers_loads_what_we_save(model, saved):
    from transformers import Kosmos2ForConditionalGeneration

    hf, info = Kosmos2ForConditionalGeneration.from_pretrained(
        saved, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ids, mask = image_prompt([64012, 10, 20, 64007, 30, 64008, 64009, 64013 + 5, 64013 + 900, 64010])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(
            pixel_values=pixels,
            input_ids=torch.tensor([ids]),
            image_embeds_position_mask=torch.tensor([mask]),
        )
    assert (ref.logits - _run(model)).abs().max() <= 1e-4
    assert hf.generation_config.no_repeat_ngram_size == 3


# -- memory ------------------------------------------------------------------------------------------------

_RSS_SCRIPT = """
import sys, torch
from kosmos2.checkpoint import load_pretrained, weight_shapes
from kosmos2.config import Kosmos2Config
def status_kib(field):  # VmHWM is this process's peak RSS (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
weight_shapes(Kosmos2Config.from_preset("tiny"))  # warm up: first meta-device use loads ~70 MB of torch code
base = status_kib("VmRSS")
model = load_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
# page every weight in by reading one element per 4 KiB page (a full reduction would allocate temporaries)
touched = [float(p.detach().flatten()[:: 4096 // p.element_size()].sum()) for p in model.parameters()]
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print((status_kib("VmHWM") - base) * 1024 / weights)
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_is_about_one_copy(tmp_path_factory, dtype):
    """Loading holds one copy of the weights: peak RSS growth <= 1.3x the loaded weight bytes."""
    directory = tmp_path_factory.getbasetemp() / "rss_checkpoint"
    if not (directory / "model.safetensors").exists():
        config = Kosmos2Config(  # ~190 MB in float32, no tensor dominating (small vocabulary)
            vision=VisionConfig(width=256, layers=2, heads=4, mlp_dim=1024, image_size=28, patch_size=14),
            text=TextConfig(vocab_size=2000, width=1024, layers=4, heads=16, mlp_dim=4096),
        )
        save_pretrained(Kosmos2(config), directory)
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(directory), dtype],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio <= 1.3, f"peak RSS grew by {ratio:.2f}x the weight bytes"
