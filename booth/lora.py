"""LoRA (Hu et al. 2021) for Stable Diffusion 1.x: adapters to train, files every SD tool loads, and merging.

A LoRA changes a Linear or Conv2d weight W by a low-rank product:

    W' = W + weight * alpha / rank * up @ down        (down: rank x in[*k*k], up: out x rank[x1x1])

Files are written in the kohya / AUTOMATIC1111 layout, which A1111, ComfyUI, diffusers and kohya's scripts all
read: `lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`, `.lora_up.weight` and `.alpha`,
and `lora_te_text_model_...` for the text encoder. booth's modules have CompVis names, so the names are made with
the same prefix rules that read diffusers folders (`checkpoint.diffusers_rules`), in both directions.

Read as well: diffusers/peft files (`[unet.|text_encoder.]<module>.lora_A.weight` / `lora_B.weight`, optional
`.alpha`, peft's `lora_alpha` from the `lora_adapter_metadata` header) and diffusers' older `to_q_lora.down`
and `lora.down` spellings.

At inference LoRAs are merged into the weights when loaded (`merge`): sampling then costs exactly what the base
model costs, and the model code stays untouched. `merge` returns the replaced tensors so that a grid comparing
several LoRAs can put the base back exactly between rows (`restore`). Training uses runtime `LoRALayer`s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import (
    OPENCLIP,
    SAVE_DTYPES,
    SDXL_CLIP,
    SDXL_OPENCLIP,
    TEXT,
    UNET,
    data_hash,
    diffusers_name,
    diffusers_rules,
    file_hash,
    read_checkpoint,
    read_pickle,
    read_safetensors,
    save_checkpoint,
)
from .config import ModelConfig
from .errors import BoothError
from .formats import LORA_FOLDER_FILE, PICKLE_SUFFIXES, looks_like_lora
from .hub import find_model
from .model import build
from .openclip import Attention
from .options import LORA_TARGETS

# kohya's text-encoder LoRA: CLIPAttention and CLIPMLP layers (OpenCLIP's: with q, k and v fused, see fused_path)
TEXT_TARGETS = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12]"
OPENCLIP_TARGETS = r"attn\.out_proj|mlp\.c_fc|mlp\.c_proj"
MAX_WEIGHT = 10.0  # |weight| above this is a typo rather than a setting (sliders use up to about 5-8)
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# SDXL's OpenCLIP bigG under the transformers names kohya and diffusers give it: module -> (ours, rows of 3)
_OPENCLIP_NAMES = {"self_attn_q_proj": ("attn.in_proj", 0), "self_attn_k_proj": ("attn.in_proj", 1),
                   "self_attn_v_proj": ("attn.in_proj", 2), "self_attn_out_proj": ("attn.out_proj", None),
                   "mlp_fc1": ("mlp.c_fc", None), "mlp_fc2": ("mlp.c_proj", None)}  # fmt: skip


# ----------------------------------------------------------------------------- training: runtime layers


class LoRALayer(nn.Module):
    """A frozen Linear or Conv2d plus a trainable low-rank update: base(x) + scale * up(down(x))."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.rank, self.alpha, self.scale = base, rank, float(alpha), alpha / rank
        # Convolutions (kohya's LoCon): down takes the kernel, stride and padding, up is 1x1.
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False
            )
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        # As kohya and peft: a random down and a zero up, so step 0 computes exactly the base model.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)

    @property
    def weight(self) -> torch.Tensor:  # code that asks a layer for its dtype or device keeps working
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


class Adapter(nn.Module):
    """A trainable low-rank update alone, scale * up(down(x)), for a weight that is not a layer of its own."""

    def __init__(self, features: int, out: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.rank, self.alpha, self.scale = rank, float(alpha), alpha / rank
        self.down, self.up = nn.Linear(features, rank, bias=False), nn.Linear(rank, out, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class QKVAdapter(nn.Module):
    """LoRA on a fused q/k/v projection (OpenCLIP's in_proj): one update per third, as kohya and diffusers
    train q_proj, k_proj and v_proj apart."""

    def __init__(self, width: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.parts = nn.ModuleList([Adapter(width, width, rank, alpha, generator) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


QKV = "qkv"  # the fused projection's thirds, as virtual layers `<attn>.in_proj.q` (fused_path)


def fused_path(attn: str, third: int) -> str:
    return f"{attn}.in_proj.{QKV[third]}"


def target_paths(model: nn.Module, targets: str = "attn", text_encoder: bool = False) -> list[str]:
    """Module paths (in the LatentDiffusion tree) of the layers a LoRA with these targets adapts; an OpenCLIP
    attention's fused q/k/v counts as three (fused_path)."""
    if targets not in LORA_TARGETS:
        raise BoothError(f"unknown LoRA targets {targets!r}; choose one of: {', '.join(LORA_TARGETS)}")
    unet = re.compile(rf"(.*\.)?({'|'.join(LORA_TARGETS[targets])})")
    text = re.compile(rf"(.*\.)?({TEXT_TARGETS})")
    openclip = re.compile(rf"(.*\.)?({OPENCLIP_TARGETS})")
    found = []
    for path, module in model.named_modules():
        if text_encoder and isinstance(module, Attention):
            found += [fused_path(path, i) for i in range(3)]
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if path.startswith(UNET):
            found += [path] if unet.fullmatch(path) else []
        elif text_encoder and path.startswith((TEXT, SDXL_CLIP)):
            found += [path] if text.fullmatch(path) else []
        elif text_encoder and path.startswith((OPENCLIP, SDXL_OPENCLIP)):
            found += [path] if openclip.fullmatch(path) else []
    return found


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = "attn",
             text_encoder: bool = False, seed: int = 0) -> dict[str, LoRALayer]:  # fmt: skip
    """Wrap the target layers of `model` in fp32 `LoRALayer`s (the base layers keep their dtype and stay frozen);
    returns them by module path. The initial `down` weights come from `seed`, whatever the device."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for path in target_paths(model, targets, text_encoder):
        attn, fused, third = path.rpartition(".in_proj.")
        if fused:
            if third == QKV[0]:
                base = model.get_submodule(attn)
                base.adapter = QKVAdapter(base.out_proj.in_features, rank, rank if alpha is None else alpha,
                                          generator).to(base.in_proj_weight.device)  # fmt: skip
            layers[path] = model.get_submodule(attn).adapter.parts[QKV.index(third)]
            continue
        parent_path, _, name = path.rpartition(".")
        parent, base = model.get_submodule(parent_path), model.get_submodule(path)
        layer = LoRALayer(base, rank, rank if alpha is None else alpha, generator)
        if layer.down.weight.device != base.weight.device:  # (fake tensors cannot be moved in place)
            layer.to(base.weight.device)
        setattr(parent, name, layer)
        layers[path] = layer
    return layers


def adapter_state(layers: dict[str, LoRALayer]) -> dict[str, torch.Tensor]:
    """The trainable tensors only (what resume needs): `<path>.down` and `<path>.up`."""
    return {
        f"{p}.{part}": getattr(layer, part).weight for p, layer in layers.items() for part in ("down", "up")
    }


def load_adapter_state(layers: dict[str, LoRALayer], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, tensor in adapter_state(layers).items():
            tensor.copy_(state[key])


def save_lora(layers: dict[str, LoRALayer], path: str | os.PathLike, config: ModelConfig,
              dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write the adapters as a kohya-format file (atomically); only the adapters, never the base weights."""
    names = kohya_names(config)
    tensors = {}
    for p, layer in layers.items():
        k = names[p]
        tensors[f"{k}.lora_down.weight"] = layer.down.weight.detach().to("cpu", dtype)
        tensors[f"{k}.lora_up.weight"] = layer.up.weight.detach().to("cpu", dtype)
        # fp32 even in fp16 files: the scale alpha/rank is then exactly what training used
        tensors[f"{k}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    meta = {**(metadata or {}), "sshs_model_hash": addnet_hash(tensors)}
    save_checkpoint(tensors, path, metadata=meta)
    return Path(path)


def kohya_metadata(
    rank: int, alpha: float, targets: str, base_name: str, config: ModelConfig
) -> dict[str, str]:
    """The `ss_*` header entries kohya writes that A1111, ComfyUI and civitai read."""
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[config.family]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_base_model_version": version, "ss_v2": str(config.family == "sd2"),
            "ss_sd_model_name": base_name}  # fmt: skip
    if targets == "all":  # kohya records LoCon (conv layers) as network args
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(float(alpha))})
    return meta


def addnet_hash(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's `sshs_model_hash`: SHA-256 of a safetensors file's data (everything after the header), which A1111
    shows as the LoRA's hash. The data does not depend on the metadata, so it can be hashed before writing."""
    return data_hash(tensors)


# ----------------------------------------------------------------------------- names


@functools.lru_cache(maxsize=8)
def kohya_names(config: ModelConfig) -> dict[str, str]:
    """Our module path -> kohya name, for every Linear and Conv2d of the UNet and text encoder(s). SD1 and SD 2.x
    LoRAs name the UNet's layers by diffusers' paths; SDXL's by SGM's (ours), CLIP-L `lora_te1_`, bigG `lora_te2_`."""
    if config.text_encoder == "sdxl":
        return _sdxl_names(config)
    rules, names = diffusers_rules(config), {}
    for path, module in build(config).named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and path.startswith((UNET, TEXT)):
            component, theirs = diffusers_name(path + ".weight", rules).split(":", 1)
            names[path] = PREFIX[component] + theirs.removesuffix(".weight").replace(".", "_")
    if config.text_encoder == "openclip":
        names.update(_openclip_names(OPENCLIP, "lora_te_", config.clip.layers))
    return names


def _openclip_names(prefix: str, lora_prefix: str, layers: int) -> dict[str, str]:
    """An OpenCLIP tower's module paths (a fused third's: fused_path) -> kohya's names for them."""
    return {path if third is None else fused_path(path.removesuffix(".in_proj"), third): name
            for name, (path, third) in _openclip_lookup(prefix, lora_prefix, layers).items()}  # fmt: skip


def _sdxl_names(config: ModelConfig) -> dict[str, str]:
    names = {}
    for path, module in build(config).named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if path.startswith(UNET):
            names[path] = "lora_unet_" + path[len(UNET) :].replace(".", "_")
        elif path.startswith(SDXL_CLIP):
            names[path] = "lora_te1_" + path[len(SDXL_CLIP) :].replace(".", "_")
    return {**names, **_openclip_names(SDXL_OPENCLIP, "lora_te2_", config.clip2.layers)}


@functools.lru_cache(maxsize=8)
def _lookup(config: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """kohya name -> (our module path, which third of a fused q/k/v weight or None). Other spellings are accepted
    too: our own CompVis one (`lora_unet_input_blocks_1_1_...`) as A1111 does, and for SDXL diffusers' paths and
    `lora_te_` for CLIP-L."""
    names = kohya_names(config)
    table = {k: (p, None) for p, k in names.items() if ".in_proj." not in p}  # fused thirds: _openclip_lookup
    table.update(
        {"lora_unet_" + p[len(UNET) :].replace(".", "_"): (p, None) for p in names if p.startswith(UNET)}
    )
    if config.text_encoder == "clip":
        table.update(
            {
                "lora_te1_" + k[len("lora_te_") :]: (p, None)
                for p, k in names.items()
                if k.startswith("lora_te_")
            }
        )
    if config.text_encoder == "openclip":  # SD 2.x's ViT-H, which kohya names as transformers does
        table.update(_openclip_lookup(OPENCLIP, "lora_te_", config.clip.layers))
    if config.text_encoder != "sdxl":
        return table
    rules = diffusers_rules(config)
    for p, k in names.items():
        if p.startswith(UNET):
            table["lora_unet_" + diffusers_name(p + ".weight", rules).split(":", 1)[1][: -len(".weight")].replace(
                ".", "_")] = (p, None)  # fmt: skip
        elif k.startswith("lora_te1_"):
            table["lora_te_" + k[len("lora_te1_") :]] = (p, None)
    table.update(_openclip_lookup(SDXL_OPENCLIP, "lora_te2_", config.clip2.layers))
    return table


def _openclip_lookup(prefix: str, lora_prefix: str, layers: int) -> dict[str, tuple[str, int | None]]:
    return {f"{lora_prefix}text_model_encoder_layers_{i}_{theirs}": (f"{prefix}transformer.resblocks.{i}.{ours}", third)
            for i in range(layers) for theirs, (ours, third) in _OPENCLIP_NAMES.items()}  # fmt: skip


# ----------------------------------------------------------------------------- reading files

# Key endings of each layout -> which tensor it is.
_KINDS = (("lora_down.weight", "down"), ("lora_up.weight", "up"), ("lora_A.weight", "down"), ("lora_B.weight", "up"),
          ("lora.down.weight", "down"), ("lora.up.weight", "up"), ("lora_linear_layer.down.weight", "down"),
          ("lora_linear_layer.up.weight", "up"), ("alpha", "alpha"))  # fmt: skip
# diffusers' attention-processor LoRAs (before peft): `attn1.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"(\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$")


@dataclass
class LoRA:
    """A LoRA file, read and checked for layout but not yet placed in a model (that needs the model's shapes)."""

    path: Path
    layers: dict[str, dict] = field(default_factory=dict)  # kohya name -> {"down", "up", "alpha", "module"}
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @functools.cached_property
    def short_hash(self) -> str:
        """The hash A1111 shows in `Lora hashes`: kohya's stored one, else computed the same way."""
        stored = self.metadata.get("sshs_model_hash")
        return (stored or _file_data_hash(self.file))[:12]

    @property
    def file(self) -> Path:
        return self.path / "pytorch_lora_weights.safetensors" if self.path.is_dir() else self.path


def read_lora(path: str | os.PathLike) -> LoRA:
    """Read a kohya, diffusers or peft LoRA file (or a diffusers LoRA folder); BoothError if it is none of them."""
    path = Path(path)
    file = path / LORA_FOLDER_FILE if path.is_dir() else path
    if not file.is_file():
        raise BoothError(f"LoRA not found: {path}")
    try:
        if file.suffix == ".safetensors":
            tensors, meta = read_safetensors(file)
        elif file.suffix in PICKLE_SUFFIXES:
            tensors, meta = read_pickle(file), {}
        else:
            raise BoothError(f"unknown LoRA format {file.suffix!r} ({file}); use a .safetensors file")
    except OSError as e:
        raise BoothError(f"cannot read the LoRA {file}: {e.strerror or e}") from None
    if not looks_like_lora(tensors) and any(
        k.startswith((UNET, TEXT, "first_stage_model.")) for k in tensors
    ):
        raise BoothError(
            f"{path} is a full model, not a LoRA: give it as the model (-m), and LoRA files with --lora"
        )
    lora = LoRA(path, _group(tensors, path), meta)
    _fill_alphas(lora)
    return lora


def _group(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict]:
    layers: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise BoothError(f"{path} is a DoRA, which booth does not support yet (key {key})")
        module, kind = _split(key)
        if module is None:
            raise BoothError(f"{path} is not a LoRA booth can read: unknown key layout ({key}); kohya, diffusers "
                             "and peft LoRAs are supported, LyCORIS LoHa/LoKr are not")  # fmt: skip
        entry = layers.setdefault(_kohya_name(module), {"module": module})
        entry[kind] = _alpha(tensor, key, path) if kind == "alpha" else tensor
    for name, entry in layers.items():
        if "down" not in entry or "up" not in entry:
            missing = "up" if "down" in entry else "down"
            raise BoothError(f"{path} is incomplete: layer {name} has no {missing} weight")
        if entry["down"].ndim < 2 or entry["down"].shape[0] < 1:
            raise BoothError(
                f"{path} is damaged: layer {name} has rank 0 (down weight {tuple(entry['down'].shape)})"
            )
    if not layers:
        raise BoothError(f"{path} holds no LoRA weights")
    return layers


def _alpha(tensor: torch.Tensor, key: str, path: Path) -> float:
    value = float(tensor.float().reshape(-1)[0]) if tensor.numel() == 1 else math.nan
    if not math.isfinite(value):
        raise BoothError(f"{path} is damaged: {key} is not one finite number (shape {tuple(tensor.shape)})")
    return value


def _split(key: str) -> tuple[str | None, str | None]:
    """'<module>.<ending>' -> (module, 'down' | 'up' | 'alpha'), or (None, None) for an unknown layout."""
    key = _PROCESSOR.sub(lambda m: f".to_{m[2]}{'.0' if m[2] == 'out' else ''}.lora.{m[3]}.weight", key)
    for ending, kind in _KINDS:
        if key.endswith("." + ending):
            return key[: -len(ending) - 1], kind
    return None, None


def _kohya_name(module: str) -> str:
    """Any layout's module name -> the kohya name (`lora_unet_...` / `lora_te_...`)."""
    module = module.removeprefix("base_model.model.")
    if module.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        return module
    component, rest = _component(module)
    if component != "unet":
        # diffusers' old text-encoder names, and transformers 5's CLIPTextModel without its text_model level
        rest = re.sub(r"self_attn\.to_(q|k|v)$", r"self_attn.\1_proj", rest).replace(
            "self_attn.to_out.0", "self_attn.out_proj"
        )
        rest = rest if rest.startswith("text_model.") else "text_model." + rest
    return PREFIX[component] + rest.replace(".", "_")


def _component(module: str) -> tuple[str, str]:
    for component in ("unet", "text_encoder_2", "text_encoder"):
        if module.startswith(component + "."):
            return component, module[len(component) + 1 :]
    # peft state dicts of a single model carry no prefix; text-encoder paths are unmistakable
    return ("text_encoder" if module.startswith(("text_model.", "encoder.layers.")) else "unet"), module


def _fill_alphas(lora: LoRA) -> None:
    """Layers without an `.alpha` tensor take peft's lora_alpha (or alpha_pattern) from diffusers' header
    metadata when there is one, else alpha = rank (scale 1), as diffusers and A1111 assume."""
    peft = _peft_metadata(lora)
    for entry in lora.layers.values():
        component, module = _component(entry["module"])
        cfg = {k.split(".", 1)[1]: v for k, v in peft.items() if k.startswith(component + ".")}
        if cfg.get("use_dora"):
            raise BoothError(f"{lora.path} is a DoRA, which booth does not support yet")
        rank = entry["down"].shape[0]
        if "alpha" not in entry:
            entry["alpha"] = _peft_alpha(cfg, module, rank, lora.path)
        if cfg.get("use_rslora"):  # rank-stabilised: scale alpha / sqrt(rank)
            entry["alpha"] *= math.sqrt(rank)


def _peft_metadata(lora: LoRA) -> dict:
    try:
        peft = json.loads(lora.metadata.get("lora_adapter_metadata") or "{}")
    except (ValueError, RecursionError):
        peft = None
    if not isinstance(peft, dict):
        raise BoothError(
            f"{lora.path} has malformed peft metadata (lora_adapter_metadata is not a JSON object)"
        )
    return peft


def _peft_alpha(cfg: dict, module: str, rank: int, path: Path) -> float:
    patterns = cfg.get("alpha_pattern") or {}
    try:
        pattern = next((p for p in patterns if re.fullmatch(rf"(.*\.)?({p})", module)), None)
        alpha = float(patterns[pattern] if pattern else cfg.get("lora_alpha", rank))
    except (TypeError, ValueError, AttributeError, re.error):
        raise BoothError(f"{path} has malformed peft metadata (lora_alpha or alpha_pattern)") from None
    if not math.isfinite(alpha):
        raise BoothError(f"{path} has malformed peft metadata (lora_alpha {alpha})")
    return alpha


def _file_data_hash(file: Path) -> str:
    """A1111's LoRA hash: SHA-256 of the data after a safetensors header; of the whole file otherwise."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        if file.suffix == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- applying


def parse_spec(spec: str) -> tuple[Path, float]:
    """'FILE[:WEIGHT]' -> (path, weight). A suffix that is not a number belongs to the path (C:\\x, a:b.safetensors)."""
    head, sep, tail = spec.rpartition(":")
    try:
        path, weight = (Path(head), float(tail)) if sep and head else (Path(spec), 1.0)
    except ValueError:
        path, weight = Path(spec), 1.0
        if Path(head).is_file() and not path.exists():
            raise BoothError(f"--lora {spec}: the weight after ':' must be a number (got {tail!r})") from None
    check_weight(weight, spec)
    return path, weight


def check_weight(weight: float, what: str) -> None:
    # Negative weights are allowed: they invert a LoRA, which people use (sliders, "less detail").
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise BoothError(
            f"LoRA weight {weight} of {what} is out of range; use a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}"
        )


def read_specs(specs: Sequence[str]) -> list[tuple[LoRA, float]]:
    """Every `--lora FILE[:WEIGHT]`, read and checked before any model is loaded."""
    out = []
    for spec in specs:
        path, weight = parse_spec(spec)
        out.append((read_lora(path), weight))
    return out


def updates(lora: LoRA, config: ModelConfig, shapes: dict[str, torch.Size]) -> dict[str, list[tuple]]:
    """Our weight key -> [(down, up, alpha / rank)] for every layer of `lora`, checked against the model's shapes;
    a layer of a fused q/k/v weight (OpenCLIP's in_proj) has its up padded with zeros to the other two thirds."""
    table, out, unknown = _lookup(config), {}, []
    for name, entry in lora.layers.items():
        if name not in table:
            unknown.append(name)
            continue
        path, third = table[name]
        key, down, up = path + (".weight" if third is None else "_weight"), entry["down"], entry["up"]
        shape, rank = shapes[key], down.shape[0]
        rows = shape[0] if third is None else shape[0] // 3
        if down.ndim < 2 or up.ndim < 2 or up.shape[0] != rows or up[0].numel() != rank or (
            down[0].numel() != shape[1:].numel()
        ):  # fmt: skip
            raise BoothError(
                f"{lora.path} does not fit this model: its {name} is {_io(down, up)} but the model's layer is "
                f"{shape[1]}->{rows} (a LoRA for another family: SD1, SD2 or SDXL?)"
            )  # fmt: skip
        if third is not None:
            up = torch.zeros(shape[0], *up.shape[1:], dtype=up.dtype).index_copy_(
                0, torch.arange(third * rows, (third + 1) * rows), up
            )
        out.setdefault(key, []).append((down, up, entry["alpha"] / rank))
    if unknown:
        raise BoothError(f"{lora.path} has {len(unknown)} layer(s) this model does not have (e.g. {unknown[0]}); "
                         f"it is not a LoRA for this {_FAMILY_NAMES[config.family]} model")  # fmt: skip
    return out


_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def _io(down: torch.Tensor, up: torch.Tensor) -> str:
    return f"{down.shape[1] if down.ndim > 1 else '?'}->{up.shape[0]}"


@torch.no_grad()
def merge(weights: dict[str, torch.Tensor], loras: Sequence[tuple[LoRA, float]], config: ModelConfig,
          keep: bool = True, only: set[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Add every (LoRA, weight) into `weights` (a state dict whose tensors are changed in place), summed in fp32
    and rounded once per layer; with `only`, into those keys alone (the networks in memory). Every LoRA is checked
    before anything changes. Returns CPU copies of the tensors it replaced (with `keep`), for `restore`."""
    shapes = {k: v.shape for k, v in weights.items()}
    placed = [(updates(lora, config, shapes), weight) for lora, weight in loras]
    originals = {}
    for key in dict.fromkeys(k for layer_updates, _ in placed for k in layer_updates):
        if only is not None and key not in only:
            continue
        w = weights[key]
        delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for layer_updates, weight in placed:
            for down, up, scale in layer_updates.get(key, ()):
                down, up = (t.to(w.device, torch.float32).flatten(1) for t in (down, up))
                delta += (up @ down).reshape(w.shape) * (scale * weight)
        if keep:
            originals[key] = w.to("cpu", copy=True)
        w.copy_(w.float() + delta)
    return originals


@torch.no_grad()
def restore(weights: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> None:
    for key, value in originals.items():
        weights[key].copy_(value)


def merge_to_file(base: str, loras: Sequence[tuple[LoRA, float]], out: Path, save_precision: str = "fp16",
                  ema: bool = False) -> Path:  # fmt: skip
    """`booth merge`: the base model with the LoRAs added into its weights, as one single file (CompVis layout)
    that any SD tool loads like a checkpoint."""
    found = find_model(base, "-m")
    ckpt = read_checkpoint(found.path, ema=ema)
    dtype = SAVE_DTYPES[save_precision]
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    merge(weights, loras, ckpt.config, keep=False)
    merged = [{"name": lora.name, "hash": lora.short_hash, "weight": w} for lora, w in loras]
    meta = {"booth.base_model": base, "booth.base_hash": file_hash(found.path) if found.path.is_file() else "",
            "booth.loras": json.dumps(merged)}  # fmt: skip
    save_checkpoint(weights, out, metadata=meta, config=ckpt.config)
    return out
