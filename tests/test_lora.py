"""LoRA adapters interchange with transformers + peft: an adapter saved here loads into transformers'
Kosmos2ForConditionalGeneration and gives the same logits, and one made there on transformers' model loads
here; the merged weights we write equal the adapter applied live.

Every LoRA matrix is randomised (peft starts B at zero, which would make any adapter look interchangeable).
"""

from __future__ import annotations

import json

import pytest
import torch
from _model_fixtures import (
    image_prompt,
    load_hf_reference,
    tiny_config,
    write_tiny_checkpoint,
)

from kosmos2.checkpoint import load_pretrained
from kosmos2.train.loop import set_gradient_checkpointing
from kosmos2.train.lora import (
    add_lora,
    load_adapter,
    merged_state_dict,
    save_adapter,
    target_regex,
)

peft = pytest.importorskip("peft")


def _inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = image_prompt([5, 9, 64007, 17, 64008, 64009, 64013 + 33, 64013 + 990, 64010, 2])
    size = config.vision.image_size
    return torch.tensor([ids]), torch.tensor([mask]), torch.randn(1, 3, size, size, generator=g)


@torch.no_grad()
def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _ours(model, ids, mask, pixels):
    with torch.no_grad():
        logits, _ = model(ids, pixel_values=pixels, image_mask=mask)
    return logits


def _theirs(hf, ids, mask, pixels):
    with torch.no_grad():
        return hf(pixel_values=pixels, input_ids=ids, image_embeds_position_mask=mask.long()).logits


def test_target_regex_picks_the_same_layers_in_both_namings():
    import re

    pattern = target_regex(("text", "connector"), mlp=True)
    assert re.fullmatch(pattern, "text_model.model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pattern, "text_model.model.layers.0.ffn.fc2")
    assert re.fullmatch(pattern, "image_to_text_projection.x_attn.out_proj")
    assert re.fullmatch(pattern, "image_to_text_projection.dense")  # the connector's projection, with mlp
    assert not re.fullmatch(target_regex(("text", "connector")), "image_to_text_projection.dense")
    assert not re.fullmatch(target_regex(("text",), mlp=True), "image_to_text_projection.dense")
    assert not re.fullmatch(pattern, "vision_model.model.encoder.layers.0.self_attn.k_proj")
    assert not re.fullmatch(target_regex(), "text_model.model.layers.0.ffn.fc1")  # fc1/fc2 only with mlp


@pytest.mark.reference
def test_our_adapter_loads_into_transformers_with_the_same_logits(tmp_path):
    config = tiny_config()
    base = write_tiny_checkpoint(tmp_path / "base", config, seed=2)
    model = add_lora(load_pretrained(base), rank=4, alpha=8, mlp=True)
    _randomize_lora(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", str(base))
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4

    ids, mask, pixels = _inputs(config)
    ours = _ours(model.base_model.model, ids, mask, pixels)
    hf = peft.PeftModel.from_pretrained(load_hf_reference(base), str(tmp_path / "adapter")).eval()
    theirs = _theirs(hf, ids, mask, pixels)
    plain = _theirs(load_hf_reference(base), ids, mask, pixels)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the output: the comparison means something


@pytest.mark.reference
def test_an_adapter_made_on_transformers_model_loads_here(tmp_path):
    config = tiny_config()
    base = write_tiny_checkpoint(tmp_path / "base", config, seed=4)
    hf = load_hf_reference(base)
    lora = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "fc1"])
    theirs_model = peft.get_peft_model(hf, lora)
    _randomize_lora(theirs_model, seed=5)
    theirs_model.eval()
    theirs_model.save_pretrained(str(tmp_path / "hf_adapter"))

    ids, mask, pixels = _inputs(config, seed=1)
    theirs = _theirs(theirs_model, ids, mask, pixels)
    ours_model = load_adapter(load_pretrained(base), tmp_path / "hf_adapter").eval()
    ours = _ours(ours_model.base_model.model, ids, mask, pixels)
    assert (ours - theirs).abs().max() <= 1e-4


def test_merged_weights_equal_the_live_adapter(tmp_path):
    config = tiny_config()
    base = write_tiny_checkpoint(tmp_path / "base", config, seed=6)
    model = add_lora(load_pretrained(base), rank=2, alpha=5, parts=("text",))
    _randomize_lora(model, seed=7)
    model.eval()
    state = merged_state_dict(model)
    plain = load_pretrained(base)
    assert set(state) == set(plain.state_dict())  # the base names: no base_layer, no lora_ entries
    plain.load_state_dict(state)
    ids, mask, pixels = _inputs(config, seed=2)
    assert (
        _ours(plain, ids, mask, pixels) - _ours(model.base_model.model, ids, mask, pixels)
    ).abs().max() <= 1e-5
    # only the text attention changed: W + B·A·alpha/r, by hand for one layer
    name = "text_model.model.layers.1.self_attn.v_proj"
    layer = model.base_model.model.get_submodule(name)
    by_hand = (
        layer.base_layer.weight + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.5
    )
    assert torch.allclose(state[name + ".weight"], by_hand, atol=1e-6)
    vision = "vision_model.model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[vision], load_pretrained(base).state_dict()[vision])


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    config = tiny_config()
    base = write_tiny_checkpoint(tmp_path / "base", config, seed=8)
    ids, mask, pixels = _inputs(config, seed=3)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    grads = []
    for checkpointing in (False, True):
        model = add_lora(load_pretrained(base), rank=2, alpha=4)
        _randomize_lora(model, seed=9)
        if checkpointing:
            set_gradient_checkpointing(model.base_model.model, True)  # the decoder's and the ViT's switch
        model.train()
        torch.manual_seed(0)  # the same dropout masks; checkpointing replays them in the recomputation
        _, loss = model.base_model.model(ids, pixel_values=pixels, image_mask=mask, targets=targets)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
