"""Reading and writing Stable Diffusion v1 weights in every format users have.

- single-file `.safetensors` (validated before its header is trusted) and `.ckpt`/`.pt` pickles (loaded with
  `torch.load(weights_only=True)`: a pickle that needs code to load is refused, never run);
- diffusers folders (`model_index.json`, `unet/`, `vae/`, `text_encoder/`), renamed to the CompVis layout by a
  small table of prefix rules.

Everything comes out as a state dict in the `LatentDiffusion` layout plus the `ModelConfig` it needs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import openclip
from .atomic import atomic_path
from .config import SD1, SDXL, CLIPConfig, ModelConfig, UNetConfig, VAEConfig
from .errors import BoothError, first_line
from .formats import (
    PICKLE_SUFFIXES,
    SDXL_COMPONENT,
    WEIGHTS_PREFERENCE,
    looks_like_lora,
    not_a_model,
    pickle_contents,
    safetensors_header,
)
from .model import build, part_modules, part_of

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPENCLIP = "cond_stage_model.model."  # SD 2.x's text encoder (booth.model.text_prefix)
SDXL_CLIP, SDXL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
CONFIG_KEY = "booth.config"  # safetensors metadata entry holding a booth-written file's ModelConfig
# An empty tensor some tools (ComfyUI, kohya) put in a v-prediction model's single file to say so
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"  # and one some put in a model trained to zero terminal SNR (with v_pred)

# Keys of CompVis checkpoints that are not weights of the three networks.
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
}  # fmt: skip
# What SD 2.x and SDXL files keep beyond the networks: OpenCLIP's contrastive temperature and its causal mask,
# and SGM's table of the training sigmas (the schedule comes from the config), used by no sampler
_EXTRAS = {OPENCLIP + "logit_scale", OPENCLIP + "attn_mask", SDXL_OPENCLIP + "logit_scale",
           SDXL_OPENCLIP + "attn_mask", "denoiser.sigmas"}  # fmt: skip
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass
class Checkpoint:
    """Weights in the LatentDiffusion layout, still in the file's dtype."""

    path: Path
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    vae: Path | None = None  # a VAE put in place of the file's own (use_vae)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


# ----------------------------------------------------------------------------- single files


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors file, after checking the header against the file size.

    Each tensor is read into its own buffer rather than memory-mapped: a mapped file stays resident until its
    last tensor is freed, so converting an fp16 file to fp32 would briefly hold both copies."""
    header, start = safetensors_header(path)
    with open(path, "rb") as f:
        tensors = {k: _read_tensor(f, path, k, v, start) for k, v in header.items() if k != "__metadata__"}
    return tensors, header.get("__metadata__") or {}


def _read_tensor(f, path: Path, name: str, info: dict, start: int) -> torch.Tensor:
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if f.readinto(buf.numpy()) != end - begin:
        raise BoothError(f"{path} is truncated (while reading {name})")
    return buf.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


# ----------------------------------------------------------------------------- reading weights only when needed


class Stub:
    """A tensor of a model file that has not been read yet: its dtype and shape, and where to read it from. The
    layout code (`to_layout`, `read_diffusers`, `infer_config`, the checks of `load_model`) treats it as the
    tensor it stands for, so a model's networks can be checked up front and read one at a time later."""

    __slots__ = ("file", "key", "dtype", "shape", "op")

    def __init__(
        self, file: _File, key: str | tuple[str, ...], dtype: torch.dtype, shape, op: str | None = None
    ):
        """`op` "cat": the tensors of the keys `key` one after the other (a fused weight); "t": the transpose."""
        self.file, self.key, self.dtype, self.shape, self.op = file, key, dtype, torch.Size(shape), op

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def reshape(self, shape) -> Stub:
        if math.prod(shape) != self.numel():
            raise ValueError(f"cannot reshape {tuple(self.shape)} to {tuple(shape)}")
        return Stub(self.file, self.key, self.dtype, shape, self.op)

    def __getitem__(self, index) -> Stub:  # only reshaping views such as [:, :, None, None]
        return self.reshape(torch.empty(self.shape, device="meta")[index].shape)


class _File:
    """One weights file that Stubs read from; `opened()` yields `read(key, device, dtype)`, which returns a tensor
    of its own (never a view of a mapped file) converted to the device and, for floats, the dtype."""

    def __init__(self, path: Path):
        self.path, self._stamp = path, _stamp(path)

    def opened(self):
        raise NotImplementedError

    def check(self) -> None:
        try:
            same = _stamp(self.path) == self._stamp
        except OSError:
            same = False
        if not same:
            raise BoothError(f"{self.path} changed or went away while booth was using it; run booth again")


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class _SafetensorsFile(_File):
    @contextmanager
    def opened(self):
        self.check()
        header, start = safetensors_header(self.path)
        with open(self.path, "rb") as f:
            yield lambda key, device, dtype: _convert(_read_tensor(f, self.path, key, header[key], start), device,
                                                      dtype)  # fmt: skip


class _PickleFile(_File):
    @contextmanager
    def opened(self):
        self.check()
        tensors = read_pickle(self.path)  # memory-mapped: only what is read is paged in (not a legacy pickle)
        mapped = _mappings(self.path)

        def read(key, device, dtype):
            t = tensors[key]
            out = _convert(t, device, dtype, copy=True)
            _release_pages(t, mapped)
            return out

        yield read
        tensors.clear()  # the file's mapping goes with its last tensor


def _convert(t: torch.Tensor, device, dtype, copy: bool = False) -> torch.Tensor:
    return t.to(
        device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=copy
    )


_MADV_DONTNEED = 4


def _release_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Take the pages of a memory-mapped tensor that has been copied out of this process's RSS: they would stay
    resident, counted twice with the copy, until torch unmaps the file with its last tensor. The pages are
    unchanged copies of the file (a private mapping), so the kernel reads them again if they are touched. Only
    inside `mapped`, the file's own mappings: in other memory MADV_DONTNEED would zero the pages."""
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    if not _LIBC or not any(a <= begin and end <= b for a, b in mapped):
        return
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page  # whole pages only: a neighbour may share one
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path` (Linux's /proc/self/maps; none elsewhere)."""
    if not _LIBC:
        return []
    real, out = str(path.resolve()), []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            a, b = fields[0].split("-")
            out.append((int(a, 16), int(b, 16)))
    return out


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc if os.uname().sysname == "Linux" else None
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def read_stubs(
    stubs: Mapping[str, Stub | torch.Tensor], device=None, dtype=None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for each entry, read from its file one at a time (each file opened once), floats converted to
    `dtype` on `device` as they are read; entries that are tensors already are only converted."""
    files: dict[_File | None, list[str]] = {}
    for k, v in stubs.items():
        files.setdefault(v.file if isinstance(v, Stub) else None, []).append(k)
    for file, keys in files.items():
        if file is None:
            yield from ((k, _convert(stubs[k], device, dtype)) for k in keys)
            continue
        with file.opened() as read:
            for k in keys:
                stub = stubs[k]
                if stub.op == "cat":
                    t = torch.cat([read(key, device, dtype) for key in stub.key])
                else:
                    t = read(stub.key, device, dtype)
                yield k, (t.t().contiguous() if stub.op == "t" else t).reshape(stub.shape)


def _safetensors_stubs(path: Path) -> tuple[dict[str, Stub], dict[str, str]]:
    header, _ = safetensors_header(path)
    file = _SafetensorsFile(path)
    stubs = {k: Stub(file, k, _SAFETENSORS_DTYPES[v["dtype"]], v["shape"]) for k, v in header.items()
             if k != "__metadata__"}  # fmt: skip
    return stubs, header.get("__metadata__") or {}


def _pickle_stubs(path: Path) -> dict[str, Stub]:
    file = _PickleFile(path)
    return {k: Stub(file, k, v.dtype, v.shape) for k, v in read_pickle(path).items()}


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt`/`.bin` pickle, loaded with weights_only=True so no code in it can run."""
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        # torch names the global it refused; for pickles it stops reading earlier, we look for one ourselves.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        code = [found.group(1)] if found else _code_globals(path)
        if code:
            raise BoothError(
                f"refusing to load {path}: it is a pickle that needs code to run ({', '.join(code[:3])}); booth "
                "loads only plain tensors from .ckpt files, so get a .safetensors version of this model"
            ) from None
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Unsupported")), "")
        raise BoothError(
            f"{path} is not a readable checkpoint ({reason or 'not a weights-only pickle'})"
        ) from None
    except PermissionError:
        raise BoothError(f"cannot read {path}: permission denied") from None
    except Exception as e:  # a damaged or crafted file can fail anywhere in torch.load's parser
        raise BoothError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise BoothError(f"{path} does not hold a state dict of tensors")
    return obj


def _torch_load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about pickle protocols it then handles fine
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (pre-zip) pickles cannot be memory-mapped; read them plainly
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


_SAFE_GLOBALS = re.compile(
    r"torch\._utils\._rebuild_\w+|torch\.\w*Storage|collections\.OrderedDict"
    r"|torch\.(Size|device|float\d*|bfloat16|half|int\d*|uint8|bool|long)"
)


def _code_globals(path: Path) -> list[str]:
    """Names of functions/classes a pickle would import, other than torch's tensor rebuilding."""
    return [n for n in pickle_contents(path)[0] if not _SAFE_GLOBALS.fullmatch(n)]


def to_layout(
    sd: dict[str, torch.Tensor], ema: bool = False, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Normalise a single-file state dict to the LatentDiffusion layout: drop non-weights, pick EMA or not,
    insert the `text_model.` level that some old files lack, and reshape linear VAE attention weights."""
    out = {}
    for k, v in sd.items():
        if (
            k in _SCHEDULE_BUFFERS
            or k in _EXTRAS
            or k in (V_PRED_KEY, ZTSNR_KEY)
            or k.startswith("model_ema.")
            or k.endswith("position_ids")
        ):
            continue
        for text in (TEXT, SDXL_CLIP):
            if k.startswith(text) and not k.startswith(text + "text_model."):
                k = text + "text_model." + k[len(text) :]
        if k.startswith(VAE) and re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) and v.ndim == 2:
            v = v[:, :, None, None]
        out[k] = v
    if ema:
        _use_ema(out, sd, source)
    return out


def _use_ema(out: dict, sd: dict, source: str) -> None:
    flat = {k[len("model_ema.") :]: v for k, v in sd.items() if k.startswith("model_ema.")}
    unet_keys = [k for k in out if k.startswith(UNET)]
    missing = [k for k in unet_keys if k[len("model.") :].replace(".", "") not in flat]
    if len(flat) < 2 or missing:
        raise BoothError(
            f"--ema was given but {source} has no (complete) model_ema.* weights; "
            "it is probably an EMA-only file already (like v1-5-pruned-emaonly): drop --ema"
        )
    for k in unet_keys:
        out[k] = flat[k[len("model.") :].replace(".", "")]


# ----------------------------------------------------------------------------- config from shapes


def infer_config(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """Recover the ModelConfig from tensor shapes (as ComfyUI does). Head counts are not visible in shapes:
    SD1 conventions are used (8 UNet heads, CLIP heads of width 64)."""
    try:
        if any(k.startswith("conditioner.") for k in sd):
            cfg = ModelConfig(unet=_infer_unet(sd), vae=_infer_vae(sd), clip=_infer_clip(sd, SDXL_CLIP),
                              clip2=_infer_openclip(sd, SDXL_OPENCLIP), text_encoder="sdxl",
                              scale_factor=SDXL.scale_factor, sample_size=SDXL.sample_size)  # fmt: skip
        elif any(k.startswith(OPENCLIP) for k in sd):
            cfg = ModelConfig(unet=_infer_unet(sd), vae=_infer_vae(sd), clip=_infer_openclip(sd, OPENCLIP),
                              text_encoder="openclip")  # fmt: skip
        else:
            cfg = ModelConfig(unet=_infer_unet(sd), vae=_infer_vae(sd), clip=_infer_clip(sd, TEXT))
    except KeyError as e:
        raise BoothError(
            f"{source} is not a Stable Diffusion 1.x, 2.x or XL checkpoint: it has no {e.args[0]}"
        ) from None
    return checked(cfg, source)


def checked(cfg: ModelConfig, source: str) -> ModelConfig:
    """`cfg`, if a model can be built from it; else a BoothError naming where it came from."""
    try:
        cfg.validate()
    except ValueError as e:
        raise BoothError(f"the model config of {source} is impossible: {e}") from None
    return cfg


def _indices(sd: dict, prefix: str) -> list[int]:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def _infer_unet(sd: dict) -> UNetConfig:
    p = UNET
    conv_in = sd[p + "input_blocks.0.0.weight"]
    mc = conv_in.shape[0]
    mults, attn, depths, level, n_res = [], [], [], 0, 0
    for i in _indices(sd, p + "input_blocks.")[1:]:
        if p + f"input_blocks.{i}.0.op.weight" in sd:
            level += 1
            continue
        if level == len(mults):
            mults.append(sd[p + f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] // mc)
            depths.append(len(_indices(sd, p + f"input_blocks.{i}.1.transformer_blocks.")))
            n_res = 0
        n_res += 1
        if p + f"input_blocks.{i}.1.proj_in.weight" in sd and 2**level not in attn:
            attn.append(2**level)
    tb = p + "middle_block.1.transformer_blocks."
    context = sd[tb + "0.attn2.to_k.weight"].shape[1]
    label = sd.get(p + "label_emb.0.0.weight")
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=sd[p + "out.2.weight"].shape[0],
        model_channels=mc,
        channel_mult=tuple(mults),
        num_res_blocks=n_res,
        attention_resolutions=tuple(attn),
        transformer_depth=tuple(depths),
        transformer_depth_middle=len(_indices(sd, tb)),
        context_dim=context,
        # head counts are not in the shapes: SD 2.x and SDXL (1024- and 2048-wide text) use 64-channel heads
        num_head_channels=64 if context >= 1024 else None,
        linear_proj=sd[p + "middle_block.1.proj_in.weight"].ndim == 2,
        adm_in_channels=0 if label is None else label.shape[1],
    )


def _infer_vae(sd: dict) -> VAEConfig:
    p = VAE + "encoder."
    ch = sd[p + "conv_in.weight"].shape[0]
    levels = _indices(sd, p + "down.")
    return VAEConfig(
        in_channels=sd[p + "conv_in.weight"].shape[1],
        out_ch=sd[VAE + "decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=tuple(sd[p + f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels),
        num_res_blocks=len(_indices(sd, p + "down.0.block.")),
        z_channels=sd[VAE + "decoder.conv_in.weight"].shape[1],
        embed_dim=sd[VAE + "post_quant_conv.weight"].shape[1],
    )


def _infer_clip(sd: dict, prefix: str) -> CLIPConfig:
    p = prefix + "text_model."
    vocab, width = sd[p + "embeddings.token_embedding.weight"].shape
    return CLIPConfig(
        vocab_size=vocab,
        width=width,
        layers=len(_indices(sd, p + "encoder.layers.")),
        heads=max(1, width // 64),
        intermediate=sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        max_positions=sd[p + "embeddings.position_embedding.weight"].shape[0],
    )


def _infer_openclip(sd: dict, prefix: str) -> CLIPConfig:
    """OpenCLIP's text tower, SD 2.x's ViT-H or SDXL's bigG (its heads are 64 channels wide, as in every OpenCLIP
    model)."""
    p = prefix
    vocab, width = sd[p + "token_embedding.weight"].shape
    return CLIPConfig(
        vocab_size=vocab,
        width=width,
        layers=len(_indices(sd, p + "transformer.resblocks.")),
        heads=max(1, width // 64),
        intermediate=sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        max_positions=sd[p + "positional_embedding"].shape[0],
        act="gelu",
        projection=sd[p + "text_projection"].shape[1],
    )


# ----------------------------------------------------------------------------- diffusers folders

_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
           "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}  # fmt: skip
_VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
# Names of diffusers releases before 0.14 for the VAE attention.
_OLD_VAE_ATTN = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def diffusers_rules(cfg: ModelConfig) -> list[tuple[str, str, dict[str, str]]]:
    """(our prefix, diffusers prefix, renames of what follows the prefix), most specific first."""
    rules = _unet_rules(cfg.unet) + _vae_rules(cfg.vae)
    rules += [
        (TEXT + "text_model.", "text_encoder:text_model.", {}),
        (SDXL_CLIP + "text_model.", "text_encoder:text_model.", {}),
    ]
    return rules


def _unet_rules(u: UNetConfig) -> list:
    P, n, levels = UNET, u.num_res_blocks, len(u.channel_mult)
    r = [(P + "time_embed.0.", "unet:time_embedding.linear_1.", {}), (P + "time_embed.2.", "unet:time_embedding.linear_2.", {}),
         (P + "input_blocks.0.0.", "unet:conv_in.", {}), (P + "out.0.", "unet:conv_norm_out.", {}),
         (P + "out.2.", "unet:conv_out.", {}), (P + "middle_block.0.", "unet:mid_block.resnets.0.", _RESNET),
         (P + "middle_block.1.", "unet:mid_block.attentions.0.", {}),
         (P + "middle_block.2.", "unet:mid_block.resnets.1.", _RESNET),
         (P + "label_emb.0.0.", "unet:add_embedding.linear_1.", {}), (P + "label_emb.0.2.", "unet:add_embedding.linear_2.", {})]  # fmt: skip
    for i in range(levels):
        has_attn = 2**i in u.attention_resolutions
        for j in range(n):
            b = f"{P}input_blocks.{1 + i * (n + 1) + j}."
            r.append((b + "0.", f"unet:down_blocks.{i}.resnets.{j}.", _RESNET))
            if has_attn:
                r.append((b + "1.", f"unet:down_blocks.{i}.attentions.{j}.", {}))
        if i < levels - 1:
            r.append(
                (
                    f"{P}input_blocks.{(i + 1) * (n + 1)}.0.op.",
                    f"unet:down_blocks.{i}.downsamplers.0.conv.",
                    {},
                )
            )
        up, up_attn = (
            levels - 1 - i,
            2 ** (levels - 1 - i) in u.attention_resolutions,
        )  # diffusers counts upward
        for j in range(n + 1):
            b = f"{P}output_blocks.{i * (n + 1) + j}."
            r.append((b + "0.", f"unet:up_blocks.{i}.resnets.{j}.", _RESNET))
            if up_attn:
                r.append((b + "1.", f"unet:up_blocks.{i}.attentions.{j}.", {}))
        if up:
            b = f"{P}output_blocks.{i * (n + 1) + n}.{2 if up_attn else 1}."
            r.append((b, f"unet:up_blocks.{i}.upsamplers.0.", {}))
    return r


def _vae_rules(v: VAEConfig) -> list:
    levels, r = len(v.ch_mult), []
    for part in ("encoder", "decoder"):
        p, d = f"{VAE}{part}.", f"vae:{part}."
        r += [(p + "norm_out.", d + "conv_norm_out.", {}), (p + "mid.block_1.", d + "mid_block.resnets.0.", _VAE_RESNET),
              (p + "mid.block_2.", d + "mid_block.resnets.1.", _VAE_RESNET),
              (p + "mid.attn_1.", d + "mid_block.attentions.0.", _VAE_ATTN)]  # fmt: skip
    for i in range(levels):
        r.append((f"{VAE}encoder.down.{i}.block.", f"vae:encoder.down_blocks.{i}.resnets.", _VAE_RESNET))
        r.append((f"{VAE}encoder.down.{i}.downsample.", f"vae:encoder.down_blocks.{i}.downsamplers.0.", {}))
        up = levels - 1 - i
        r.append((f"{VAE}decoder.up.{up}.block.", f"vae:decoder.up_blocks.{i}.resnets.", _VAE_RESNET))
        r.append((f"{VAE}decoder.up.{up}.upsample.", f"vae:decoder.up_blocks.{i}.upsamplers.0.", {}))
    r.append((VAE, "vae:", {}))  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
    return r


def diffusers_name(key: str, rules: list) -> str:
    """Our key -> 'component:diffusers key'."""
    for ours, theirs, renames in rules:
        if key.startswith(ours):
            return theirs + _rename(key[len(ours) :], renames)
    raise KeyError(key)


def _rename(rest: str, renames: dict[str, str]) -> str:
    # Block-list rules (`...block.`) leave `j.` in front of the layer name.
    m = re.match(r"(\d+\.)?(.*)", rest)
    index, tail = m.group(1) or "", m.group(2)
    for old, new in renames.items():
        if tail.startswith(old):
            return index + new + tail[len(old) :]
    return rest


def read_diffusers(folder: Path, lazy: bool = False) -> Checkpoint:
    """A diffusers-format folder as a Checkpoint in the CompVis layout (of Stubs, with `lazy`)."""
    cfg = diffusers_config(folder)
    names = ("unet", "vae", "text_encoder", *([SDXL_COMPONENT] if cfg.clip2 else []))
    parts = {name: _read_component(folder / name, lazy) for name in names}
    for old, new in _OLD_VAE_ATTN.items():
        parts["vae"] = {
            k.replace(f".attentions.0.{old}", f".attentions.0.{new}"): v for k, v in parts["vae"].items()
        }
    if not any(k.startswith("text_model.") for k in parts["text_encoder"]):  # newer transformers flatten it
        parts["text_encoder"] = {"text_model." + k: v for k, v in parts["text_encoder"].items()}
    rules, sd, missing = diffusers_rules(cfg), {}, []
    towers = {
        "sdxl": (SDXL_COMPONENT, cfg.clip2, SDXL_OPENCLIP),
        "openclip": ("text_encoder", cfg.clip, OPENCLIP),
    }
    if cfg.text_encoder in towers:  # OpenCLIP's weights, from transformers' names
        component, clip, prefix = towers[cfg.text_encoder]
        try:
            sd.update(_openclip_weights(parts[component], clip, prefix))
        except KeyError as e:
            raise BoothError(f"{folder / component} is missing the weight {e.args[0]}") from None
    for key, meta in build(cfg).state_dict().items():
        if key in sd:
            continue
        try:
            component, name = diffusers_name(key, rules).split(":", 1)
        except KeyError:  # an OpenCLIP weight _openclip_weights did not find
            missing.append(key)
            continue
        t = parts[component].get(name)
        if t is None:
            missing.append(f"{component}/{name}")
            continue
        sd[key] = t.reshape(meta.shape) if t.shape != meta.shape and t.numel() == meta.numel() else t
    if missing:
        raise BoothError(f"{folder} is missing {len(missing)} weights the model needs, e.g. {missing[0]}")
    return Checkpoint(folder, cfg, sd, {})


# transformers' names of an OpenCLIP layer's parts (diffusers' text_encoder_2), where they are not fused
_OPENCLIP_LAYER = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                   "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}  # fmt: skip


def _openclip_weights(t: dict, cfg: CLIPConfig, prefix: str) -> dict:
    """A transformers CLIPTextModel(WithProjection)'s weights (SDXL's diffusers text_encoder_2, SD 2.x's
    text_encoder) under OpenCLIP's names at `prefix`: q, k and v stacked into in_proj, the projection transposed
    (a Linear's weight there). SD 2.x folders lack OpenCLIP's last layer and projection (see `_dropped`)."""
    tm = "text_model."
    t = {k if k.startswith((tm, "text_projection.")) else tm + k: v for k, v in t.items()}
    out = {prefix + "token_embedding.weight": t[tm + "embeddings.token_embedding.weight"],
           prefix + "positional_embedding": t[tm + "embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": t[tm + "final_layer_norm.weight"],
           prefix + "ln_final.bias": t[tm + "final_layer_norm.bias"]}  # fmt: skip
    layers = len(_indices(t, tm + "encoder.layers."))
    if "text_projection.weight" in t:
        out[prefix + "text_projection"] = _joined([t["text_projection.weight"]], "t")
    elif layers == cfg.layers - 1:
        out.update(_dropped(cfg, prefix, out[prefix + "ln_final.weight"].dtype))
    for i in range(min(layers, cfg.layers)):
        ours, theirs = f"{prefix}transformer.resblocks.{i}.", f"{tm}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{ours}attn.in_proj_{kind}"] = _joined(
                [t[f"{theirs}self_attn.{x}_proj.{kind}"] for x in "qkv"], "cat"
            )
            out.update({ours + o + kind: t[theirs + th + kind] for o, th in _OPENCLIP_LAYER.items()})
    return out


def _dropped(cfg: CLIPConfig, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What diffusers' SD 2.x folders leave out, as SD 2.x's conditioning never reaches it: OpenCLIP's last layer,
    filled with zeros (a residual layer whose output projections are zero passes its input through), and a zero
    text projection. The penultimate layer's output, which SD 2.x conditions on, is the folder's last one."""
    with torch.device("meta"):
        block = openclip.ResidualAttentionBlock(cfg.width, cfg.heads, cfg.intermediate)
    ours = f"{prefix}transformer.resblocks.{cfg.layers - 1}."
    out = {ours + k: torch.zeros(v.shape, dtype=dtype) for k, v in block.state_dict().items()}
    return {**out, prefix + "text_projection": torch.zeros(cfg.width, cfg.projection, dtype=dtype)}


def _joined(parts: list, op: str):
    """Tensors (or Stubs of one file) concatenated ("cat") or the one transposed ("t")."""
    if not isinstance(parts[0], Stub):
        return torch.cat(parts) if op == "cat" else parts[0].t().contiguous()
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) if op == "cat" else parts[0].shape[::-1]
    key = tuple(p.key for p in parts) if op == "cat" else parts[0].key
    return Stub(parts[0].file, key, parts[0].dtype, shape, op)


def _read_component(folder: Path, lazy: bool = False) -> dict[str, torch.Tensor | Stub]:
    """The first weights file of a diffusers component folder in booth.formats.WEIGHTS_PREFERENCE, the order the
    Hub download fetches by."""
    for name in WEIGHTS_PREFERENCE:
        f = folder / name
        if f.is_file():
            return _read_file(f, lazy)[0]
    raise BoothError(
        f"no weights found in {folder} (expected one of {', '.join(WEIGHTS_PREFERENCE[:2])}, ...)"
    )


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BoothError(f"{path} is missing; is {path.parent.parent} a complete diffusers folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BoothError(f"{path} is not valid JSON ({e})") from None


def diffusers_config(folder: Path) -> ModelConfig:
    parts, raw = {}, {}
    for name, part_config in (
        ("unet", _diffusers_unet),
        ("vae", _diffusers_vae),
        ("text_encoder", _diffusers_clip),
    ):
        raw[name] = _json(folder / name / "config.json")
        parts[name] = _diffusers_part(folder / name / "config.json", part_config)
    xl = (folder / SDXL_COMPONENT / "config.json").is_file()
    clip = parts["text_encoder"]
    sd2 = not xl and clip.act == "gelu"  # OpenCLIP's activation, not CLIP-L's
    if sd2:  # diffusers dropped OpenCLIP's last layer and projection (_dropped); ViT-H's projection is square
        clip = dataclasses.replace(clip, layers=clip.layers + 1, projection=clip.width)
    cfg = ModelConfig(
        unet=parts["unet"],
        vae=parts["vae"],
        clip=clip,
        text_encoder="openclip" if sd2 else "clip",
        scale_factor=raw["vae"].get("scaling_factor", 0.18215),
        prediction=_prediction(folder),
        zero_snr=_scheduler(folder).get("rescale_betas_zero_snr") is True,
        sample_size=_sample_size(raw["unet"], parts["vae"], (SDXL if xl else SD1).sample_size),
    )
    if xl:
        clip2 = _diffusers_part(folder / SDXL_COMPONENT / "config.json", _diffusers_openclip)
        cfg = dataclasses.replace(cfg, clip2=clip2, text_encoder="sdxl")
    return checked(cfg, str(folder))


def _sample_size(unet: dict, vae: VAEConfig, default: int) -> int:
    """The image side a diffusers UNet config says the model was trained at (its latent side times the VAE's
    downscale), or the family's `default` where it says nothing usable."""
    latent = unet.get("sample_size")
    return latent * vae.downscale if type(latent) is int and 0 < latent <= 1024 else default


def _diffusers_part(path: Path, part_config):
    try:
        part = part_config(_json(path))
        part.validate()
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        what = f"has no {e.args[0]!r}" if isinstance(e, KeyError) else f"has an impossible value ({e})"
        raise BoothError(f"{path} {what}; is it a diffusers Stable Diffusion config?") from None
    return part


_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}  # diffusers' names for booth.config.PREDICTIONS


def _scheduler(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    config = _json(path) if path.is_file() else {}
    if not isinstance(config, dict):
        raise BoothError(f"{path} is not a JSON object; is it a diffusers scheduler config?")
    return config


def _prediction(folder: Path) -> str:
    """What a diffusers model's UNet predicts, from its scheduler's config (eps where there is none)."""
    path = folder / "scheduler" / "scheduler_config.json"
    kind = _scheduler(folder).get("prediction_type", "epsilon")
    if kind not in _PREDICTION_TYPES:
        raise BoothError(f"{path} says the model predicts {kind!r}; booth runs eps and v_prediction models")
    return _PREDICTION_TYPES[kind]


def _diffusers_unet(u: dict) -> UNetConfig:
    boc = _ints(u["block_out_channels"])
    heads = u.get("attention_head_dim", 8)  # diffusers' SD1 configs store the head *count* here
    depth = u.get("transformer_layers_per_block", 1)
    linear = bool(u.get("use_linear_projection", False))
    return UNetConfig(
        in_channels=u.get("in_channels", 4),
        out_channels=u.get("out_channels", 4),
        model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=u.get("layers_per_block", 2),
        attention_resolutions=tuple(
            2**i for i, b in enumerate(_strs(u["down_block_types"])) if "CrossAttn" in b
        ),
        num_heads=heads if isinstance(heads, int) else heads[0],
        transformer_depth=depth if isinstance(depth, int) else tuple(depth),  # validate() checks each
        context_dim=u.get("cross_attention_dim") or 768,
        norm_groups=u.get("norm_num_groups", 32),
        # SD 2.x configs list a head count per level, all of one width (64): that width is what booth keeps
        num_head_channels=boc[0] // heads[0] if linear and not isinstance(heads, int) else None,
        linear_proj=linear,
        # SDXL's add_embedding of the pooled text and time ids: CompVis' label_emb
        adm_in_channels=u.get("projection_class_embeddings_input_dim") or 0
        if u.get("addition_embed_type") == "text_time"
        else 0,
    )


def _diffusers_vae(v: dict) -> VAEConfig:
    boc = _ints(v["block_out_channels"])
    return VAEConfig(
        in_channels=v.get("in_channels", 3),
        out_ch=v.get("out_channels", 3),
        ch=boc[0],
        ch_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=v.get("layers_per_block", 2),
        z_channels=v.get("latent_channels", 4),
        embed_dim=v.get("latent_channels", 4),
        norm_groups=v.get("norm_num_groups", 32),
    )


def _diffusers_openclip(t: dict) -> CLIPConfig:
    return dataclasses.replace(_diffusers_clip(t), projection=t["projection_dim"])


def _diffusers_clip(t: dict) -> CLIPConfig:
    return CLIPConfig(
        vocab_size=t.get("vocab_size", 49408),
        width=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        intermediate=t["intermediate_size"],
        max_positions=t.get("max_position_embeddings", 77),
        act=t.get("hidden_act", "quick_gelu"),
    )


def _ints(values) -> list[int]:
    if not isinstance(values, list) or not values or not all(type(x) is int and x > 0 for x in values):
        raise ValueError(f"expected a list of positive integers, got {values!r}")
    return values


def _strs(values) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(x, str) for x in values):
        raise ValueError(f"expected a list of block names, got {values!r}")
    return values


# ----------------------------------------------------------------------------- a VAE of its own

_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # a bare VAE file's top-level names


def use_vae(ckpt: Checkpoint, path: str | os.PathLike, lazy: bool = False) -> None:
    """Put the VAE of `path` in place of `ckpt`'s own (--vae): a VAE file in the original layout (AUTOMATIC1111's
    `*.vae.safetensors`, `vae-ft-mse-840000-ema-pruned.ckpt`), with or without `first_stage_model.`, the VAE of a
    whole model file, or a diffusers VAE (a folder, or its `diffusion_pytorch_model.safetensors`). Its weights are
    checked against the model's before anything is read."""
    path = Path(path)
    if path.is_dir():
        raw = _read_component(path / "vae" if (path / "vae").is_dir() else path, lazy)
    else:
        raw = _read_file(path, lazy)[0]
    expected = {k: v for k, v in build(ckpt.config).state_dict().items() if k.startswith(VAE)}
    vae = _vae_layout(raw, ckpt.config)
    missing = [k for k in expected if k not in vae]
    wrong = [k for k in expected if k in vae and vae[k].shape != expected[k].shape]
    if missing or wrong:
        what = f"no {missing[0]}" if missing else f"{wrong[0]} of shape {tuple(vae[wrong[0]].shape)}"
        raise BoothError(
            f"{path} is not a VAE for {ckpt.name} ({what}); give a VAE of the model's family with --vae"
        )
    ckpt.state_dict.update({k: vae[k] for k in expected})
    ckpt.vae = path


def _vae_layout(raw: dict, cfg: ModelConfig) -> dict:
    """A VAE's weights in any of use_vae's layouts -> under first_stage_model. as LatentDiffusion names them."""
    if any(k.startswith(VAE) for k in raw):
        return to_layout({k: v for k, v in raw.items() if k.startswith(VAE)})
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in raw):  # diffusers' names
        for old, new in _OLD_VAE_ATTN.items():
            raw = {k.replace(f".attentions.0.{old}", f".attentions.0.{new}"): v for k, v in raw.items()}
        rules, out = _vae_rules(cfg.vae), {}
        for key, meta in build(cfg).state_dict().items():
            if (
                key.startswith(VAE)
                and (t := raw.get(diffusers_name(key, rules).split(":", 1)[1])) is not None
            ):
                out[key] = t.reshape(meta.shape) if t.shape != meta.shape and t.numel() == meta.numel() else t
        return out
    return to_layout({VAE + k: v for k, v in raw.items() if k.startswith(_VAE_PARTS)})


# ----------------------------------------------------------------------------- entry points


def read_checkpoint(path: str | os.PathLike, ema: bool = False, lazy: bool = False) -> Checkpoint:
    """Any supported local file or folder -> Checkpoint (weights in the file's dtype, CompVis layout). With `lazy`,
    the weights are Stubs: every name and shape is checked, and no weight is read until `read_stubs`."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise BoothError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        if ema:
            raise BoothError(
                "--ema applies to single-file checkpoints; diffusers folders hold one set of weights"
            )
        return read_diffusers(path, lazy)
    raw, meta = _read_file(path, lazy)
    if looks_like_lora(raw):
        raise not_a_model(path, "lora")
    sd = to_layout(raw, ema=ema, source=str(path))
    cfg = stored_config(meta, path) if CONFIG_KEY in meta else _inferred(raw, sd, str(path), path)
    return Checkpoint(path, cfg, sd, meta)


def _inferred(raw: dict, sd: dict, source: str, path: Path | None = None) -> ModelConfig:
    """A single file's config from its shapes, and from the keys that mark a v-prediction (zero-SNR) model; an
    SD 2.x file without such a key is tested as AUTOMATIC1111 tests it (v_test), its UNet read from `path`."""
    cfg = infer_config(sd, source)
    if V_PRED_KEY in raw or ZTSNR_KEY in raw:
        return dataclasses.replace(cfg, prediction="v", zero_snr=ZTSNR_KEY in raw)
    if cfg.text_encoder == "openclip" and path is not None and _v_test(path.resolve(), _stamp(path), cfg):
        return dataclasses.replace(cfg, prediction="v", sample_size=768)  # SD 2.x's 768-v
    return cfg


@functools.lru_cache(maxsize=8)
def _v_test(path: Path, stamp: tuple[int, int], cfg: ModelConfig) -> bool:
    """Whether an SD 2.x UNet predicts v: AUTOMATIC1111's test (modules/sd_models_config.py), which runs the UNet
    once in fp32 on a flat grey 8x8 latent at t=999 with a flat grey text; an eps UNet's mean output stays near
    the input, a v UNet's falls below it by more than 1. (SD 2.x 768-v files carry no mark of what they are.)"""
    stubs = {k: v for k, v in to_layout(_read_file(path, lazy=True)[0]).items() if k.startswith(UNET)}
    unet = build(cfg).unet
    unet.load_state_dict({k[len(UNET) :]: t for k, t in read_stubs(stubs, "cpu", torch.float32)}, assign=True)
    x = torch.full((1, cfg.unet.in_channels, 8, 8), 0.5)
    with torch.no_grad():
        out = unet.eval()(x, torch.tensor([999.0]), torch.full((1, 2, cfg.unet.context_dim), 0.5))
    return (out - x).mean().item() < -1


def read_config(path: str | os.PathLike) -> ModelConfig:
    """A model's ModelConfig from its file's header alone: no weights are read (a pickle is memory-mapped)."""
    path = Path(path)
    if path.is_dir():
        return diffusers_config(path)
    if path.suffix != ".safetensors":
        raw, _ = _read_file(path)
        return _inferred(raw, to_layout(raw, source=str(path)), str(path), path)
    try:
        header, _ = safetensors_header(path)
    except PermissionError:
        raise BoothError(f"cannot read {path}: permission denied") from None
    meta = header.get("__metadata__") or {}
    if CONFIG_KEY in meta:
        return stored_config(meta, path)
    shapes = {k: torch.empty(v["shape"], device="meta") for k, v in header.items() if k != "__metadata__"}
    return _inferred(shapes, to_layout(shapes, source=str(path)), str(path), path)


_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def stored_itemsize(path: str | os.PathLike) -> int:
    """Bytes per weight of a model file (its most common float dtype), from the header alone; 4 where that is
    not known without reading the weights (a pickle, a diffusers folder without safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "vae" / "diffusion_pytorch_model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        return 4
    header, _ = safetensors_header(path)
    sizes = [
        _ITEMSIZES[v["dtype"]] for k, v in header.items() if k != "__metadata__" and v["dtype"] in _ITEMSIZES
    ]
    return max(set(sizes), key=sizes.count) if sizes else 4


def _read_file(path: Path, lazy: bool = False) -> tuple[dict[str, torch.Tensor | Stub], dict[str, str]]:
    if not path.exists():
        raise BoothError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return _safetensors_stubs(path) if lazy else read_safetensors(path)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickle_stubs(path) if lazy else read_pickle(path), {}
    except PermissionError:
        raise BoothError(f"cannot read {path}: permission denied") from None
    raise BoothError(
        f"unknown checkpoint format {path.suffix!r} ({path}); use .safetensors, .ckpt or a diffusers folder"
    )


def stored_config(meta: dict[str, str], path: Path) -> ModelConfig:
    """The ModelConfig booth wrote into a file's header, checked before anything is built from it."""
    try:
        cfg = ModelConfig.from_json(meta[CONFIG_KEY])
    except (ValueError, TypeError, AttributeError, RecursionError) as e:  # bad JSON, or unknown fields
        raise BoothError(
            f"cannot read the model config stored in {path} ({first_line(e, None)}); "
            "it may come from a newer booth: upgrade booth"
        ) from None
    return checked(cfg, f"{path} (stored in its header)")


def load_model(
    ckpt: Checkpoint, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, into=None
):
    """Checkpoint -> LatentDiffusion in eval mode on `device`. The modules are built on the meta device and take
    the checkpoint's tensors (assign=True): no random init. `ckpt.state_dict` is consumed: each tensor is moved
    to the device and dtype and its file copy released at once (a Stub is read then), so a model is never held
    twice in memory. With `into` (a model of the same config), the weights are copied into its tensors instead."""
    model = into if into is not None else build(ckpt.config)
    check_weights(ckpt, model.state_dict())
    sd = ckpt.state_dict
    if into is not None:
        into.load_state_dict(dict(read_stubs(sd)), strict=True)
        return into
    for k, t in read_stubs(sd, device, dtype):
        sd[k] = t
        del t
    model.load_state_dict(sd, strict=True, assign=True)
    sd.clear()
    return model.eval().requires_grad_(False)


def check_weights(ckpt: Checkpoint, expected: Mapping[str, torch.Tensor]) -> None:
    """BoothError unless `ckpt` has exactly the weights `expected` (a model's state dict) names, in its shapes."""
    sd = ckpt.state_dict
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        what = [f"{len(x)} {label} (e.g. {x[0]})" for x, label in
                ((missing, "missing"), (unexpected, "unexpected"), (wrong, "wrongly shaped")) if x]  # fmt: skip
        raise BoothError(
            f"{ckpt.path} is not a Stable Diffusion 1.x checkpoint booth can load: {'; '.join(what)} weights"
        )


def load_part(model, stubs: Mapping[str, Stub | torch.Tensor], part: str, device, dtype) -> None:
    """Read one of booth.model.PARTS from `stubs` (a checked Checkpoint's weights) into `model`, where that part
    is on the meta device; the others are left as they are."""
    weights = dict(read_stubs({k: v for k, v in stubs.items() if part_of(k) == part}, device, dtype))
    model.load_state_dict(weights, strict=False, assign=True)
    for m in part_modules(model, part):
        m.eval().requires_grad_(False)


SAVE_DTYPES = {
    "fp16": torch.float16,
    "fp32": torch.float32,
}  # --save-precision (booth.options.SAVE_PRECISIONS)


def convert_to_file(path: Path, out: Path, save_precision: str = "fp16", ema: bool = False,
                    source: str | None = None) -> Path:  # fmt: skip
    """`booth convert`: the model at `path` (any format booth reads) as one single file in the CompVis layout,
    its config in the header; `source` (the spec it was named by) is recorded."""
    ckpt = read_checkpoint(path, ema=ema)
    meta = {
        "booth.source": source or str(path),
        "booth.source_hash": file_hash(path) if path.is_file() else "",
    }
    save_checkpoint(
        ckpt.state_dict, out, metadata=meta, config=ckpt.config, dtype=SAVE_DTYPES[save_precision]
    )
    return out


def save_checkpoint(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None,
                    config: ModelConfig | None = None,
                    dtype: torch.dtype | dict[str, torch.dtype] | None = None) -> None:  # fmt: skip
    """Write a single-file `.safetensors` checkpoint atomically; `config` goes into the header metadata, and
    floating-point tensors are stored in `dtype` (one for all, or by name). Each tensor is converted (and copied
    off its device) only as it is written, so a model is never held twice. Refuses (NonFiniteWeights, leaving
    nothing written) a tensor with an inf or NaN, as fp16 gives for weights beyond 65504."""
    meta = dict(metadata or {})
    if config is not None:
        meta[CONFIG_KEY] = config.to_json()
    wanted = dtype if isinstance(dtype, dict) else dict.fromkeys(sd, dtype)
    dtypes = {k: (wanted.get(k) if v.is_floating_point() else None) or v.dtype for k, v in sd.items()}
    with atomic_path(path) as tmp:
        write_safetensors(sd, tmp, meta, dtypes, finite=True)


class NonFiniteWeights(BoothError):
    def __init__(self, key: str, dtype: torch.dtype):
        self.key = key
        super().__init__(
            f"{key} holds inf or NaN values in {str(dtype).replace('torch.', '')}; nothing was written"
        )


# safetensors' Dtype enum, in its declaration order: its writer lays tensors out by this rank (highest first), then
# by name, which keeps every tensor aligned to its item size.
_DTYPE_RANK = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
               "I64", "U64")  # fmt: skip
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str],
                      dtypes: dict[str, torch.dtype] | None = None, finite: bool = False) -> None:  # fmt: skip
    """A safetensors file with the bytes safetensors' own writer gives, except that the metadata keys are sorted.
    Its writer keeps the metadata in a Rust HashMap, whose order changes from process to process, so identical
    runs would write different files, and a checkpoint's SHA-256 (AUTOMATIC1111's model hash) would change.
    Each tensor is stored in its dtype in `dtypes` (default: its own), converted as it is written; with
    `finite`, a tensor with an inf or NaN raises NonFiniteWeights (the caller removes the partial file)."""
    dtypes = dtypes or {k: t.dtype for k, t in tensors.items()}
    order = _data_order(dtypes)
    header, offset = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}, 0
    for k in order:
        size = tensors[k].numel() * dtypes[k].itemsize
        header[k] = {
            "dtype": _DTYPE_NAMES[dtypes[k]],
            "shape": list(tensors[k].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for k in order:
            t = tensors[k].detach().to("cpu", dtypes[k])
            if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteWeights(k, t.dtype)
            f.write(_bytes(t))
            del t  # before the next tensor's copy


def data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the data section `write_safetensors` writes for `tensors` (kohya's `sshs_model_hash`)."""
    h = hashlib.sha256()
    for k in _data_order({k: t.dtype for k, t in tensors.items()}):
        h.update(_bytes(tensors[k]))
    return h.hexdigest()


def _data_order(dtypes: dict[str, torch.dtype]) -> list[str]:
    return sorted(dtypes, key=lambda k: (-_DTYPE_RANK.index(_DTYPE_NAMES[dtypes[k]]), k))


def _bytes(t: torch.Tensor) -> memoryview:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def file_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's 'Model hash': the first 10 hex digits of the file's SHA-256, cached by size and mtime."""
    path = Path(path)
    real = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", real.name) and real.parent.name == "blobs":
        return real.name[:10]  # the Hugging Face cache names blobs by their SHA-256 already
    st = real.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "booth" / "hashes.json"
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError, RecursionError):
        cache = {}
    if not isinstance(cache, dict) or not all(isinstance(v, str) for v in cache.values()):
        cache = {}  # damaged or written by something else: start over
    if key not in cache:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        cache[key] = h.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_file) as tmp:
                tmp.write_text(json.dumps(cache))
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return cache[key][:10]
