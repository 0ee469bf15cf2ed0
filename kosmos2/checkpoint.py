"""Load and save Kosmos-2 checkpoints: the Hugging Face layout, and conversion of the original release.

Hugging Face layout (what users have, SPEC §7): a directory with `config.json` and the weights in one of
`model.safetensors`, `model.safetensors.index.json` + shards, or `pytorch_model.bin` (checked in that
order, the order transformers uses). Our module names are the checkpoint's names, so the state dict needs
no renaming; `weight_shapes(config)` lists every name with its shape and is the single source for checks.

Memory: the model is built on the meta device and the tensors are assigned into it (`assign=True`), so no
second copy of the weights exists. Safetensors files are memory-mapped: a tensor already in the wanted
dtype on the CPU is used in place (zero copy, copy-on-write); one that needs converting is copied chunk by
chunk and the file pages it came from are released as it goes. `pytorch_model.bin` is memory-mapped too
(`torch.load(mmap=True, weights_only=True)`), but its pages cannot be released early, so converting the
dtype of a .bin costs file + result.

Original release (`kosmos-2.pt`, fairseq/torchscale): `convert_original` renames with the literal
substring table `ORIGINAL_TO_HF` (SPEC §7) and checks that every tensor lands on a known name with the
right shape.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from kosmos2.config import Kosmos2Config
from kosmos2.model import Kosmos2

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
GENERATION_CONFIG_NAME = "generation_config.json"

EMBED_NAME = "text_model.model.embed_tokens.weight"
LM_HEAD_NAME = "text_model.lm_head.weight"  # tied to EMBED_NAME: optional in files, never written

# Buffers that some transformers versions saved; they are recomputed, not weights.
IGNORED_HF_NAMES = frozenset(
    {"vision_model.model.embeddings.position_ids", "text_model.model.embed_positions.weights"}
)

# The official decoding settings (SPEC §8): greedy, no-repeat-ngram 3 over the whole sequence, stop at </s>.
GENERATION_CONFIG = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "do_sample": False,
    "num_beams": 1,
    "no_repeat_ngram_size": 3,
    "use_cache": True,
}

# Original release name -> HF name: substring replacements applied in this order (SPEC §7).
ORIGINAL_TO_HF: tuple[tuple[str, str], ...] = (
    ("gpt_model.decoder.output_projection", "text_model.lm_head"),
    ("gpt_model.decoder", "text_model.model"),
    ("img_connector", "image_to_text_projection"),
    ("img_model.visual.class_embedding", "vision_model.model.embeddings.class_embedding"),
    ("img_model.visual.positional_embedding", "vision_model.model.embeddings.position_embedding.weight"),
    ("img_model.visual.conv1", "vision_model.model.embeddings.patch_embedding"),
    ("img_model.visual", "vision_model.model"),
    ("ln_pre", "pre_layrnorm"),
    ("ln_post", "post_layernorm"),
    ("transformer.resblocks", "encoder.layers"),
    ("ts_attn", "self_attn"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("c_fc", "fc1"),
    ("c_proj", "fc2"),
)
# Not weights: fairseq's position-table placeholder and an unused xPos scale.
ORIGINAL_IGNORED = frozenset(
    {"gpt_model.decoder.embed_positions._float_tensor", "gpt_model.decoder.self_attn_sope.scale"}
)


# -- the name/shape map ------------------------------------------------------------------------------------


def weight_shapes(config: Kosmos2Config) -> dict[str, tuple[int, ...]]:
    """Every state-dict name of a model with this config and its shape (built on the meta device)."""
    with torch.device("meta"):
        model = Kosmos2(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def hf_name_from_original(name: str) -> str | None:
    """The HF name of an original-release tensor name, or None for the names that are not weights."""
    if name in ORIGINAL_IGNORED:
        return None
    for old, new in ORIGINAL_TO_HF:
        name = name.replace(old, new)
    return name


def check_state_names(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """Raise one ValueError naming every missing, unexpected or mis-shaped tensor of `shapes` vs `expected`.

    The tied output head may be absent; `IGNORED_HF_NAMES` may be present.
    """
    missing = sorted(set(expected) - set(shapes) - {LM_HEAD_NAME})
    unexpected = sorted(set(shapes) - set(expected) - IGNORED_HF_NAMES)
    misshaped = [
        f"{n}: file {list(shapes[n])}, model {list(expected[n])}"
        for n in sorted(set(shapes) & set(expected))
        if tuple(shapes[n]) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_first(unexpected)}")
    if misshaped:
        problems.append(f"tensors with the wrong shape ({len(misshaped)}): {_first(misshaped)}")
    if problems:
        raise ValueError(
            f"{source} does not match the model its config describes:\n  "
            + "\n  ".join(problems)
            + "\n(is config.json the one these weights were saved with?)"
        )


def _first(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n} more)" if len(names) > n else "")


# -- safetensors, read through a memory map ----------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CHUNK_BYTES = 64 << 20  # convert large tensors 64 MiB at a time, releasing the source pages behind us


class SafetensorsFile:
    """A memory-mapped .safetensors file: 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the tensor bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            if size < 8:
                raise ValueError(f"{self.path}: not a safetensors file ({size} bytes)")
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ValueError(
                    f"{self.path}: not a safetensors file (header length {n} > file size {size})"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
            # private (copy-on-write) map: tensors used in place stay writable without touching the file
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        for name, e in self.entries.items():
            if e.get("dtype") not in _ST_DTYPES:
                raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            if not 0 <= begin <= end <= size - self.data_start:
                raise ValueError(f"{self.path}: tensor {name} lies outside the file (truncated download?)")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(
        self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The tensor `name`, in `dtype` (default: as stored) on `device`; zero-copy when nothing changes."""
        e = self.entries[name]
        src_dtype, shape = _ST_DTYPES[e["dtype"]], tuple(e["shape"])
        dtype = dtype or src_dtype
        begin, end = (self.data_start + o for o in e["data_offsets"])
        itemsize = src_dtype.itemsize
        numel = (end - begin) // itemsize
        if numel != _numel(shape) or (end - begin) % itemsize:
            raise ValueError(
                f"{self.path}: tensor {name} has {end - begin} bytes, not {shape} x {e['dtype']}"
            )
        if numel == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        aligned = begin % itemsize == 0
        if aligned:
            src = torch.frombuffer(self.mm, dtype=src_dtype, count=numel, offset=begin)
        else:  # a writer that did not align this tensor: copy its bytes to aligned memory
            src = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - begin, offset=begin).clone()
            src = src.view(src_dtype)
        if aligned and dtype == src_dtype and torch.device(device).type == "cpu":
            return src.view(shape)  # zero copy: the mmap'ed bytes are the parameter
        out = torch.empty(numel, dtype=dtype, device=device)
        step = max(1, _CHUNK_BYTES // itemsize)
        for i in range(0, numel, step):
            j = min(i + step, numel)
            out[i:j].copy_(src[i:j])
            if aligned:
                self._release(begin + i * itemsize, begin + j * itemsize)
        return out.view(shape)

    def _release(self, start: int, stop: int) -> None:
        """Drop the resident pages wholly inside [start, stop) so RSS does not hold file + converted copy."""
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, stop // page * page
        if hi > lo and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- loading -----------------------------------------------------------------------------------------------


def _open_weights(directory: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, object], str]:
    """Index the weight files of a HF checkpoint directory: (name -> shape, name -> source, description)."""
    single, index, bin_path = (
        directory / SAFETENSORS_NAME,
        directory / SAFETENSORS_INDEX_NAME,
        directory / PYTORCH_NAME,
    )
    shapes: dict[str, tuple[int, ...]] = {}
    sources: dict[str, object] = {}
    if single.exists():
        f = SafetensorsFile(single)
        for name in f.entries:
            shapes[name], sources[name] = f.shape(name), f
        return shapes, sources, str(single)
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (need a 'weight_map' object): {e}") from None
        files: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if shard not in files:
                if not (directory / shard).exists():
                    raise FileNotFoundError(f"{index} names shard {shard}, which is not in {directory}")
                files[shard] = SafetensorsFile(directory / shard)
            if name not in files[shard].entries:
                raise ValueError(f"{index} puts tensor {name} in {shard}, but that shard does not contain it")
            shapes[name], sources[name] = files[shard].shape(name), files[shard]
        return shapes, sources, str(index)
    if bin_path.exists():
        try:
            sd = torch.load(bin_path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{bin_path}: cannot be loaded safely with weights_only=True ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{bin_path}: expected a flat dict of tensors (a state dict)")
        for name, t in sd.items():
            shapes[name], sources[name] = tuple(t.shape), t
        return shapes, sources, str(bin_path)
    raise FileNotFoundError(
        f"{directory}: no weights found (looked for {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
        f"{PYTORCH_NAME})"
    )


def quantization_config(directory: str | Path) -> dict | None:
    """The `quantization_config` of a checkpoint directory's config.json (an int8 checkpoint written by
    `save_pretrained`, layout in `kosmos2.quantize`), or None for a float checkpoint."""
    path = Path(directory) / CONFIG_NAME
    try:
        quant = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # Kosmos2Config.from_json_file reports a missing or broken config.json
    if quant is None:
        return None
    from kosmos2.quantize import QUANT_METHOD

    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ValueError(
            f"{path}: quantization_config {method!r} is not supported; kosmos2 loads its own "
            f"{QUANT_METHOD!r} checkpoints (or save a float checkpoint and use dtype='int8')"
        )
    if not isinstance(quant.get("modules"), list):
        raise ValueError(f"{path}: quantization_config needs a 'modules' list of the quantised layers")
    return quant


def load_pretrained(
    directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> Kosmos2:
    """Load a Hugging Face layout checkpoint directory into a `Kosmos2` (in eval mode).

    dtype: the float parameters' dtype (float32, bfloat16 or float16), converted on load; None: float32,
    except an int8 checkpoint (config.json has a `quantization_config`, `kosmos2.quantize`), whose layers
    load as the stored `Int8Linear`s and whose other tensors as the stored bfloat16 (no quantising again).
    A tied `lm_head.weight` in the file is not read: the head is the embedding matrix. Raises ValueError
    naming every missing, unexpected or mis-shaped tensor.

    Safetensors weights loaded to the CPU in their stored dtype share memory with a private (copy-on-write)
    map of the file: the file may be replaced (as `save_pretrained` does, by rename) or deleted, but must not
    be overwritten in place while the model is alive.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory; pass a Kosmos-2 checkpoint directory")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"load_pretrained: dtype must be a floating point dtype, got {dtype}")
    config = Kosmos2Config.from_json_file(directory / CONFIG_NAME)
    quant = quantization_config(directory)
    if quant is not None and dtype not in (None, torch.bfloat16):
        raise ValueError(
            f"{directory}: an int8 checkpoint (quantization_config); load it with dtype None or "
            f"bfloat16 (Predictor: dtype='int8'), not {dtype}"
        )
    dtype = dtype or (torch.bfloat16 if quant is not None else torch.float32)
    with torch.device("meta"):
        model = Kosmos2(config)
    if quant is not None:
        from kosmos2.quantize import int8_structure

        int8_structure(model, quant["modules"])
    expected_tensors = model.state_dict()
    expected = {name: tuple(t.shape) for name, t in expected_tensors.items()}
    shapes, sources, where = _open_weights(directory)
    check_state_names(shapes, expected, where)

    state: dict[str, torch.Tensor] = {}
    for name, meta in expected_tensors.items():
        if name == LM_HEAD_NAME:
            continue
        src = sources[name]
        want = dtype if meta.is_floating_point() else meta.dtype  # int8 weights load as they are
        if isinstance(src, SafetensorsFile):
            t = src.tensor(name, want if meta.is_floating_point() else None, device)
        else:  # a tensor from torch.load(mmap=True): .to() is a no-op when nothing changes
            t = src
        if t.is_floating_point() != meta.is_floating_point():
            raise ValueError(f"{where}: tensor {name} is stored as {t.dtype}, expected {meta.dtype}")
        state[name] = t.to(device=device, dtype=want)
    if LM_HEAD_NAME in expected:
        state[LM_HEAD_NAME] = state[EMBED_NAME]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter by two; make the head the embedding again
    return model.eval()


def check_weights(directory: str | Path, config: Kosmos2Config | None = None) -> tuple[str, int]:
    """Check a checkpoint directory's weights against its config.json (or `config`) without loading them:
    every tensor present, none unexpected, each of the config's shape. Returns (the weight file, the number of
    tensors); raises ValueError naming every mismatch, FileNotFoundError when there are no weights."""
    directory = Path(directory)
    config = config or Kosmos2Config.from_json_file(directory / CONFIG_NAME)
    shapes, _, where = _open_weights(directory)
    check_state_names(shapes, weight_shapes(config), where)
    return where, len(shapes)


# -- saving ------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_checkpoint(
    state: Mapping[str, torch.Tensor],
    config: Kosmos2Config,
    directory: Path,
    quantization: dict | None = None,
) -> None:
    """Write config.json, model.safetensors and generation_config.json into `directory` atomically per file:
    everything goes to a temporary folder inside it first, then each file is renamed into place (weights
    first, config last), so a crash never leaves a half-written file under a real name. `quantization`:
    the `quantization_config` of an int8 model (`kosmos2.quantize`), written into config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {n: t.detach().contiguous() for n, t in state.items() if n != LM_HEAD_NAME}
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    tmp = Path(tempfile.mkdtemp(prefix=".kosmos2-save-", dir=directory))
    try:
        save_file(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        dtype = _dtype_name(dtypes.pop()) if len(dtypes) == 1 else None
        (tmp / GENERATION_CONFIG_NAME).write_text(
            json.dumps(GENERATION_CONFIG, indent=2) + "\n", encoding="utf-8"
        )
        hf_config = config.to_hf_config(dtype)
        if quantization is not None:
            hf_config["quantization_config"] = quantization
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        for name in (SAFETENSORS_NAME, GENERATION_CONFIG_NAME, CONFIG_NAME):
            os.chmod(
                tmp / name, 0o644
            )  # the safetensors writer leaves 0600; checkpoints are meant to be shared
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(model: Kosmos2, directory: str | Path) -> None:
    """Save `model` as a Hugging Face layout checkpoint: config.json, model.safetensors (without the tied
    lm_head) and generation_config.json with the official decoding settings. Loadable by `load_pretrained`
    and by transformers' `Kosmos2ForConditionalGeneration.from_pretrained`.

    Other files in the directory (tokenizer, preprocessor config) are left alone. A model.safetensors is
    preferred over older shards or a pytorch_model.bin there, by us and by transformers.

    An int8 model (`kosmos2.quantize.prepare_model(model, "int8")`) saves its int8 weights and scales with
    a `quantization_config` (layout in `kosmos2.quantize`); `load_pretrained` loads it without quantising
    again. transformers cannot load that layout.
    """
    from kosmos2.quantize import quantization_config as int8_config

    _write_checkpoint(model.state_dict(), model.config, Path(directory), int8_config(model))


# -- the original release ----------------------------------------------------------------------------------


def convert_original(
    state_dict_or_path: Mapping[str, torch.Tensor] | str | Path,
    out_dir: str | Path,
    config: Kosmos2Config | None = None,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """Convert the original release (`kosmos-2.pt`, or its state dict) into a HF layout directory.

    Renames with `ORIGINAL_TO_HF`, drops `ORIGINAL_IGNORED`, and checks that no tensor is left over, none is
    missing and every shape matches `config` (default: the released "kosmos-2-patch14-224"). The tied output
    projection must equal the embedding. `dtype` converts the weights (default: as stored).

    A fairseq checkpoint holds its state dict under "model" next to non-tensor objects (its cfg), which
    `torch.load(weights_only=True)` refuses; pass `trust_pickle=True` only for a file you trust, or extract
    the state dict elsewhere first. Returns the converted state dict (HF names).
    """
    config = config or Kosmos2Config.from_preset("kosmos-2-patch14-224")
    if isinstance(state_dict_or_path, (str, Path)):
        path = Path(state_dict_or_path)
        obj = _load_original(path, trust_pickle)
        original = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
        source = str(path)
    else:
        original, source = state_dict_or_path, "the original state dict"
    if not isinstance(original, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors)")

    if not all(isinstance(t, torch.Tensor) for t in original.values()):
        raise ValueError(f"{source}: expected a state dict, but not every entry is a tensor")
    converted: dict[str, torch.Tensor] = {}
    for name, t in original.items():
        new = hf_name_from_original(name)
        if new is None:
            continue
        if new in converted:
            raise ValueError(f"{source}: two original tensors map to {new} (second: {name})")
        converted[new] = t
    expected = weight_shapes(config)
    if not set(converted) & set(expected):
        raise ValueError(
            f"{source}: not a Kosmos-2 release checkpoint: none of its {len(original)} entries has a "
            "Kosmos-2 weight name (e.g. gpt_model.decoder.embed_tokens.weight); pass kosmos-2.pt from the "
            "original release (a Hugging Face layout directory needs no conversion)"
        )
    check_state_names({n: tuple(t.shape) for n, t in converted.items()}, expected, source)
    if LM_HEAD_NAME in converted and not torch.equal(converted[LM_HEAD_NAME], converted[EMBED_NAME]):
        raise ValueError(
            f"{source}: the output projection differs from the token embedding; Kosmos-2 ties them, "
            "so this checkpoint cannot be represented"
        )
    converted.pop(LM_HEAD_NAME, None)
    for name in IGNORED_HF_NAMES & set(converted):
        del converted[name]
    if dtype is not None:
        converted = {n: t.to(dtype) for n, t in converted.items()}
    _write_checkpoint(converted, config, Path(out_dir))
    return converted


def _load_original(path: Path, trust_pickle: bool) -> object:
    """torch.load the original release with a message for each way a file is not one."""
    if path.is_dir():
        raise IsADirectoryError(
            f"{path}: is a directory; pass the kosmos-2.pt file of the original release (a Hugging Face "
            "layout directory needs no conversion)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass kosmos-2.pt from the original release")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives (since torch 1.6), the release is one
        with open(path, "rb") as f:
            head = f.read(8)
        raise ValueError(
            f"{path}: not a PyTorch checkpoint (starts {head!r}; {path.stat().st_size:,} bytes, not the zip "
            "archive torch.save writes); pass kosmos-2.pt from the original release"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path}: a zip archive but not a readable PyTorch checkpoint ({e})") from None
        raise ValueError(
            f"{path}: holds non-tensor objects that weights_only loading refuses "
            f"({str(e).splitlines()[0]}). If you trust the file, pass trust_pickle=True "
            "(--trust-pickle); or save its state dict (obj['model']) to a new file first."
        ) from None
    except (RuntimeError, KeyError, EOFError, ValueError) as e:  # a zip without torch's layout
        raise ValueError(
            f"{path}: a zip archive but not a PyTorch checkpoint ({type(e).__name__}: {e}); pass kosmos-2.pt "
            "from the original release"
        ) from None
