"""Every checkpoint format users have, read into the same weights; bad files refused with clear errors."""

import os
import pickle
import struct

import pytest
import torch

from booth.checkpoint import (
    CONFIG_KEY,
    UNET,
    diffusers_config,
    infer_config,
    load_model,
    read_checkpoint,
    save_checkpoint,
    to_layout,
)
from booth.config import SD1, TINY, ModelConfig
from booth.errors import BoothError
from booth.model import build, random_weights

SCHEDULE = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance"]


@pytest.fixture(scope="module")
def model():
    return random_weights(TINY, seed=5)


@pytest.fixture(scope="module")
def sd(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict, dtype=None):
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        assert torch.equal(x, y), k


def compvis_extras(sd: dict) -> dict:
    """What real SD1 files carry besides the weights: schedule buffers, EMA copies, position_ids."""
    extra = {name: torch.rand(1000) for name in SCHEDULE}
    extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    extra.update(
        {
            "model_ema." + k[len("model.") :].replace(".", ""): v + 1
            for k, v in sd.items()
            if k.startswith(UNET)
        }
    )
    extra["model_ema.decay"], extra["model_ema.num_updates"] = (
        torch.tensor(0.9999),
        torch.tensor(10, dtype=torch.int),
    )
    return {**sd, **extra}


def test_safetensors_fp16_and_fp32_round_trip(sd, tmp_path):
    for dtype in (torch.float16, torch.float32):
        path = tmp_path / f"m-{dtype}.safetensors"
        save_checkpoint(sd, path, dtype=dtype)
        ckpt = read_checkpoint(path)
        assert all(v.dtype == dtype for v in ckpt.state_dict.values()), "weights stay in the file's dtype"
        same(ckpt.state_dict, sd, dtype)
        assert ckpt.config == TINY  # inferred from shapes


def test_extras_dropped_and_ema_selected(sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "full.safetensors"
    save_file(compvis_extras(sd), str(path))
    same(read_checkpoint(path).state_dict, sd)
    ema = read_checkpoint(path, ema=True).state_dict
    for k in sd:
        assert torch.equal(ema[k], sd[k] + 1 if k.startswith(UNET) else sd[k]), k


def test_ema_flag_on_a_file_without_ema_is_an_error(sd, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_checkpoint(sd, path)
    with pytest.raises(BoothError, match="drop --ema"):
        read_checkpoint(path, ema=True)


def test_ckpt_with_and_without_state_dict_wrapper(sd, tmp_path):
    for i, obj in enumerate([{"state_dict": compvis_extras(sd), "global_step": 470000, "epoch": 3}, sd]):
        path = tmp_path / f"m{i}.ckpt"
        torch.save(obj, path)
        same(read_checkpoint(path).state_dict, sd)


def test_legacy_pickle_ckpt(sd, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=False)
    same(read_checkpoint(path).state_dict, sd)


def test_old_layout_without_text_model_and_linear_vae_attention(sd, tmp_path):
    old = {}
    for k, v in sd.items():
        k2 = k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
        if "mid.attn_1" in k and k.endswith("weight") and v.ndim == 4:
            v = v[:, :, 0, 0]
        old[k2] = v
    same(to_layout(old), sd)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BOOTH_EVIL_MARKER']}",))


def test_pickle_with_code_is_refused_and_never_run(sd, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("BOOTH_EVIL_MARKER", str(marker))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(BoothError, match="refusing to load.*needs code to run .posix.system"):
        read_checkpoint(path)
    assert not marker.exists()
    # a bare pickle (not a torch zip) with the same payload
    raw = tmp_path / "evil2.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(BoothError):
        read_checkpoint(raw)
    assert not marker.exists()


def header_file(header: dict, data_bytes: int) -> bytes:
    import json

    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes


def test_corrupt_files(sd, tmp_path):
    good = tmp_path / "good.safetensors"
    save_checkpoint(sd, good)
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": (data[: len(data) // 2], "truncated"),
        "noise.safetensors": (os.urandom(4096), "not a valid safetensors"),
        "tiny.safetensors": (b"abc", "not a valid safetensors"),
        "badjson.safetensors": (struct.pack("<Q", 5) + b"{oops" + b"\0" * 100, "unreadable header"),
        "badsize.safetensors": (
            header_file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, 8),
            "bad entry",
        ),
        "baddtype.safetensors": (
            header_file({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, 1),
            "bad entry",
        ),
        "noise.ckpt": (os.urandom(4096), "not a readable checkpoint"),
        "model.onnx": (b"xx", "unknown checkpoint format"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BoothError, match=message):
            read_checkpoint(tmp_path / name)
    with pytest.raises(BoothError, match="not found"):
        read_checkpoint(tmp_path / "missing.safetensors")


def test_not_an_sd1_checkpoint(sd, tmp_path):
    path = tmp_path / "partial.safetensors"
    save_checkpoint({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, path)
    with pytest.raises(BoothError, match="not a Stable Diffusion 1.x checkpoint"):
        load_model(read_checkpoint(path))
    sdxl = tmp_path / "xl.safetensors"
    save_checkpoint({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, sdxl)
    with pytest.raises(BoothError, match="SDXL or SD2"):
        read_checkpoint(sdxl)


def test_config_inference_recovers_sd1_and_tiny():
    assert infer_config(build(SD1).state_dict()) == SD1
    assert infer_config(build(TINY).state_dict()) == TINY


def test_config_in_metadata_wins_over_inference(sd, tmp_path):
    odd = ModelConfig(
        unet=TINY.unet.__class__(**{**vars(TINY.unet), "num_heads": 4}), vae=TINY.vae, clip=TINY.clip
    )
    path = tmp_path / "odd.safetensors"
    save_checkpoint(sd, path, config=odd)
    assert read_checkpoint(path).config == odd
    assert ModelConfig.from_json(odd.to_json()) == odd


def test_unreadable_config_in_metadata_is_a_clear_error(sd, tmp_path):
    """A file from a newer booth (an unknown config field) or a damaged header: one line, not a traceback."""
    import json

    from safetensors.torch import save_file

    newer = json.loads(TINY.to_json()) | {"some_future_field": 1}
    for name, text in (("newer", json.dumps(newer)), ("damaged", "{not json")):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={CONFIG_KEY: text})
        with pytest.raises(BoothError, match=f"cannot read the model config stored in .*{name}"):
            read_checkpoint(path)


def test_load_model_shares_the_file_tensors(sd, tmp_path):
    """assign=True: the model's parameters are the tensors read from the file, not copies."""
    path = tmp_path / "m.safetensors"
    save_checkpoint(sd, path, dtype=torch.float16)
    ckpt = read_checkpoint(path)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    ptr = ckpt.state_dict[key].data_ptr()
    model = load_model(ckpt, "cpu", None)
    assert model.state_dict()[key].data_ptr() == ptr
    assert not ckpt.state_dict, "the checkpoint's references are released"
    assert model.unet.input_blocks[0][0].weight.dtype == torch.float16
    assert not any(p.requires_grad for p in model.parameters())


def test_diffusers_folder_fp16_variant(model, tmp_path):
    from helpers import diffusers_pipeline

    folder = tmp_path / "pipe"
    diffusers_pipeline(model, tmp_path / "tok").save_pretrained(
        folder, safe_serialization=True, variant="fp16"
    )
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    ckpt = read_checkpoint(folder)
    assert ckpt.config == TINY
    assert diffusers_config(folder) == TINY
    same(ckpt.state_dict, model.state_dict())
    with pytest.raises(BoothError, match="--ema applies to single-file"):
        read_checkpoint(folder, ema=True)


def test_diffusers_folder_missing_parts(model, tmp_path):
    from helpers import diffusers_pipeline

    folder = tmp_path / "pipe"
    diffusers_pipeline(model, tmp_path / "tok").save_pretrained(folder, safe_serialization=True)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BoothError, match="no weights found"):
        read_checkpoint(folder)
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(BoothError, match="config.json is missing"):
        read_checkpoint(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BoothError, match="not a diffusers model"):
        read_checkpoint(tmp_path / "empty")


def test_atomic_save_keeps_the_old_file_on_failure(sd, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "m.safetensors"
    save_checkpoint(sd, path)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(sd, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file left behind"
