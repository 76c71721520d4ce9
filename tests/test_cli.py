"""The `booth` command end to end on tiny random weights: run folders, PNG metadata, seeds, checkpoint
folders, img2img inputs, and every bad input ending in one `booth: error:` line (never a traceback)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import booth
from booth.checkpoint import save_checkpoint
from booth.cli import main
from booth.config import TINY
from booth.images import infotext, load_image, parse_infotext
from booth.model import random_weights

# TINY with a small native size, so that the defaults (no --hw) stay cheap; stored in each file's header
SMALL = dataclasses.replace(TINY, sample_size=32)
PROMPT = "a fox, in the snow: photo"  # commas and a colon: the prompt line is written as is
NEGATIVE = "blurry, lowres: bad"
SEED = 1234
FAST = ["--steps", "2", "-d", "cpu"]


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def paths(self) -> list[Path]:
        return [Path(line) for line in self.out.splitlines()]


def booth_cli(*argv) -> Result:
    """Run `booth ARGV` in this process, capturing stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help, --version, usage errors
            rc = e.code
    return Result(rc, out.getvalue(), err.getvalue())


def subprocess_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BOOTH_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HOME=str(tmp / "home"),
               XDG_CACHE_HOME=str(tmp / "cache"), HF_HOME=str(tmp / "hf"))  # fmt: skip
    return env


def booth_process(tmp: Path, *argv) -> Result:
    """Run `python -m booth ARGV` in a fresh process with an empty home and Hugging Face cache."""
    p = subprocess.run([sys.executable, "-m", "booth", *map(str, argv)], capture_output=True, text=True,
                       env=subprocess_env(tmp), cwd=tmp, timeout=120)  # fmt: skip
    return Result(p.returncode, p.stdout, p.stderr)


def sha10(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def parameters(path: Path) -> str:
    with Image.open(path) as im:
        return im.info["parameters"]


def pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def runs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("run*") if p.is_dir()) if out.exists() else []


def assert_failed(r: Result, *needles: str, out: Path | None = None) -> str:
    """An error after work had started (progress bars on stderr before it): exit 1, nothing on stdout, and the
    last stderr line the one `booth: error: ...`, containing every needle."""
    assert needles and r.rc == 1 and r.out == "" and "Traceback" not in r.err, r
    errors = [line for line in r.err.splitlines() if "booth: error:" in line]
    assert len(errors) == 1 and r.err.rstrip().endswith(errors[0].split("booth: error: ")[1]), r.err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), f"{needle!r} not in {errors[0]!r}"
    if out is not None:
        assert runs(out) == [], f"a failed run left {runs(out)}"
    return errors[0]


def assert_error(r: Result, *needles: str, out: Path | None = None) -> str:
    """Exit 1, nothing on stdout, exactly one stderr line `booth: error: ...` containing every needle."""
    assert needles, "say what the error must name: any error would pass otherwise"
    lines = [line for line in r.err.splitlines() if line.strip()]
    assert r.rc == 1, r
    assert r.out == ""
    assert "Traceback" not in r.err
    assert len(lines) == 1 and lines[0].startswith("booth: error: "), r.err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    if out is not None:
        assert runs(out) == [], f"a failed run left {runs(out)}"
    return lines[0]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))  # booth's hash cache
        mp.delenv("BOOTH_DEBUG", raising=False)
        yield root


@dataclass
class Models:
    single: Path  # tiny.safetensors
    folder: Path  # step-000100 and step-000020, different weights
    early: Path  # folder/step-000020.safetensors
    late: Path  # folder/step-000100.safetensors


@pytest.fixture(scope="module")
def models(env) -> Models:
    single = env / "tiny.safetensors"
    save_checkpoint(random_weights(TINY, seed=0).state_dict(), single, dtype=torch.float16, config=SMALL)
    folder = env / "checkpoints"
    folder.mkdir()
    late, early = folder / "step-000100.safetensors", folder / "step-000020.safetensors"
    save_checkpoint(random_weights(TINY, seed=1).state_dict(), late, dtype=torch.float16, config=SMALL)
    save_checkpoint(random_weights(TINY, seed=2).state_dict(), early, dtype=torch.float16, config=SMALL)
    (folder / "notes.txt").write_text("not a checkpoint")
    return Models(single, folder, early, late)


BASE = ["-p", PROMPT, "-n", NEGATIVE, "--hw", "16", "24", "--seed", SEED, "-v", "2", *FAST]


@pytest.fixture(scope="module")
def base(env, models):
    """Two identical txt2img calls (run0, run1) and one with -b 2 (run2), 16x24, seeds SEED, SEED+1."""
    out = env / "base"
    calls = [
        booth_cli("txt2img", "-c", models.single, "-o", out, *BASE, *extra) for extra in ([], [], ["-b", "2"])
    ]
    return out, calls


# ----------------------------------------------------------------------------- outputs


def test_run_folders_and_stdout(base):
    out, calls = base
    for k, r in enumerate(calls):
        assert r.rc == 0, r.err
        assert r.out.splitlines() == [str(out / f"run{k}" / "samples" / f"000{i}.png") for i in range(2)]
        assert "Traceback" not in r.err
    assert [p.name for p in runs(out)] == ["run0", "run1", "run2"]
    assert sorted(p.name for p in (out / "run0").iterdir()) == ["args.yaml", "prompt.txt", "samples"]


def test_args_yaml_and_prompt_txt(base, models):
    out, _ = base
    args = yaml.safe_load((out / "run0" / "args.yaml").read_text())
    assert args["seed"] == SEED
    assert args["device"] == "cpu" and args["dtype"] == "float32"
    assert args["models"] == [str(models.single)]
    assert args["prompt"] == PROMPT and args["negative_prompt"] == NEGATIVE
    assert args["hw"] == [16, 24] and args["steps"] == 2 and args["variations"] == 2
    assert args["booth_version"] == booth.__version__
    assert (out / "run0" / "prompt.txt").read_text() == PROMPT + "\n"


def test_png_size_is_width_by_height(base):
    out, calls = base
    for path in calls[0].paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (24, 16)  # --hw H W


def test_metadata_raw_text(base, models):
    out, calls = base
    expected_hash = sha10(models.single)
    for i, path in enumerate(calls[0].paths):
        lines = parameters(path).split("\n")
        assert lines[:2] == [PROMPT, f"Negative prompt: {NEGATIVE}"]
        assert len(lines) == 3
        m = re.fullmatch(
            r"Steps: 2, Sampler: DPM\+\+ 2M, Schedule type: Karras, CFG scale: 7\.5, Seed: (\d+), "
            r"Size: 24x16, Model hash: ([0-9a-f]{10}), Model: tiny(, .*)?",
            lines[2],
        )
        assert m, lines[2]
        assert int(m.group(1)) == SEED + i
        assert m.group(2) == expected_hash
        assert "Denoising strength" not in lines[2]


def test_metadata_parses(base, models):
    out, calls = base
    for i, path in enumerate(calls[0].paths):
        prompt, negative, params = parse_infotext(parameters(path))
        assert (prompt, negative) == (PROMPT, NEGATIVE)
        assert params["Seed"] == str(SEED + i)
        assert params["Model hash"] == sha10(models.single)
        assert params["Model"] == "tiny" and params["Size"] == "24x16" and params["Steps"] == "2"
        assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"


def test_metadata_quotes_values_with_commas_and_colons(env, models):
    odd = env / "my,model: v1.safetensors"
    odd.write_bytes(models.single.read_bytes())
    out = env / "odd"
    r = booth_cli("txt2img", "-c", odd, "-o", out, "-p", "x", "--hw", "16", "16", "--seed", 1, *FAST)
    assert r.rc == 0, r.err
    text = parameters(r.paths[0])
    assert 'Model: "my,model: v1"' in text
    assert f"Model hash: {sha10(odd)}" in text
    assert parse_infotext(text)[2]["Model"] == "my,model: v1"


def test_infotext_quoting_round_trip():
    params = {"Steps": 2, "Model": 'a,b: "c"', "Note": "two\nlines", "Plain": "x y", "Empty": None}
    text = infotext("line one\nline two, with: colon", "neg, one\nneg two", params)
    assert text.split("\n")[-1] == 'Steps: 2, Model: "a,b: \\"c\\"", Note: "two\\nlines", Plain: x y'
    prompt, negative, parsed = parse_infotext(text)
    assert prompt == "line one\nline two, with: colon"
    assert negative == "neg, one\nneg two"
    assert parsed == {"Steps": "2", "Model": 'a,b: "c"', "Note": "two\nlines", "Plain": "x y"}


def test_no_negative_prompt_line_when_empty(base):
    assert parse_infotext(infotext("p", "", {"Seed": 1})) == ("p", "", {"Seed": "1"})
    assert "Negative prompt" not in infotext("p", "", {"Seed": 1})


# ----------------------------------------------------------------------------- seeds


def test_same_seed_gives_same_pixels(base):
    _, calls = base
    assert np.array_equal(pixels(calls[0].paths), pixels(calls[1].paths))
    assert not np.array_equal(*pixels(calls[0].paths))  # seeds S and S+1 differ


def test_batch_size_does_not_change_images(base):
    """Same seeds, same noise: -b 2 gives -b 1's images, up to float rounding of batched kernels (1/255)."""
    _, calls = base
    diff = np.abs(pixels(calls[0].paths).astype(int) - pixels(calls[2].paths))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert [parse_infotext(parameters(p))[2]["Seed"] for p in calls[2].paths] == [str(SEED), str(SEED + 1)]


def test_random_seed_is_recorded_and_model_alias(env, models):
    out = env / "random"
    r = booth_cli("txt2img", "-m", models.single, "-o", out, "-p", "x", "--hw", "16", "16", "-v", 2, *FAST)
    assert r.rc == 0, r.err
    args = yaml.safe_load((out / "run0" / "args.yaml").read_text())
    seed = args["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert args["models"] == [str(models.single)]
    assert [parse_infotext(parameters(p))[2]["Seed"] for p in r.paths] == [str(seed), str(seed + 1)]


def test_c_and_m_with_different_values(env, models):
    out = env / "both"
    r = booth_cli(
        "txt2img", "-c", models.single, "-m", models.early, "-o", out, "-p", "x", "--hw", 16, 16, *FAST
    )
    assert_error(r, "-c/--ckpt-path", "-m/--model", out=out)


def test_bf16_on_cpu(env, models):
    out = env / "bf16"
    r = booth_cli("txt2img", "-c", models.single, "-o", out, "-p", "x", "--hw", 16, 16, "--seed", 1,
                  "--precision", "bf16", *FAST)  # fmt: skip
    assert r.rc == 0, r.err
    assert yaml.safe_load((out / "run0" / "args.yaml").read_text())["dtype"] == "bfloat16"
    assert Image.open(r.paths[0]).size == (16, 16)


# ----------------------------------------------------------------------------- a folder of checkpoints


@pytest.fixture(scope="module")
def compare(env, models):
    """-c FOLDER with two checkpoints, and each checkpoint alone, same seeds."""
    common = ["-p", "x", "--hw", "16", "16", "--seed", 7, "-v", 3, *FAST]
    multi = booth_cli("txt2img", "-c", models.folder, "-o", env / "multi", *common)
    alone = {p.stem: booth_cli("txt2img", "-c", p, "-o", env / f"alone-{p.stem}", *common)
             for p in (models.early, models.late)}  # fmt: skip
    return multi, alone


def test_folder_of_checkpoints_outputs(compare, env, models):
    multi, _ = compare
    assert multi.rc == 0, multi.err
    run = env / "multi" / "run0"
    # Natural order: step-000020 before step-000100; then the grid.
    expected = [
        run / "samples" / stem / f"000{i}.png" for stem in ("step-000020", "step-000100") for i in range(3)
    ]
    assert multi.paths == [*expected, run / "grid.png"]
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["models"] == [str(models.early), str(models.late)]
    for path in expected:
        params = parse_infotext(parameters(path))[2]
        model = models.early if path.parent.name == "step-000020" else models.late
        assert params["Model"] == model.stem and params["Model hash"] == sha10(model)
        assert params["Seed"] == str(7 + int(path.stem))


def test_folder_of_checkpoints_grid(compare, env):
    multi, _ = compare
    with Image.open(env / "multi" / "run0" / "grid.png") as grid:
        width, height = grid.size
    assert width == 3 * 16  # columns: variations
    assert 2 * 16 <= height < 3 * 16 + 100  # rows: checkpoints, each with a label strip


def test_folder_of_checkpoints_matches_single_runs(compare):
    multi, alone = compare
    by_model = {stem: [p for p in multi.paths if p.parent.name == stem] for stem in alone}
    for stem, r in alone.items():
        assert r.rc == 0, r.err
        assert np.array_equal(pixels(by_model[stem]), pixels(r.paths)), stem
    assert not np.array_equal(pixels(by_model["step-000020"]), pixels(by_model["step-000100"]))


def test_folder_checkpoints_with_the_same_stem_do_not_overwrite(env, models, tmp_path):
    folder = tmp_path / "same-stem"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(models.early.read_bytes())
    torch.save(random_weights(TINY, seed=1).state_dict(), folder / "model.ckpt")
    r = booth_cli(
        "txt2img", "-c", folder, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, "--seed", 1, *FAST
    )
    assert r.rc == 0, r.err
    images = r.paths[:-1]
    assert len(images) == 2 and len(set(images)) == 2, images
    assert all(p.is_file() for p in images)
    assert not np.array_equal(*pixels(images))


# ----------------------------------------------------------------------------- img2img


def write_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """name -> (input file, expected output size (w, h) when --hw is not given: SMALL's 32x32 = 1024 pixels in the
    input's aspect ratio, each side rounded to a multiple of 8)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))  # 24 wide, 16 high
    cases = {}

    def add(name, image, size=(40, 24), **kw):  # 3:2 -> 39.2 x 26.1 -> 40x24
        image.save(folder / name, **kw)
        cases[name] = (folder / name, size)

    add("odd.png", Image.fromarray(rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)))  # 30:21 -> 38.2 x 26.8
    add("photo.jpg", rgb)
    add("rgba.png", rgb.convert("RGBA"))
    add("gray.jpg", rgb.convert("L"))
    add("cmyk.jpg", rgb.convert("CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 24x16, shown rotated by 90 degrees: 16x24
    add("rotated.jpg", rgb, size=(24, 40), exif=exif)
    return cases


IMAGES = ["odd.png", "photo.jpg", "rgba.png", "gray.jpg", "cmyk.jpg", "rotated.jpg"]


@pytest.fixture(scope="module")
def images(env):
    folder = env / "images"
    folder.mkdir()
    return write_images(folder)


@pytest.mark.parametrize("name", IMAGES)
def test_img2img_inputs(name, images, env, models):
    path, size = images[name]
    out = env / f"img2img-{name}"
    r = booth_cli(
        "img2img", "-i", path, "-c", models.single, "-o", out, "-p", "x", "--seed", 3, "-s", 0.5, *FAST
    )
    assert r.rc == 0, r.err
    assert len(r.paths) == 1
    with Image.open(r.paths[0]) as im:
        assert im.size == size
    params = parse_infotext(parameters(r.paths[0]))[2]
    assert params["Denoising strength"] == "0.5"
    assert params["Size"] == f"{size[0]}x{size[1]}"
    assert yaml.safe_load((out / "run0" / "args.yaml").read_text())["hw"] == [size[1], size[0]]


def test_img2img_hw_overrides_the_input_size(images, env, models):
    r = booth_cli("img2img", "-i", images["photo.jpg"][0], "-c", models.single, "-o", env / "img2img-hw",
                  "-p", "x", "--hw", 8, 16, "--seed", 3, *FAST)  # fmt: skip
    assert r.rc == 0, r.err
    assert Image.open(r.paths[0]).size == (16, 8)


def test_load_image_flattens_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    im = load_image(tmp_path / "clear.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_load_image_keeps_16_bit_grayscale_tones(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth16.png")
    arr = np.asarray(load_image(tmp_path / "depth16.png")).astype(int)
    assert arr.shape == (32, 32, 3)
    assert arr.min() == 0 and arr.max() == 255
    assert np.abs(arr[..., 0] - ramp / 257).max() <= 1  # not clipped to white


def test_img2img_works_at_the_models_own_size_whatever_the_input(env, models):
    """Without --hw a 2:1 input of any size becomes SMALL's 32x32 pixels at 2:1: 45.3 x 22.6 -> 48x24."""
    Image.new("RGB", (2000, 1000), "gray").save(env / "big.png")
    r = booth_cli("img2img", "-i", env / "big.png", "-c", models.single, "-o", env / "big", "-p", "x", *FAST)
    assert r.rc == 0, r.err
    assert Image.open(r.paths[0]).size == (48, 24)
    assert parse_infotext(parameters(r.paths[0]))[2]["Size"] == "48x24"


# ----------------------------------------------------------------------------- bad inputs


class Evil:
    """A pickle that runs `exec` on load: it must never be run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class EvilSystem(Evil):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_zip(path, marker):
    torch.save({"state_dict": {"w": EvilSystem(marker)}}, path)


def evil_exec(path, marker):
    torch.save({"w": Evil(marker)}, path)


def evil_legacy(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": EvilSystem(marker)}}, f, protocol=2)


def evil_protocol4(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": EvilSystem(marker)}}, f, protocol=4)


@pytest.mark.parametrize("make", [evil_zip, evil_exec, evil_legacy])
def test_malicious_ckpt_is_refused(make, tmp_path):
    marker, ckpt = tmp_path / "MARKER", tmp_path / "evil.ckpt"
    make(ckpt, marker)
    assert not marker.exists()
    r = booth_cli("txt2img", "-c", ckpt, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert not marker.exists(), "the pickle's code ran"
    assert_error(r, "refusing", "evil.ckpt", "code", "safetensors", out=tmp_path / "out")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_protocol4_pickle_does_not_run(tmp_path):
    marker, ckpt = tmp_path / "MARKER", tmp_path / "evil.ckpt"
    evil_protocol4(ckpt, marker)
    r = booth_cli("txt2img", "-c", ckpt, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert not marker.exists(), "the pickle's code ran"
    assert_error(r, "evil.ckpt", "refusing", "code", out=tmp_path / "out")


def bad_checkpoint(kind: str, tmp: Path, good: Path) -> Path:
    if kind == "missing":
        return tmp / "missing.safetensors"
    if kind == "truncated":
        data = good.read_bytes()
        (tmp / "half.safetensors").write_bytes(data[: len(data) // 2])
        return tmp / "half.safetensors"
    if kind == "random":
        (tmp / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
        return tmp / "noise.safetensors"
    if kind == "empty":
        (tmp / "empty.safetensors").write_bytes(b"")
        return tmp / "empty.safetensors"
    if kind == "text":
        (tmp / "model.txt").write_text("hello")
        return tmp / "model.txt"
    if kind == "no-checkpoints":
        (tmp / "nothing").mkdir()
        (tmp / "nothing" / "readme.md").write_text("hi")
        return tmp / "nothing"
    if kind == "not-sd":
        save_checkpoint({"weight": torch.zeros(2, 2)}, tmp / "other.safetensors")
        return tmp / "other.safetensors"
    raise AssertionError(kind)


BAD_CHECKPOINTS = {
    "missing": ["not found", "missing.safetensors"],
    "truncated": ["half.safetensors", "truncated"],
    "random": ["noise.safetensors", "not a valid safetensors"],
    "empty": ["empty.safetensors", "not a valid safetensors"],
    "text": ["model.txt", "unknown checkpoint format", ".safetensors"],
    "no-checkpoints": ["nothing", "no checkpoints"],
    "not-sd": ["other.safetensors", "Stable Diffusion 1.x", "has no"],
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoint(kind, tmp_path, models):
    ckpt = bad_checkpoint(kind, tmp_path, models.single)
    r = booth_cli("txt2img", "-c", ckpt, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert_error(r, *BAD_CHECKPOINTS[kind], out=tmp_path / "out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_checkpoint(tmp_path, models):
    ckpt = tmp_path / "locked.safetensors"
    ckpt.write_bytes(models.single.read_bytes())
    ckpt.chmod(0)
    try:
        r = booth_cli("txt2img", "-c", ckpt, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    finally:
        ckpt.chmod(0o644)
    assert_error(r, "locked.safetensors", "permission", out=tmp_path / "out")


def test_permission_denied_is_reported(tmp_path, models, monkeypatch):
    """What a chmod 000 file gives a non-root user, simulated so that it runs as root too."""

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("booth.checkpoint.safetensors_header", denied)
    r = booth_cli("txt2img", "-c", models.single, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert_error(r, "tiny.safetensors", "permission denied", out=tmp_path / "out")


def test_bad_checkpoint_in_a_folder_is_found_before_any_image(tmp_path, models):
    """Every checkpoint's header is read (and its memory forecast) before the first one renders."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "step-000020.safetensors").write_bytes(models.early.read_bytes())
    (folder / "step-000100.safetensors").write_bytes(models.late.read_bytes()[:1000])
    out = tmp_path / "out"
    r = booth_cli("txt2img", "-c", folder, "-o", out, "-p", "x", "--hw", 16, 16, "--seed", 1, *FAST)
    assert_error(r, "step-000100", out=out)


def test_bad_checkpoint_in_a_real_process(tmp_path, models):
    ckpt = bad_checkpoint("truncated", tmp_path, models.single)
    r = booth_process(
        tmp_path, "txt2img", "-c", ckpt, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST
    )
    assert_error(r, "truncated", out=tmp_path / "out")


# (arguments, words the message must contain); {ckpt} and {image} are filled in.
BAD_ARGS = {
    "hw-not-multiple-of-8": (["--hw", "30", "32"], ["multiples of 8", "30x32"]),
    "hw-zero": (["--hw", "0", "16"], ["multiples of 8"]),
    "steps-0": (["--steps", "0"], ["--steps", "between 1 and 1000", "0"]),
    "steps-huge": (["--steps", str(10**30)], ["--steps", "between 1 and 1000"]),
    # the uniform schedule's spacing 1000 // steps would be 0: samplers then divide by zero
    "uniform-steps-over-999": (["--schedule", "uniform", "--steps", "1000"], ["uniform", "at most 999"]),
    "ddim-steps-over-999": (["--sampler", "ddim", "--steps", "1000"], ["uniform", "at most 999"]),
    "uniform-steps-1500": (["--schedule", "uniform", "--steps", "1500"], ["--steps", "between 1 and 1000"]),
    "sampler": (["--sampler", "eular"], ["'eular'", "dpmpp_2m", "euler_a", "ddim"]),
    "schedule": (["--schedule", "cosine"], ["'cosine'", "karras", "uniform", "exponential"]),
    "variations-0": (["-v", "0"], ["--variations", "0"]),
    "batch-0": (["-b", "0"], ["--batch-size", "0"]),
    "scale": (["--scale", "-1"], ["--scale", "-1"]),
    "eta": (["--eta", "-1"], ["eta", "-1"]),
    "clip-skip": (["--clip-skip", "0"], ["clip skip", "0"]),
    "seed-too-big": (["--seed", str(2**64)], ["--seed", str(2**64)]),
    "seed-negative": (["--seed", "-5"], ["--seed", "-5"]),
    "device-tpu": (["-d", "tpu"], ["'tpu'", "cpu"]),
    "model-unknown": (["-c", "no-such-model"], ["no-such-model", "sd15"]),
}
NO_CUDA = {
    "device-1": (["-d", "1"], ["cuda:1", "-d cpu"]),
    "device-cuda0": (["-d", "cuda:0"], ["cuda:0", "-d cpu"]),
}


def _run_bad(args, tmp_path, models, command="txt2img", extra=()):
    base = [
        "-c",
        str(models.single),
        "-o",
        str(tmp_path / "out"),
        "-p",
        "x",
        "--hw",
        "16",
        "16",
        "--steps",
        "2",
    ]
    return booth_cli(command, *extra, *base, *args)


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_arguments(case, tmp_path, models):
    args, needles = BAD_ARGS[case]
    assert_error(_run_bad(args, tmp_path, models), *needles, out=tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("case", NO_CUDA)
def test_cuda_device_without_cuda(case, tmp_path, models):
    args, needles = NO_CUDA[case]
    assert_error(_run_bad(args, tmp_path, models), *needles, out=tmp_path / "out")


@pytest.mark.parametrize("strength", ["-0.1", "1.5"])
def test_bad_strength(strength, tmp_path, models, images):
    r = _run_bad(["-s", strength], tmp_path, models, "img2img", ["-i", images["photo.jpg"][0]])
    assert_error(r, "--strength", strength, "between 0 and 1", out=tmp_path / "out")


def test_image_that_is_not_an_image(tmp_path, models):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text")
    r = _run_bad([], tmp_path, models, "img2img", ["-i", fake])
    assert_error(r, "fake.png", "not a readable image", out=tmp_path / "out")


def test_image_too_large_to_decode(tmp_path, models):
    """A PNG whose header claims 30000x30000 pixels: Pillow's decompression-bomb guard, as one error line."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (tmp_path / "huge.png").write_bytes(bytes(data))
    r = _run_bad([], tmp_path, models, "img2img", ["-i", tmp_path / "huge.png"])
    assert_error(r, "huge.png", "too large", out=tmp_path / "out")


def test_missing_image(tmp_path, models):
    r = _run_bad([], tmp_path, models, "img2img", ["-i", tmp_path / "nope.png"])
    assert_error(r, "image not found", "nope.png", out=tmp_path / "out")


def test_image_that_is_a_folder(tmp_path, models):
    r = _run_bad([], tmp_path, models, "img2img", ["-i", tmp_path])
    assert_error(r, "folder", out=tmp_path / "out")


def test_unwritable_output_dir(tmp_path, models):
    blocker = tmp_path / "somefile"
    blocker.write_text("a file, not a folder")
    r = booth_cli("txt2img", "-c", models.single, "-o", blocker / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert_error(r, "cannot write", "somefile")
    assert blocker.read_text() == "a file, not a folder"


def test_offline_repo_not_in_cache(tmp_path):
    r = booth_cli("txt2img", "-c", "someone/not-downloaded", "-o", tmp_path / "out", "-p", "x", *FAST)
    assert_error(r, "someone/not-downloaded", "booth download someone/not-downloaded", out=tmp_path / "out")


def test_download_offline_with_an_empty_cache(tmp_path):
    r = booth_process(tmp_path, "download")
    assert_error(r, "booth download sd15", "HF_HUB_OFFLINE")
    assert not any((tmp_path / "hf").rglob("*.safetensors"))


@pytest.mark.parametrize(
    "case",
    [
        "hw",
        "sampler",
        "schedule",
        "steps",
        "variations",
        "strength",
        "device",
        "output",
        "seed",
        "both-models",
    ],
)
def test_validation_happens_before_loading_weights(case, tmp_path, models, images, monkeypatch):
    def no_loading(*args, **kwargs):
        pytest.fail("weights were read before the arguments were validated")

    for target in ("booth.render.read_checkpoint", "booth.render.read_config", "booth.checkpoint.read_safetensors",
                   "booth.checkpoint.read_pickle"):  # fmt: skip
        monkeypatch.setattr(target, no_loading)
    (tmp_path / "file").write_text("")
    bad = {
        "hw": (["--hw", "30", "32"], "multiples of 8"), "sampler": (["--sampler", "nope"], "unknown sampler"),
        "schedule": (["--schedule", "nope"], "unknown schedule"), "steps": (["--steps", "0"], "--steps"),
        "variations": (["-v", "0"], "--variations"), "strength": (["-s", "2"], "--strength"),
        "device": (["-d", "tpu"], "unknown device"), "output": (["-o", str(tmp_path / "file" / "out")], "cannot write"),
        "seed": (["--seed", "-1"], "--seed"), "both-models": (["-m", str(models.early)], "give the model once"),
    }[case]  # fmt: skip
    r = _run_bad(bad[0], tmp_path, models, "img2img", ["-i", images["photo.jpg"][0]])
    assert_error(r, bad[1])


# ----------------------------------------------------------------------------- out of memory, Ctrl-C


@pytest.mark.parametrize("error", ["OutOfMemoryError", "RuntimeError"])
def test_out_of_memory_says_what_to_do(error, tmp_path, models, monkeypatch):
    from booth.pipeline import StableDiffusion

    def oom(*args, **kwargs):
        if error == "OutOfMemoryError":
            raise getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)(
                "CUDA out of memory. Tried 2 GiB"
            )
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(StableDiffusion, "txt2img", oom)
    out = tmp_path / "out"
    r = booth_cli(
        "txt2img", "-c", models.single, "-o", out, "-p", "x", "--hw", 16, 16, "-b", 4, "-v", 4, *FAST
    )
    assert r.rc == 1 and r.out == "" and "Traceback" not in r.err
    errors = [line for line in r.err.splitlines() if "booth: error:" in line]
    assert len(errors) == 1 and r.err.rstrip().endswith(errors[0].split("booth: error: ")[1])
    assert "out of memory" in errors[0] and "--batch-size" in errors[0] and "--hw" in errors[0]
    assert "16x16" in errors[0] and "batches of 4" in errors[0]
    assert not list(out.rglob("*.png"))
    assert runs(out) == [], "a run that made no image leaves no folder"


def test_ctrl_c_during_sampling(tmp_path, models, monkeypatch):
    from booth.pipeline import StableDiffusion

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusion, "txt2img", interrupt)
    r = booth_cli("txt2img", "-c", models.single, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert r.rc == 130 and r.out == ""
    assert r.err.rstrip().endswith("booth: interrupted") and "Traceback" not in r.err
    assert runs(tmp_path / "out") == [], "a run interrupted before its first image leaves no folder"


def test_ctrl_c_while_writing_a_png_leaves_no_partial_file(tmp_path, models, monkeypatch):
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:  # half-write the second image, then Ctrl-C
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    r = booth_cli(
        "txt2img", "-c", models.single, "-o", out, "-p", "x", "--hw", 16, 16, "-v", 3, "--seed", 1, *FAST
    )
    assert r.rc == 130 and "booth: interrupted" in r.err and "Traceback" not in r.err
    samples = out / "run0" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["0000.png"]  # no temp file, no partial 0001.png
    assert r.paths == [samples / "0000.png"]
    Image.open(samples / "0000.png").verify()


# ----------------------------------------------------------------------------- help, version, a real process


def test_help_and_version():
    r = booth_cli("--help")
    assert r.rc == 0 and all(c in r.out for c in ("txt2img", "img2img", "download"))
    common = ["--prompt", "--negative-prompt", "--variations", "--batch-size", "--ckpt-path", "--model",
              "--output-dir", "--hw", "--steps", "--ddim-steps", "--sampler", "--schedule", "--scale",
              "--ddim-eta", "--seed", "--precision", "--device", "dpmpp_2m", "karras"]  # fmt: skip
    r = booth_cli("txt2img", "--help")
    assert r.rc == 0 and all(flag in r.out for flag in common), r.out
    r = booth_cli("img2img", "--help")
    assert r.rc == 0 and all(flag in r.out for flag in [*common, "--image", "--strength"]), r.out
    r = booth_cli("download", "--help")
    assert r.rc == 0 and "sd15" in r.out and "OWNER/NAME" in r.out
    r = booth_cli("--version")
    assert r.rc == 0 and r.out.strip() == f"booth {booth.__version__}"


def test_txt2img_in_a_real_process(tmp_path, models):
    out = tmp_path / "out"
    r = booth_process(tmp_path, "txt2img", "-c", models.single, "-o", out, "-p", "x", "--hw", 16, 16,
                      "--seed", 5, "-v", 2, "-b", 2, *FAST)  # fmt: skip
    assert r.rc == 0, r.err
    assert r.out == "".join(f"{out / 'run0' / 'samples' / f'000{i}.png'}\n" for i in range(2))
    assert "Traceback" not in r.err and "booth: writing to" in r.err


# ----------------------------------------------------------------------------- hostile input and faults


def test_a_prompt_that_is_not_utf8(tmp_path, models):
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates (PEP 383)."""
    for flag in ("-p", "-n"):
        argv = [sys.executable, "-m", "booth", "txt2img", "-c", str(models.single), "-o", str(tmp_path / "out"),
                "-p", "x", *FAST]  # fmt: skip
        argv[argv.index("-p") if flag == "-p" else len(argv) :] = [flag, b"a \xff\xfe fox"] + (
            [] if flag == "-n" else argv[argv.index("-p") + 2 :]
        )
        p = subprocess.run([os.fsencode(a) if isinstance(a, str) else a for a in argv], capture_output=True,
                           env=subprocess_env(tmp_path), cwd=tmp_path, timeout=120)  # fmt: skip
        r = Result(p.returncode, p.stdout.decode(), p.stderr.decode(errors="replace"))
        assert_error(r, "not valid UTF-8", out=tmp_path / "out")


def test_an_output_path_component_longer_than_the_file_system_allows(tmp_path, models):
    r = booth_cli("txt2img", "-c", models.single, "-o", tmp_path / ("x" * 300), "-p", "x", *FAST)
    assert_error(r, "cannot use", "as an output folder")


def test_weights_that_give_nan_are_an_error_not_a_black_image(tmp_path):
    """A file with inf weights (written by another tool: booth refuses to write one) makes NaN latents."""
    from safetensors.torch import save_file

    sd = random_weights(TINY, seed=0).state_dict()
    sd["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = float("inf")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "broken.safetensors"))
    r = booth_cli("txt2img", "-c", tmp_path / "broken.safetensors", "-o", tmp_path / "out", "-p", "x",
                  "--hw", 16, 16, *FAST)  # fmt: skip
    assert_failed(
        r, "broken produced NaN or infinite latents", "weights are probably broken", out=tmp_path / "out"
    )
    assert not list(tmp_path.rglob("*.png"))


def test_a_full_disk_while_writing_images(tmp_path, models, monkeypatch):
    real_save = Image.Image.save

    def full(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        raise OSError(28, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)
    r = booth_cli("txt2img", "-c", models.single, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert_failed(r, "the disk is full", "0000.png", "free some space", out=tmp_path / "out")


def test_sizes_whose_memory_forecast_does_not_fit_are_refused(tmp_path, models, images):
    """A 1024x1024 TINY image needs about 4 GB; 16384x16384 needs hundreds, more than any machine here has."""
    for command, extra in (("txt2img", []), ("img2img", ["-i", images["photo.jpg"][0]])):
        r = booth_cli(command, *extra, "-c", models.single, "-o", tmp_path / "out", "-p", "x", "--hw", 16384, 16384,
                      *FAST)  # fmt: skip
        assert_error(
            r, "16384x16384 images in batches of 1 need about", "GB", "is free", "--hw", out=tmp_path / "out"
        )


def test_clip_skip_beyond_the_text_encoders_layers(tmp_path, models):
    """Known from the file's header, so refused before any weights are read or a run folder is made."""
    r = booth_cli("txt2img", "-c", models.single, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16,
                  "--clip-skip", 3, *FAST)  # fmt: skip
    assert_error(r, "--clip-skip 3 is more than the 2 layers", out=tmp_path / "out")


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, models):
    """A kill -9 during a write leaves `.NAME.PID.XXXXXXXX.tmp`; the next run in that output folder removes the ones
    whose process is gone and leaves a live writer's alone."""
    samples = tmp_path / "out" / "run0" / "samples"
    samples.mkdir(parents=True)
    dead = samples / ".0003.png.99999999.abcd1234.tmp"  # above any pid_max: no such process
    live = samples / f".0004.png.{os.getpid()}.abcd1234.tmp"
    for p in (dead, live):
        p.write_bytes(b"half a png")
    r = booth_cli("txt2img", "-c", models.single, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, *FAST)
    assert r.rc == 0, r.err
    assert not dead.exists() and live.exists()


def test_ddim_without_a_schedule_runs_on_the_models_own_timesteps(tmp_path, models):
    """The default schedule is `automatic`: ddim and plms on the uniform schedule (as diffusers' DDIM and the seed
    tool), the others on Karras sigmas; args.yaml and each PNG record what was used."""
    for sampler, schedule, label in (("ddim", "uniform", "Uniform"), ("euler", "karras", "Karras")):
        out = tmp_path / sampler
        r = booth_cli(
            "txt2img", "-c", models.single, "-o", out, "-p", "x", "--hw", 16, 16, "--sampler", sampler, *FAST
        )
        assert r.rc == 0, r.err
        assert parse_infotext(parameters(r.paths[0]))[2]["Schedule type"] == label
        args = yaml.safe_load((out / "run0" / "args.yaml").read_text())
        assert args["schedule"] == schedule and args["eta"] == (0.0 if sampler == "ddim" else None)


@pytest.mark.parametrize("flag", ["-c", "-i"])
def test_a_path_longer_than_the_file_system_allows(tmp_path, models, flag):
    long = str(tmp_path / ("m" * 300 + ".safetensors"))
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")  # the image is read first, so it must exist
    args = (
        ["-c", long, "-i", str(tmp_path / "x.png")]
        if flag == "-c"
        else ["-c", str(models.single), "-i", long]
    )
    r = booth_cli("img2img", *args, "-o", tmp_path / "out", "-p", "x", *FAST)
    assert_error(r, "m" * 50, out=tmp_path / "out")


def test_a_million_variations_are_not_listed_up_front(tmp_path, models, monkeypatch):
    """The seeds of each batch are made as they are needed: -v 10**12 stops at Ctrl-C, it does not fill memory."""
    from booth.pipeline import StableDiffusion

    calls = []

    def stop_after_two(self, prompt, negative, seeds, settings, callback=None):
        calls.append(seeds)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [Image.new("RGB", (16, 16)) for _ in seeds]

    monkeypatch.setattr(StableDiffusion, "txt2img", stop_after_two)
    r = booth_cli("txt2img", "-c", models.single, "-o", tmp_path / "out", "-p", "x", "--hw", 16, 16, "-v", 10**12,
                  "-b", 3, "--seed", 0, *FAST)  # fmt: skip
    assert r.rc == 130 and calls == [[0, 1, 2], [3, 4, 5]]


def test_a_missing_image_is_reported_before_the_model_is_fetched(tmp_path):
    """The input is checked first: nobody waits for a 4 GB download to learn that the photo's name was wrong."""
    r = booth_cli("img2img", "-c", "someone/not-downloaded", "-i", tmp_path / "nope.png", "-o", tmp_path / "out",
                  "-p", "x", *FAST)  # fmt: skip
    assert_error(r, "image not found", "nope.png", out=tmp_path / "out")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_img2img_of_a_big_photo_on_the_demo_model_stays_small(tmp_path):
    """It used 12.6 GB: the photo was scaled to 768x768, and the VAE's attention held (pixels x pixels) scores.
    Now it works at the demo's 64x64, in the whole process's peak RSS of a few hundred MB."""
    Image.new("RGB", (1024, 1024), (200, 30, 30)).save(tmp_path / "photo.png")
    script = """
import sys
from booth.cli import main
rc = main(sys.argv[1:])
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(peak * 1024, file=sys.stderr)
sys.exit(rc)
"""
    argv = ["img2img", "-m", "demo", "-i", tmp_path / "photo.png", "-p", "a blue circle", "-o", tmp_path / "out",
            "--steps", "4", "--seed", "0"]  # fmt: skip
    p = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                       env=subprocess_env(tmp_path), timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert Image.open(p.stdout.strip()).size == (64, 64)
    assert int(p.stderr.strip().splitlines()[-1]) < 1.5e9
