"""Kosmos-2 configuration: dataclasses, named presets, and the Hugging Face `config.json` mapping.

A config is three small dataclasses: `VisionConfig` (the CLIP ViT), `TextConfig` (the MAGNETO decoder) and
`Kosmos2Config` (both, plus the number of latent queries of the connector). Presets are named factories in
`PRESETS`; `Kosmos2Config.from_preset("kosmos-2-patch14-224")` is the released model (SPEC §6).

On disk the config lives beside the weights as a Hugging Face `config.json` (model_type `kosmos-2`), so a
checkpoint directory we write is loadable by transformers and one transformers writes is loadable by us.
Field names here are ours; the HF names are listed in `_VISION_HF` / `_TEXT_HF`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass
class VisionConfig:
    """CLIP ViT image encoder (pre-LN blocks, quick-GELU MLP)."""

    width: int = 1024  # HF hidden_size
    layers: int = 24  # HF num_hidden_layers
    heads: int = 16  # HF num_attention_heads
    mlp_dim: int = 4096  # HF intermediate_size
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: 257 for ViT-L/14 at 224."""
        return self.num_patches + 1

    def validate(self) -> None:
        _positive(self, "width", "layers", "heads", "mlp_dim", "image_size", "patch_size", "num_channels")
        if self.width % self.heads:
            raise ValueError(f"VisionConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )


@dataclass
class TextConfig:
    """Causal MAGNETO (sub-LN) decoder with a tied output head and sinusoidal positions."""

    vocab_size: int = 65037
    width: int = 2048  # HF embed_dim
    layers: int = 24
    heads: int = 32  # HF attention_heads
    mlp_dim: int = 8192  # HF ffn_dim
    max_positions: int = 2048  # HF max_position_embeddings (positions are computed, so this is advisory)
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1  # on the embeddings and on each residual branch, training only
    attention_dropout: float = 0.1  # on attention probabilities (decoder and connector), training only
    activation_dropout: float = 0.0  # after the MLP's GELU, training only
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def validate(self) -> None:
        _positive(self, "vocab_size", "width", "layers", "heads", "mlp_dim", "max_positions")
        if self.width % self.heads:
            raise ValueError(f"TextConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.width % 2 or self.width < 4:
            raise ValueError(f"TextConfig: width {self.width} must be even and >= 4 (sinusoidal positions)")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"TextConfig: {name}={getattr(self, name)} is outside the vocabulary")


@dataclass
class Kosmos2Config:
    """The whole model: vision encoder, connector (`latent_query_num` learned queries) and decoder."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    latent_query_num: int = 64  # image embeddings per image = image slots in the prompt

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        if self.latent_query_num <= 0:
            raise ValueError(f"Kosmos2Config: latent_query_num must be positive, got {self.latent_query_num}")

    # -- presets -------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> Kosmos2Config:
        """A named preset: see `PRESETS` (e.g. "kosmos-2-patch14-224", "tiny")."""
        if name not in PRESETS:
            raise ValueError(f"unknown Kosmos-2 preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()

    # -- native dict (our field names) ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Kosmos2Config:
        """Inverse of `to_dict`; unknown keys are an error (they would be silently ignored otherwise)."""
        vision = _dataclass_from(VisionConfig, d.get("vision", {}), "vision")
        text = _dataclass_from(TextConfig, d.get("text", {}), "text")
        extra = set(d) - {"vision", "text", "latent_query_num"}
        if extra:
            raise ValueError(f"Kosmos2Config.from_dict: unknown keys {sorted(extra)}")
        return cls(vision=vision, text=text, latent_query_num=int(d.get("latent_query_num", 64)))

    # -- Hugging Face config.json --------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> Kosmos2Config:
        """Read a Hugging Face `config.json` dict (model_type "kosmos-2").

        Missing fields take transformers' defaults, which are those of the released model. Settings this
        implementation does not have (another activation, no embedding scale, cross-attention) are rejected
        rather than ignored, because ignoring them would silently compute a different function.
        """
        if hf.get("model_type") != "kosmos-2":
            raise ValueError(
                f"config.json: model_type is {hf.get('model_type')!r}, expected 'kosmos-2' "
                "(is this a Kosmos-2 checkpoint directory?)"
            )
        tc = hf.get("text_config") or {}
        vc = hf.get("vision_config") or {}

        if tc.get("activation_function", "gelu") != "gelu":
            raise ValueError(
                f"config.json: text activation {tc['activation_function']!r} unsupported (need 'gelu')"
            )
        if vc.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(
                f"config.json: vision activation {vc['hidden_act']!r} unsupported (need 'quick_gelu')"
            )
        if not tc.get("scale_embedding", True):
            raise ValueError(
                "config.json: scale_embedding=false is unsupported (Kosmos-2 scales by sqrt(width))"
            )
        if tc.get("add_cross_attention", False):
            raise ValueError(
                "config.json: add_cross_attention=true is unsupported (Kosmos-2 has no cross-attention)"
            )
        if not hf.get("tie_word_embeddings", True) or not tc.get("tie_word_embeddings", True):
            raise ValueError(
                "config.json: tie_word_embeddings=false is unsupported (Kosmos-2 ties its output head)"
            )

        vision_kwargs = {
            ours: _hf_get(vc, names, ours) for ours, names in _VISION_HF.items() if _has(vc, names)
        }
        for key in ("image_size", "patch_size"):
            if key in vision_kwargs:
                vision_kwargs[key] = _square(vision_kwargs[key], key)
        text_kwargs = {ours: _hf_get(tc, names, ours) for ours, names in _TEXT_HF.items() if _has(tc, names)}
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = text_kwargs.get(key)
            if isinstance(value, list):  # HF allows a list of EOS ids; Kosmos-2 has one
                text_kwargs[key] = value[0]
            if key in text_kwargs and text_kwargs[key] is None:
                del text_kwargs[key]
        return cls(
            vision=VisionConfig(**vision_kwargs),
            text=TextConfig(**text_kwargs),
            latent_query_num=int(hf.get("latent_query_num", 64)),
        )

    def to_hf_config(self, dtype: str | None = None) -> dict[str, Any]:
        """A Hugging Face `config.json` dict that transformers' `Kosmos2Config` loads.

        `dtype` (e.g. "float32", "bfloat16") records the dtype of the saved weights.
        """
        v, t = self.vision, self.text
        out: dict[str, Any] = {
            "architectures": ["Kosmos2ForConditionalGeneration"],
            "model_type": "kosmos-2",
            "latent_query_num": self.latent_query_num,
            "tie_word_embeddings": True,
            "text_config": {
                "model_type": "kosmos_2_text_model",
                "vocab_size": t.vocab_size,
                "embed_dim": t.width,
                "layers": t.layers,
                "attention_heads": t.heads,
                "ffn_dim": t.mlp_dim,
                "max_position_embeddings": t.max_positions,
                "layer_norm_eps": t.layer_norm_eps,
                "activation_function": "gelu",
                "scale_embedding": True,
                "dropout": t.dropout,
                "attention_dropout": t.attention_dropout,
                "activation_dropout": t.activation_dropout,
                "layerdrop": 0.0,
                "tie_word_embeddings": True,
                "pad_token_id": t.pad_token_id,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
            },
            "vision_config": {
                "model_type": "kosmos_2_vision_model",
                "hidden_size": v.width,
                "num_hidden_layers": v.layers,
                "num_attention_heads": v.heads,
                "intermediate_size": v.mlp_dim,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "quick_gelu",
                "attention_dropout": 0.0,
            },
        }
        if dtype is not None:
            out["dtype"] = dtype
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> Kosmos2Config:
        """Read a Hugging Face `config.json` file."""
        path = Path(path)
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no config.json here; a Kosmos-2 checkpoint directory needs one"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_config(hf)


# -- Hugging Face field names (first name wins; later ones are transformers' attribute aliases) -----------

_VISION_HF: dict[str, tuple[str, ...]] = {
    "width": ("hidden_size",),
    "layers": ("num_hidden_layers",),
    "heads": ("num_attention_heads",),
    "mlp_dim": ("intermediate_size",),
    "image_size": ("image_size",),
    "patch_size": ("patch_size",),
    "num_channels": ("num_channels",),
    "layer_norm_eps": ("layer_norm_eps",),
}

_TEXT_HF: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "width": ("embed_dim", "hidden_size"),
    "layers": ("layers", "num_hidden_layers"),
    "heads": ("attention_heads", "num_attention_heads"),
    "mlp_dim": ("ffn_dim",),
    "max_positions": ("max_position_embeddings",),
    "layer_norm_eps": ("layer_norm_eps",),
    "dropout": ("dropout",),
    "attention_dropout": ("attention_dropout",),
    "activation_dropout": ("activation_dropout",),
    "pad_token_id": ("pad_token_id",),
    "bos_token_id": ("bos_token_id",),
    "eos_token_id": ("eos_token_id",),
}


def _has(d: dict[str, Any], names: tuple[str, ...]) -> bool:
    return any(n in d for n in names)


def _hf_get(d: dict[str, Any], names: tuple[str, ...], ours: str) -> Any:
    for n in names:
        if n in d:
            return d[n]
    raise KeyError(ours)


def _square(value: Any, key: str) -> int:
    """HF allows [h, w] for image/patch size; Kosmos-2 is square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config.json: vision {key}={value} is not square; Kosmos-2 needs a square size")
        value = value[0]
    return int(value)


def _positive(cfg: Any, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) <= 0:
            raise ValueError(f"{type(cfg).__name__}: {n} must be positive, got {getattr(cfg, n)}")


def _dataclass_from(cls: type, d: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    extra = set(d) - known
    if extra:
        raise ValueError(f"Kosmos2Config.from_dict: unknown {where} keys {sorted(extra)}")
    return cls(**d)


# -- presets ----------------------------------------------------------------------------------------------


def _kosmos_2_patch14_224() -> Kosmos2Config:
    """The released model (SPEC §6): ViT-L/14 at 224, 24-layer 2048-wide decoder, 1,664,485,376 parameters."""
    return Kosmos2Config(vision=VisionConfig(), text=TextConfig(), latent_query_num=64)


def _tiny() -> Kosmos2Config:
    """For tests: 28 px images (4 patches + class token), 2+2 layers, full vocabulary, 64 image slots."""
    return Kosmos2Config(
        vision=VisionConfig(width=32, layers=2, heads=2, mlp_dim=64, image_size=28, patch_size=14),
        text=TextConfig(width=64, layers=2, heads=4, mlp_dim=128, max_positions=512),
        latent_query_num=64,
    )


def _small() -> Kosmos2Config:
    """The small Kosmos-2 of the synthetic world (`kosmos2 train`; the built-in default model is its
    128 px form, `small-128`): 64 px images in 8 px patches (64 patches + class token), a 4-layer
    192-wide ViT, 64 latent queries (one per patch: kosmos2/train/recipes/synthetic_init.py's `init_patches`),
    a 4-layer 256-wide decoder, no dropout (the world's data never repeats).
    The vocabulary is the world's tokenizer's: 256 base pieces + <mask> + 11 tags + 1024 location tokens."""
    return Kosmos2Config(
        vision=VisionConfig(width=192, layers=4, heads=4, mlp_dim=768, image_size=64, patch_size=8),
        text=TextConfig(
            vocab_size=1292,
            width=256,
            layers=4,
            heads=4,
            mlp_dim=1024,
            max_positions=512,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        latent_query_num=64,
    )


def _small_128() -> Kosmos2Config:
    """`small` with 128 px images in 16 px patches: the same 8 x 8 grid of patches, slots and decoder cost,
    four times the pixels under each patch (small shapes are ~6 px across at 64 px). The built-in default
    model (kosmos2/assets/default, `kosmos2 train --recipe default`)."""
    config = _small()
    return replace(config, vision=replace(config.vision, image_size=128, patch_size=16))


def _small_192() -> Kosmos2Config:
    """`small-128` at 192 px in 24 px patches: the same 8 x 8 grid, slots and decoder cost, 2.25 times the
    pixels under each patch (small shapes ~18 px across instead of ~12)."""
    config = _small_128()
    return replace(config, vision=replace(config.vision, image_size=192, patch_size=24))


# name -> factory. Add a preset by adding an entry.
PRESETS: dict[str, Callable[[], Kosmos2Config]] = {
    "kosmos-2-patch14-224": _kosmos_2_patch14_224,
    "tiny": _tiny,
    "small": _small,
    "small-128": _small_128,
    "small-192": _small_192,
}
