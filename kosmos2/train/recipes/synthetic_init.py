"""The synthetic recipe's initialisation of a fresh small Kosmos-2 (docs/DEFAULT_MODEL.md has why):

init_scaled      unit-gain linear layers (the model's own std 0.02 suits widths of ~1000 and more)
init_patches     image slot i starts as a view of image patch i (2-D sinusoidal patch positions)
center_connector the connector's biases shifted so its image slots have mean zero on training images
init_locations   the 1024 location tokens start from a 2-D sinusoidal code of their cell
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kosmos2.train.recipes.slots import patch_grid, slot_patches

if TYPE_CHECKING:
    from kosmos2.model import Kosmos2
    from kosmos2.tokenizer import Kosmos2Tokenizer


def grid_code(grid: int, width: int) -> torch.Tensor:
    """A 2-D sinusoidal code of the cells of a `grid` × `grid` board, [grid², width], cells in row-major
    order: the first half of the width codes the row, the second half the column, as sines and cosines at
    geometric periods from 2 to 2·grid cells. Neighbouring cells get similar codes. Unit-scale (±1)."""
    quarter = width // 4
    cells = torch.arange(grid * grid)
    rows, cols = (cells // grid).float(), (cells % grid).float()
    periods = 2.0 * grid ** (torch.arange(quarter).float() / max(quarter - 1, 1))
    freqs = 2 * math.pi / periods  # [quarter]

    def code(x: torch.Tensor) -> torch.Tensor:  # [cells] -> [cells, 2*quarter]
        angles = x[:, None] * freqs[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    table = torch.zeros(grid * grid, width)
    table[:, : 2 * quarter] = code(rows)
    table[:, 2 * quarter : 4 * quarter] = code(cols)
    return table


def init_locations(model: Kosmos2, tokenizer: Kosmos2Tokenizer) -> None:
    """Give the 1024 location tokens the 2-D sinusoidal code of their cell (`grid_code`, periods 2 to 64
    cells), scaled to the std of the other embeddings (0.02).

    Neighbouring cells start with similar embeddings, and since the output head is the embedding, a logit
    starts as a sum of a row score and a column score: the model can learn where a corner is along each axis
    instead of learning 1024 unrelated classes.
    """
    from kosmos2.grounding import GRID

    embedding = model.text_model.model.embed_tokens.weight  # [V, C]
    C = embedding.shape[1]
    table = grid_code(GRID, C)
    table *= 0.02 / table[:, : 4 * (C // 4)].std()
    start = tokenizer.patch_index_offset
    with torch.no_grad():
        embedding[start : start + GRID * GRID] = table.to(embedding.dtype)


def init_scaled(model: Kosmos2, slot_std: float = 0.1, position_std: float = 0.5) -> None:
    """Re-initialise for a small model trained from scratch: every linear layer at unit gain (std
    1/sqrt(fan_in)), the residual branches' output layers (out_proj, fc2) further divided by sqrt(2 * layers),
    the ViT's position embeddings at std `position_std`, the connector's dense layer at std 1 (its inputs are
    unit-norm, ~1/sqrt(width) each) and its output at ~`slot_std` per element.

    The model's own init (std 0.02 everywhere) suits widths of ~1000 and more. At the small preset's widths it
    shrinks each layer's output ~3x: through the connector's three layers the image slots start ~30x smaller
    than the text embeddings, and a probe reading the image through them learns ~10x slower
    (docs/DEFAULT_MODEL.md). Embeddings, layer norms and the latent queries (std 1) keep the model's init.
    """
    vision_layers = len(model.vision_model.model.encoder.layers)
    text_layers = len(model.text_model.model.layers)
    connector = model.image_to_text_projection
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or module is model.text_model.lm_head:
                continue
            std = module.weight.shape[1] ** -0.5
            if name.endswith(("out_proj", "fc2")) and not name.startswith("image_to_text_projection"):
                std /= math.sqrt(2 * (vision_layers if name.startswith("vision_model") else text_layers))
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        embeddings = model.vision_model.model.embeddings
        patch = embeddings.patch_embedding.weight
        patch.normal_(0.0, patch[0].numel() ** -0.5)
        embeddings.position_embedding.weight.normal_(0.0, position_std)
        connector.dense.weight.normal_(0.0, 1.0)
        out = connector.x_attn.out_proj.weight
        out.normal_(0.0, slot_std * out.shape[1] ** -0.5)


def init_patches(model: Kosmos2, sharpness: float = 12.0, slot_std: float = 0.1) -> None:
    """Start each image slot as a view of one image patch (after `init_scaled`).

    The ViT's patch position embeddings become a 2-D sinusoidal code (`grid_code`) at twice the scale of a
    patch embedding, so each patch's features say where it is. The connector's query projection becomes the
    identity and latent i a scaled copy of the key that patch `slot_patches(…)[i]`'s position alone produces,
    so that at initialisation slot i attends mostly to that patch (attention logit `sharpness` on it), and
    the slots come out in raster order. Key, value and dense layers at unit gain; the output projection at
    ~`slot_std` per element.

    Why (docs/DEFAULT_MODEL.md): the decoder learns to point at once when the slots say which patches hold an
    object; sixteen slots that each pool the whole image never gave it that within an hour of training.
    """
    embeddings = model.vision_model.model.embeddings
    grid = patch_grid(model.config)
    connector = model.image_to_text_projection
    attn = connector.x_attn
    Q, C = connector.latent_query.shape
    with torch.no_grad():
        position = embeddings.position_embedding.weight  # [1 + grid², Cv]; row 0 is the class token's
        code = grid_code(grid, position.shape[1])
        patch = embeddings.patch_embedding.weight
        patch_scale = float(patch.std()) * patch[0].numel() ** 0.5  # std of a patch embedding
        position[1:] = code * (2 * patch_scale / float(code.std()))
        connector.dense.weight.normal_(0.0, 1.0)
        connector.dense.bias.zero_()
        for layer in (attn.k_proj, attn.v_proj):
            layer.weight.normal_(0.0, layer.weight.shape[1] ** -0.5)
            layer.bias.zero_()
        attn.q_proj.weight.copy_(torch.eye(C))
        attn.q_proj.bias.zero_()
        # the key of each patch position alone, as the ViT's final LayerNorm and the L2 norm would pass it
        features = F.normalize(F.layer_norm(position[1:], (position.shape[1],)), dim=-1)
        keys = attn.k_proj(connector.dense(features))  # [grid², C]
        heads, head_dim = attn.heads, C // attn.heads
        chosen = keys[slot_patches(Q, grid * grid)].view(Q, heads, head_dim)
        # q·k / sqrt(head_dim) = sharpness on the chosen patch, in every head
        chosen = chosen * (sharpness * head_dim**0.5 / chosen.pow(2).sum(-1, keepdim=True))
        connector.latent_query.copy_(chosen.reshape(Q, C))
        attn.out_proj.weight.normal_(0.0, slot_std * C**-0.5)
        attn.out_proj.bias.zero_()


def center_connector(model: Kosmos2, seed: int, p_copy: Any = None, scenes: int = 64) -> None:
    """Data-dependent init: shift the connector's biases so that its dense output and its image slots have
    mean zero over `scenes` training images (drawn from `seed`). What every image shares carries no
    information and, left in, would be most of each slot."""
    from kosmos2.data import synthetic
    from kosmos2.image import preprocess

    images = [
        synthetic.render(
            synthetic.make_scene(synthetic.scene_seed("train", seed, "init", i), "train", p_copy)
        )
        for i in range(scenes)
    ]
    pixels = preprocess(images, size=model.config.vision.image_size)
    connector = model.image_to_text_projection
    training = model.training
    model.eval()  # no dropout
    with torch.no_grad():
        features = F.normalize(model.vision_model(pixels), dim=-1)
        connector.dense.bias.sub_(connector.dense(features).mean((0, 1)))
        connector.x_attn.out_proj.bias.sub_(connector(features).mean((0, 1)))
    model.train(training)
