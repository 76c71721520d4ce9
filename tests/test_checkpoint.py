"""Every checkpoint format users have, read into the same weights; bad files refused with clear errors."""

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from booth.atomic import DiskFull
from booth.checkpoint import (
    CONFIG_KEY,
    UNET,
    NonFiniteWeights,
    diffusers_config,
    infer_config,
    load_model,
    read_checkpoint,
    read_config,
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
    with pytest.raises(BoothError, match="not a Stable Diffusion 1.x, 2.x or XL checkpoint: it has no "):
        load_model(read_checkpoint(path))
    sdxl = tmp_path / "xl.safetensors"  # an SDXL file missing most of itself
    save_checkpoint({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, sdxl)
    with pytest.raises(BoothError, match="not a Stable Diffusion 1.x, 2.x or XL checkpoint: it has no "):
        read_checkpoint(sdxl)


def test_a_checkpoint_whose_shapes_make_no_model_is_a_clear_error(sd, tmp_path):
    """Shapes can say what no module can be built from: a 40-channel input convolution before 32-channel levels."""
    odd = {k: v for k, v in sd.items()}
    key = UNET + "input_blocks.0.0.weight"
    odd[key] = torch.zeros(40, *sd[key].shape[1:])
    save_checkpoint(odd, tmp_path / "odd.safetensors")
    with pytest.raises(
        BoothError, match="the model config of .*odd.safetensors is impossible: unet.channel_mult"
    ):
        read_checkpoint(tmp_path / "odd.safetensors")


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


@pytest.mark.parametrize(
    "part, change",
    [
        ("unet", {"block_out_channels": None}),
        ("unet", {"block_out_channels": [0, 64]}),
        ("unet", {"down_block_types": "CrossAttnDownBlock2D"}),
        ("vae", {"block_out_channels": []}),
        ("text_encoder", {"num_attention_heads": "twelve"}),
        ("text_encoder", {"hidden_size": None}),
    ],
)
def test_a_diffusers_config_json_with_wrong_values_is_a_clear_error(model, tmp_path, part, change):
    from helpers import diffusers_pipeline

    folder = tmp_path / "pipe"
    diffusers_pipeline(model, tmp_path / "tok").save_pretrained(folder, safe_serialization=True)
    path = folder / part / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(BoothError, match=f"{part}.config.json"):
        diffusers_config(folder)


def test_atomic_save_keeps_the_old_file_on_failure(sd, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_checkpoint(sd, path)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None, dtypes=None, finite=False):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("booth.checkpoint.write_safetensors", disk_full)
    with pytest.raises(DiskFull, match="the disk is full"):
        save_checkpoint(sd, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file left behind"


def test_diffusers_folder_of_pickles_reads_the_same_weights(model, tmp_path):
    """Older repos ship `unet/diffusion_pytorch_model.bin` and `text_encoder/pytorch_model.bin`: the Hub download
    fetches them (booth.formats.WEIGHTS_PREFERENCE), so the folder reader must read them too."""
    from helpers import diffusers_pipeline
    from safetensors.torch import load_file

    folder = tmp_path / "pipe"
    diffusers_pipeline(model, tmp_path / "tok").save_pretrained(folder, safe_serialization=True)
    for file in folder.rglob("*.safetensors"):  # as older diffusers and transformers saved them
        name = "pytorch_model.bin" if file.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(file), file.with_name(name))
        file.unlink()
    assert (folder / "text_encoder" / "pytorch_model.bin").is_file()
    same(read_checkpoint(folder).state_dict, model.state_dict())


def test_the_folder_reader_takes_the_file_the_hub_download_chose(model, tmp_path):
    """One preference order: for every mix of files a component folder can hold, the reader reads the one
    `hub.diffusers_files` fetches."""
    from booth import hub
    from booth.checkpoint import _read_component
    from booth.formats import WEIGHTS_PREFERENCE

    folder = tmp_path / "c"
    folder.mkdir()
    for k, name in enumerate(reversed(WEIGHTS_PREFERENCE)):  # each new file is preferred over the ones before
        tensor = {"w": torch.full((1,), float(k))}
        path = folder / name
        if name.endswith(".safetensors"):
            save_checkpoint(tensor, path)
        else:
            torch.save(tensor, path)
        listing = ["model_index.json", *(f"{c}/config.json" for c in hub.COMPONENTS)]
        listing += [f"{c}/{p.name}" for c in hub.COMPONENTS for p in folder.iterdir()]
        chosen = [
            n for n in hub.diffusers_files(listing)[0] if n.startswith("unet/") and not n.endswith(".json")
        ]
        assert chosen == [f"unet/{name}"]
        assert _read_component(folder)["w"].item() == k, name


def test_written_files_are_what_safetensors_writes_and_read_back(tmp_path):
    """booth writes safetensors itself (for a fixed metadata order); safetensors reads the file, and the data
    section is byte for byte the one safetensors' own writer lays out, whatever the dtypes."""
    from safetensors import safe_open
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {"b.f32": torch.randn(3, 5, generator=g), "a.f16": torch.randn(7, generator=g).half(),
               "c.bf16": torch.randn(2, 2, generator=g).bfloat16(), "d.i64": torch.arange(5),
               "e.bool": torch.tensor([True, False, True]), "f.scalar": torch.tensor(2.5),
               "g.empty": torch.zeros(0, 4), "h.strided": torch.randn(4, 6, generator=g)[:, ::2]}  # fmt: skip
    meta = {"zeta": "last", "alpha": "first", "booth.config": TINY.to_json()}
    path = tmp_path / "m.safetensors"
    save_checkpoint(tensors, path, metadata=meta)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {**meta, CONFIG_KEY: TINY.to_json()}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype, k
    blob, ours = save({k: v.contiguous() for k, v in tensors.items()}), path.read_bytes()
    skip = lambda b: b[8 + int.from_bytes(b[:8], "little") :]  # noqa: E731
    assert skip(ours) == skip(blob)
    header = json.loads(ours[8 : 8 + int.from_bytes(ours[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_identical_saves_in_two_processes_write_identical_bytes(tmp_path):
    """A checkpoint's SHA-256 is AUTOMATIC1111's model hash: it may not change between identical runs.
    (safetensors' writer orders the metadata by a hash map seeded per process.)"""
    script = """
import sys, torch
from booth.checkpoint import save_checkpoint
meta = {f"booth.key{i}": str(i) for i in range(12)}
save_checkpoint({"w": torch.arange(6.0).reshape(2, 3)}, sys.argv[1], metadata=meta)
"""
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True, timeout=120)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_a_checkpoint_is_converted_one_tensor_at_a_time(tmp_path):
    """Saving in fp16 copies one tensor at a time (a full fine-tune's UNet is 1.7 GB more otherwise), and the
    file is what converting everything first gives."""
    from safetensors.torch import load_file

    from booth import memory

    sd = {f"w{i}": torch.randn(256, 64) for i in range(8)}
    with memory.LiveBytes(sd.values()) as live:
        save_checkpoint(sd, tmp_path / "m.safetensors", dtype=torch.float16)
    # one tensor's fp16 copy (2 bytes a value) and isfinite's |x| (2), its two masks and their product (1 each);
    # never all eight
    assert live.peak == 256 * 64 * 7
    saved = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(saved[k], v.half()) for k, v in sd.items())
    save_checkpoint({k: v.half() for k, v in sd.items()}, tmp_path / "first.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == (tmp_path / "first.safetensors").read_bytes()


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(NonFiniteWeights, match="w holds inf or NaN values in float32"):
        save_checkpoint({"w": torch.tensor([1.0, float("inf")])}, path)
    with pytest.raises(NonFiniteWeights, match="float16"):  # finite in fp32, beyond fp16's 65504
        save_checkpoint({"w": torch.tensor([1.0, 1e5])}, path, dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


def stored_config(sd, path, **changes):
    """A booth file whose header config has `changes` (nested as 'unet.num_heads')."""
    from safetensors.torch import save_file

    config = json.loads(TINY.to_json())
    for key, value in changes.items():
        part, name = key.split(".")
        config[part][name] = value
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(path), metadata={CONFIG_KEY: json.dumps(config)}
    )
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"unet.num_heads": 0}, "num_heads must be a positive whole number"),
        ({"unet.num_heads": 3}, "3 heads do not divide the 64 channels"),
        ({"clip.heads": 5}, "5 text encoder heads do not divide its width 128"),
        ({"unet.channel_mult": []}, "channel_mult"),
        ({"vae.ch": True}, "ch must be a positive whole number"),
        ({"clip.layers": 10**12}, "layers is 1000000000000, more than any model has"),
        ({"unet.num_res_blocks": 10**6}, "num_res_blocks is 1000000, more than any model has"),
        ({"unet.norm_groups": 7}, "not a multiple of 7 groups"),
    ],
)
def test_an_impossible_stored_config_is_a_clear_error(sd, tmp_path, changes, message):
    path = stored_config(sd, tmp_path / "odd.safetensors", **changes)
    where = r"the model config of .*odd.safetensors \(stored in its header\) is impossible: "
    with pytest.raises(BoothError, match=where + f".*{message}"):
        read_checkpoint(path)
    with pytest.raises(BoothError, match="impossible"):
        read_config(path)


def test_hostile_safetensors_headers(tmp_path):
    cases = {
        "bool-shape.safetensors": (header_file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, 4),
                                   "bad entry for 'a'"),
        "nested.safetensors": (_nested_header(100_000), "nested too deeply"),
        "meta.safetensors": (header_file({"__metadata__": {"k": 1}}, 0), "__metadata__ is not a mapping of strings"),
    }  # fmt: skip
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BoothError, match=message):
            read_checkpoint(tmp_path / name)


def _nested_header(depth: int) -> bytes:
    raw = ("[" * depth + "]" * depth).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_a_hash_cache_of_the_wrong_json_type_is_started_over(tmp_path, monkeypatch):
    from booth.checkpoint import file_hash

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "booth" / "hashes.json"
    cache.parent.mkdir(parents=True)
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    expected = hashlib.sha256(b"weights").hexdigest()[:10]
    for text in ("[1, 2, 3]", '"a string"', '{"key": 5}', "[" * 100_000):
        cache.write_text(text)
        assert file_hash(model) == expected, text
        assert isinstance(json.loads(cache.read_text()), dict)


def test_a_pickled_lora_is_told_from_a_model_without_running_or_loading_it(sd, tmp_path):
    from booth.formats import identify

    torch.save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
               tmp_path / "lora.pt")  # fmt: skip
    torch.save({"state_dict": sd}, tmp_path / "model.ckpt")
    with open(tmp_path / "legacy.bin", "wb") as f:  # the pre-zip format torch.load still reads
        torch.save({"x.lora_up.weight": torch.zeros(8, 4)}, f, _use_new_zipfile_serialization=False)
    assert [identify(tmp_path / n).kind for n in ("lora.pt", "model.ckpt", "legacy.bin")] == [
        "lora",
        "checkpoint",
        "lora",
    ]


def test_a_run_folder_stands_for_its_checkpoints(sd, tmp_path):
    """`-c outputs/run0` is what a user types after training: it means the run's ckpts/ folder."""
    from booth.formats import identify

    run = tmp_path / "run0"
    (run / "ckpts").mkdir(parents=True)
    (run / "args.yaml").write_text("class_name: dog\n")
    save_checkpoint(sd, run / "ckpts" / "step-000010.safetensors")
    found = identify(run)
    assert found.kind == "folder" and [m.path for m in found.members] == [
        run / "ckpts" / "step-000010.safetensors"
    ]
    (tmp_path / "plain").mkdir()
    with pytest.raises(BoothError, match="holds no checkpoints"):
        identify(tmp_path / "plain")
