"""The DreamBooth benchmark's subject photos ("DreamBench": the dataset/ folder of github.com/google/dreambooth, 30
subjects, 158 images), downloaded once into booth's part of the Hugging Face cache, verified, and named on the
command line as `dreambench:SUBJECT` (`booth evaluate --subject-dir dreambench:dog`).

The cached folder is either complete or absent: the archive is checked (CRCs, every subject, every image, no
member outside the dataset) before anything is extracted, the dataset is extracted next to its final place and
renamed into it, and its manifest (dreambench.json) is what says it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .atomic import DiskFull, clean_stale, disk_full, locked, stale, write_text
from .errors import BoothError, first_line

URL = "https://github.com/google/dreambooth/archive/refs/heads/main.zip"
URL_VARIABLE = "BOOTH_DREAMBENCH_URL"  # a mirror or a local copy of the archive
PREFIX = "dreambench:"
MANIFEST = "dreambench.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
AGAIN = "run `booth download dreambench` again"

# The benchmark's subjects and the class word of each (dataset/prompts_and_classes.txt), in the paper's order.
SUBJECT_CLASSES: dict[str, str] = {
    "backpack": "backpack",
    "backpack_dog": "backpack",
    "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl",
    "can": "can",
    "candle": "candle",
    "cat": "cat",
    "cat2": "cat",
    "clock": "clock",
    "colorful_sneaker": "sneaker",
    "dog": "dog",
    "dog2": "dog",
    "dog3": "dog",
    "dog5": "dog",
    "dog6": "dog",
    "dog7": "dog",
    "dog8": "dog",
    "duck_toy": "toy",
    "fancy_boot": "boot",
    "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy",
    "pink_sunglasses": "glasses",
    "poop_emoji": "toy",
    "rc_car": "toy",
    "red_cartoon": "cartoon",
    "robot_toy": "toy",
    "shiny_sneaker": "sneaker",
    "teapot": "teapot",
    "vase": "vase",
    "wolf_plushie": "stuffed animal",
}


def url() -> str:
    return os.environ.get(URL_VARIABLE) or URL


def cache_dir() -> Path:
    """Where the dataset lives: under HF_HOME, so that moving the models' cache moves it too."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "booth" / "dreambench"


def subject_class(name: str) -> str:
    """The class word of a subject (`dog` or `dreambench:dog`)."""
    return SUBJECT_CLASSES[_known(name.removeprefix(PREFIX))]


def subject_dir(spec: str) -> Path:
    """`dreambench:SUBJECT` as the cached subject's folder; any other spec is a folder path, returned as is."""
    if not spec.startswith(PREFIX) or Path(spec).exists():  # a real folder of that name wins, as for models
        return Path(spec)
    name = _known(spec.removeprefix(PREFIX))
    root = cache_dir()
    if not is_complete(root):
        raise BoothError(f"the DreamBench dataset is not downloaded (looked in {root}); run `booth download "
                         f"dreambench` first (or set HF_HOME to a cache that has it)")  # fmt: skip
    return root / name


def _known(name: str) -> str:
    if name not in SUBJECT_CLASSES:
        raise BoothError(
            f"unknown DreamBench subject {name!r}; the subjects are: {', '.join(SUBJECT_CLASSES)}"
        )
    return name


def is_complete(root: Path) -> bool:
    """Whether `root` holds every subject with exactly the files its manifest lists (names and sizes)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        subjects = manifest["subjects"]
        if set(subjects) != set(SUBJECT_CLASSES):
            return False
        return all(
            files and all((root / s / f).stat().st_size == size for f, size in files.items())
            for s, files in subjects.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def download() -> Path:
    """The dataset's folder, downloaded and verified first unless the cache already has it complete."""
    from huggingface_hub import constants

    root = cache_dir()
    if is_complete(root):
        return root
    if constants.HF_HUB_OFFLINE:
        raise BoothError(f"the DreamBench dataset is not in the cache ({root}) and HF_HUB_OFFLINE is set; run "
                         "`booth download dreambench` online (or set HF_HOME to a cache that has it)")  # fmt: skip
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BoothError(f"cannot create {root.parent}: {e.strerror or e}") from None
    with locked(root.parent, "downloading DreamBench"):
        if is_complete(root):  # another booth may have finished it since the check above
            return root
        _clean(root.parent)
        _fetch_and_install(url(), root)
    return root


def _clean(parent: Path) -> None:
    """Remove what a killed download left: its archive (a file) and its half-extracted folders."""
    clean_stale(parent)
    for p in parent.glob(".dreambench*.tmp"):
        if p.is_dir() and stale(p):
            shutil.rmtree(p, ignore_errors=True)


def _temp_name(parent: Path, what: str) -> Path:
    # .NAME.PID.RANDOM.tmp: the name booth.atomic's clean-up recognises, so a killed run's leftovers go next time
    return parent / f".{what}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _fetch_and_install(source: str, root: Path) -> None:
    fd, name = tempfile.mkstemp(prefix=f".dreambench.zip.{os.getpid()}.", suffix=".tmp", dir=root.parent)
    os.close(fd)
    archive, staging = Path(name), _temp_name(root.parent, "dreambench")
    try:
        _fetch(source, archive)
        print("booth: verifying the DreamBench archive", file=sys.stderr, flush=True)
        with _open_zip(archive) as zf:
            members = _verify(zf, source)
            _extract(zf, members, staging, source)
        archive.unlink()  # no need to hold both copies on disk while the dataset is renamed into place
        _install(staging, root)
    finally:
        with contextlib.suppress(FileNotFoundError):
            archive.unlink()
        shutil.rmtree(staging, ignore_errors=True)


def _fetch(source: str, dest: Path) -> None:
    """Stream `source` into `dest` with a progress bar on stderr; BoothError if it fails or comes back short."""
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    from . import __version__

    print(f"booth: downloading the DreamBench dataset from {source}", file=sys.stderr, flush=True)
    request = urllib.request.Request(source, headers={"User-Agent": f"booth/{__version__}"})
    retry = f"check the network and retry, or set {URL_VARIABLE} to a copy of the archive"
    try:
        # build_opener reads the proxy variables now, not when urllib was first used
        with urllib.request.build_opener().open(request, timeout=60) as response, open(dest, "wb") as f:
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            with tqdm(total=total, desc="dreambench", unit="B", unit_scale=True, unit_divisor=1024,
                      file=sys.stderr) as bar:  # fmt: skip
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            got = f.tell()
    except urllib.error.HTTPError as e:
        raise BoothError(f"cannot download the DreamBench dataset from {source}: HTTP {e.code} {e.reason}; "
                         f"{retry}") from None  # fmt: skip
    except urllib.error.URLError as e:
        raise BoothError(f"cannot reach {source} ({first_line(e.reason, 120)}); {retry}") from None
    except (OSError, ValueError) as e:  # a dropped connection, a timeout, a full disk, a bad URL
        if disk_full(e, dest.parent):
            raise DiskFull(dest.parent, then=AGAIN) from None
        raise BoothError(f"the download from {source} failed ({first_line(e, 120)}); {retry}") from None
    if total is not None and got != total:
        raise BoothError(f"the download is damaged (got {got} of {total} bytes from {source}); {AGAIN}")


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise BoothError(f"the download is damaged ({first_line(e, 120)}); {AGAIN}") from None


def _verify(zf: zipfile.ZipFile, source: str) -> dict[zipfile.ZipInfo, PurePosixPath]:
    """The archive's dataset members and where each goes under the dataset folder, once the whole archive is
    known to be intact, safe and complete."""
    from PIL import Image

    for info in zf.infolist():
        _check_safe(info)
    try:
        bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        raise BoothError(f"the download is damaged ({first_line(e, 120)}); {AGAIN}") from None
    if bad is not None:
        raise BoothError(f"the download is damaged ({bad} fails its CRC check); {AGAIN}")
    members = _dataset_members(zf, source)
    images = {info: rel for info, rel in members.items() if _is_subject_image(rel)}
    missing = [s for s in SUBJECT_CLASSES if not any(rel.parts[0] == s for rel in images.values())]
    if missing:
        raise BoothError(f"the archive from {source} lacks the DreamBench subject(s) {', '.join(missing)}; set "
                         f"{URL_VARIABLE} to a complete copy of the google/dreambooth archive")  # fmt: skip
    for info in images:
        try:
            with zf.open(info) as f, Image.open(f) as image:
                image.verify()
        except Exception:  # PIL raises many types for a file that is not an image, none worth quoting
            raise BoothError(
                f"the download is damaged ({info.filename} is not a readable image); {AGAIN}"
            ) from None
    return members


def _check_safe(info: zipfile.ZipInfo) -> None:
    # extraction writes only under the staging folder, so anything that could point elsewhere is refused
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    unsafe = name.startswith(("/", "\\")) or ":" in (parts[0] if parts else "") or ".." in parts
    if unsafe or stat.S_ISLNK(info.external_attr >> 16):
        raise BoothError(f"the archive has an unsafe member {name!r} (an absolute path, '..' or a link); refusing "
                         f"to extract it: set {URL_VARIABLE} to the google/dreambooth archive")  # fmt: skip


def _dataset_members(zf: zipfile.ZipFile, source: str) -> dict[zipfile.ZipInfo, PurePosixPath]:
    """TOP/dataset/... members (files only) and their paths under dataset/; the rest of the repo is left out."""
    members = {}
    for info in zf.infolist():
        parts = PurePosixPath(info.filename).parts
        if len(parts) >= 3 and parts[1] == "dataset" and not info.is_dir():
            members[info] = (parts[0], PurePosixPath(*parts[2:]))
    tops = {top for top, _ in members.values()}
    if len(tops) != 1:
        raise BoothError(f"the archive from {source} is not the DreamBench archive (expected one "
                         f"dreambooth-main/dataset/ folder, found {len(tops)}); set {URL_VARIABLE} to the "
                         "google/dreambooth archive")  # fmt: skip
    return {info: rel for info, (_, rel) in members.items()}


def _is_subject_image(rel: PurePosixPath) -> bool:
    return len(rel.parts) == 2 and rel.parts[0] in SUBJECT_CLASSES and rel.suffix.lower() in IMAGE_SUFFIXES


def _extract(
    zf: zipfile.ZipFile, members: dict[zipfile.ZipInfo, PurePosixPath], staging: Path, source: str
) -> None:
    """Write the dataset into `staging`, its manifest last: a folder without a valid manifest is never used."""
    subjects: dict[str, dict[str, int]] = {s: {} for s in SUBJECT_CLASSES}
    try:
        staging.mkdir()
        for info, rel in members.items():
            target = staging.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if _is_subject_image(rel):
                subjects[rel.parts[0]][rel.name] = target.stat().st_size
        manifest = {"source": source, "subjects": {s: dict(sorted(f.items())) for s, f in subjects.items()}}
        write_text(staging / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    except OSError as e:
        if disk_full(e, staging.parent):
            raise DiskFull(staging.parent, then=AGAIN) from None
        raise BoothError(
            f"cannot extract the DreamBench dataset into {staging.parent}: {e.strerror or e}"
        ) from None


def _install(staging: Path, root: Path) -> None:
    """Rename `staging` into `root`'s place; an incomplete folder already there is moved aside and removed."""
    aside = _temp_name(root.parent, "dreambench.old")
    try:
        if root.exists():
            os.rename(root, aside)
        os.rename(staging, root)
    except OSError as e:
        raise BoothError(f"cannot move the DreamBench dataset into {root}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(aside, ignore_errors=True)
