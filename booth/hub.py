"""Turn a model spec (local path, alias, Hugging Face repo, file or URL) into a local path.

Downloads go through huggingface_hub, so they land in its normal cache (HF_HOME / HF_HUB_CACHE), show its
own progress bars on stderr, and work offline once cached. huggingface_hub is imported lazily to keep
`import booth` fast.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from .errors import BoothError, first_line
from .formats import (
    CHECKPOINT_SUFFIXES,
    COMPONENTS,
    DEMO_FILE,
    OPTIONAL_FOLDERS,
    SDXL_COMPONENT,
    TOWER_WEIGHTS,
    WEIGHTS_PREFERENCE,
    Found,
    identify,
    not_a_model,
)

ALIASES: dict[str, tuple[str, str | None]] = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
    "sd14": ("CompVis/stable-diffusion-v-1-4-original", "sd-v1-4.ckpt"),
    # SD 2.1 at 512, an eps model, and at 768, a v model its file does not mark: booth.checkpoint's v test tells
    "sd21-base": ("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors"),
    "sd21": ("stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors"),
}
DEFAULT_MODEL = "sd15"
# VAEs for --vae: SDXL's, refined to run in float16 without overflowing (the original needs fp32 or bf16)
VAE_ALIASES: dict[str, tuple[str, str]] = {
    "sdxl-vae-fp16-fix": ("madebyollin/sdxl-vae-fp16-fix", "sdxl.vae.safetensors"),
}

_SEGMENT = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?"  # one half of a Hub repo id
_REPO_RE = re.compile(rf"{_SEGMENT}/{_SEGMENT}")
_REPO_FILE_RE = re.compile(
    rf"(?P<repo>{_SEGMENT}/{_SEGMENT})/(?P<path>[^\\]+(?:{'|'.join(map(re.escape, CHECKPOINT_SUFFIXES))}))",
    re.IGNORECASE,
)
_HUB_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}


@dataclass(frozen=True)
class HubTarget:
    """What to fetch: one file of a repo, or (filename None) the diffusers folders booth needs."""

    repo: str
    filename: str | None = None
    revision: str | None = None
    kind: str = "diffusers model"  # what a whole-repo target is

    def __str__(self) -> str:
        what = self.filename or self.kind
        return f"{self.repo}, {what}" + (f" @ {self.revision}" if self.revision else "")


def resolve(spec: str, flag: str | None = "-c") -> pathlib.Path:
    """Return a local path for `spec`, downloading it into the Hugging Face cache if needed. `flag` is the option
    the spec came from, for the offline hint (None: `booth download`, which has none)."""
    target = parse(spec)
    if isinstance(target, pathlib.Path):
        return target
    return _fetch(target, spec, shlex.quote(spec), flag)


def find(spec: str, flag: str = "-c") -> Found:
    """What `spec` names, fetched if it is on the Hub: a checkpoint, a diffusers folder, a LoRA or a folder of
    checkpoints (booth.formats.Found). The one place a model spec is turned into something to load."""
    return identify(resolve(spec, flag))


def find_model(spec: str, flag: str = "-c") -> Found:
    """`find`, for where one model (a checkpoint or a diffusers folder) is needed."""
    found = find(spec, flag)
    if found.kind not in ("checkpoint", "diffusers"):
        raise not_a_model(found.path, found.kind)
    return found


def find_vae(spec: str) -> pathlib.Path:
    """A VAE for --vae: a local file or folder, a Hub file OWNER/NAME/FILE, or an alias (VAE_ALIASES)."""
    local = pathlib.Path(spec).expanduser()
    if spec and local.exists():
        return local
    if (
        spec not in VAE_ALIASES
        and not spec.startswith(("http://", "https://"))
        and not _REPO_FILE_RE.fullmatch(spec)
    ):
        raise BoothError(f"VAE not found: {spec} (give a VAE file or diffusers VAE folder, a Hub file "
                         f"OWNER/NAME/FILE.safetensors, or {', '.join(VAE_ALIASES)})")  # fmt: skip
    return resolve(spec, "--vae")


def download(spec: str = DEFAULT_MODEL, filename: str | None = None) -> pathlib.Path:
    """`booth download [ALIAS|REPO|URL [FILE]]`: fetch into the cache and return the local path."""
    if filename is None:
        return resolve(spec, None)
    repo = ALIASES[spec][0] if spec in ALIASES else spec
    if not _REPO_RE.fullmatch(repo):
        raise BoothError(
            f"with a FILE argument, the model must be an alias or a Hub repo OWNER/NAME, not {spec!r}"
        )
    _check_repo_path(filename)
    command = f"{shlex.quote(spec)} {shlex.quote(filename)}"
    return _fetch(HubTarget(repo, filename), spec, command, None)


def find_tower(spec: str, flag: str) -> pathlib.Path:
    """A transformers model folder (the metrics' CLIP or DINO): a local folder, or a Hub repo OWNER/NAME whose
    config.json and weights are fetched into the cache (offline: the cached copy)."""
    local = pathlib.Path(spec).expanduser()
    if local.is_dir():
        return local
    if local.exists() or not _REPO_RE.fullmatch(spec):
        raise BoothError(f"{flag} {spec}: give a model folder (config.json and {TOWER_WEIGHTS[0]}) or a Hugging "
                         "Face repo OWNER/NAME")  # fmt: skip
    return _fetch(HubTarget(spec, kind="transformers model"), spec, spec, flag, tower=True)


def _check_repo_path(path: str) -> None:
    """A file inside a repo: relative, with no `..` (huggingface_hub refuses those with an exception of its own)."""
    parts = path.replace("\\", "/").split("/")
    if not path or path.startswith("/") or ".." in parts or "" in parts:
        raise BoothError(f"{path!r} is not a file name inside a Hub repo (no '..', no leading or double '/')")


def parse(spec: str) -> pathlib.Path | HubTarget:
    """Apply the spec rules in order: existing path, alias, Hub URL, repo file, repo, missing path."""
    local = pathlib.Path(spec).expanduser()
    if spec and local.exists():
        return local
    if spec == "demo":
        if not DEMO_FILE.is_file():
            raise BoothError(
                f"the demo model is missing from this installation ({DEMO_FILE}); reinstall booth"
            )
        return DEMO_FILE
    if spec in ALIASES or spec in VAE_ALIASES:
        repo, filename = ALIASES.get(spec) or VAE_ALIASES[spec]
        return HubTarget(repo, filename)
    if spec.startswith(("http://", "https://")):
        return _parse_url(spec)
    if match := _REPO_FILE_RE.fullmatch(spec):
        _check_repo_path(match["path"])
        return HubTarget(match["repo"], match["path"])
    if _REPO_RE.fullmatch(spec) and not _has_checkpoint_extension(spec):
        return HubTarget(spec)
    if _looks_like_path(spec):
        raise BoothError(f"checkpoint not found: {spec}")
    aliases = ", ".join(["demo", *ALIASES])
    raise BoothError(
        f"unknown model {spec!r}: use an alias ({aliases}), a local checkpoint file or folder, "
        "a Hugging Face repo OWNER/NAME, a file OWNER/NAME/FILE.safetensors, or a huggingface.co URL"
    )


def diffusers_files(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Pick the files booth needs from a diffusers repo listing: (chosen, missing requirements)."""
    names = set(names)
    chosen, missing = [], []
    components = (*COMPONENTS, SDXL_COMPONENT) if f"{SDXL_COMPONENT}/config.json" in names else COMPONENTS
    for required in ["model_index.json", *(f"{c}/config.json" for c in components)]:
        (chosen if required in names else missing).append(required)
    for component in components:
        candidates = [f"{component}/{w}" for w in WEIGHTS_PREFERENCE if f"{component}/{w}" in names]
        if candidates:
            chosen.append(candidates[0])
        else:
            missing.append(f"{component} weights")
    chosen += sorted(n for n in names if n.count("/") == 1 and n.split("/")[0] in OPTIONAL_FOLDERS)
    return chosen, missing


def _has_checkpoint_extension(spec: str) -> bool:
    return spec.lower().endswith(CHECKPOINT_SUFFIXES)


def _looks_like_path(spec: str) -> bool:
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    return (
        spec.startswith((".", "/", "~"))
        or any(s in spec for s in separators)
        or _has_checkpoint_extension(spec)
    )


def _parse_url(url: str) -> HubTarget:
    """https://huggingface.co/OWNER/NAME/(blob|resolve)/REV/PATH -> that file at that revision."""
    parsed = urlparse(url)
    # Split before unquoting so an encoded revision like refs%2Fpr%2F1 stays one segment.
    parts = [unquote(p) for p in parsed.path.split("/") if p]
    if parsed.hostname not in _hub_hosts() or len(parts) < 5 or parts[2] not in ("blob", "resolve"):
        raise BoothError(
            f"unsupported URL {url}: expected https://huggingface.co/OWNER/NAME/resolve/REVISION/FILE"
        )
    filename = "/".join(parts[4:])
    _check_repo_path(filename)
    if parts[3] in ("", ".", ".."):
        raise BoothError(f"unsupported URL {url}: {parts[3]!r} is not a revision")
    return HubTarget(f"{parts[0]}/{parts[1]}", filename, parts[3])


def _hub_hosts() -> set[str]:
    # A mirror set through HF_ENDPOINT serves the same URL layout, so accept its links too.
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "")).hostname
    return _HUB_HOSTS | ({endpoint} if endpoint else set())


def _fetch(target: HubTarget, spec: str, command: str, flag: str | None, tower: bool = False) -> pathlib.Path:
    with _hub_errors(target, spec, command, flag, "model folder" if tower else "checkpoint file"):
        if target.filename is None:
            return _fetch_repo(target.repo, tower)
        from huggingface_hub import hf_hub_download

        return pathlib.Path(hf_hub_download(target.repo, target.filename, revision=target.revision))


def _fetch_repo(repo: str, tower: bool = False) -> pathlib.Path:
    """Download only what booth loads from a diffusers repo, or from a transformers one (a metric's tower: its
    config and one weights file); offline, use the cached snapshot. With `tower`, only the latter will do."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo)
    except Exception as error:
        if not _is_unreachable(error):
            raise
        return _cached_repo(repo, tower)
    names = [s.rfilename for s in info.siblings or []]
    if tower or ("model_index.json" not in names and tower_files(names)):
        chosen = tower_files(names)
        if not chosen:
            raise BoothError(
                f"{repo} is not a transformers model repo (no config.json and {TOWER_WEIGHTS[0]})"
            )
    else:
        chosen, missing = diffusers_files(names)
        if missing:
            raise BoothError(_not_diffusers_message(repo, missing, names))
    return pathlib.Path(snapshot_download(repo, allow_patterns=chosen))


def tower_files(names: Iterable[str]) -> list[str]:
    """The files booth needs from a transformers model repo listing, or [] if it is not one."""
    names = set(names)
    weights = [w for w in TOWER_WEIGHTS if w in names]
    return ["config.json", weights[0]] if "config.json" in names and weights else []


def _cached_repo(repo: str, tower: bool) -> pathlib.Path:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    for first, complete in (
        ("config.json", tower_files),
        ("model_index.json", lambda n: not diffusers_files(n)[1]),
    ):
        if tower and first != "config.json":
            continue
        index = try_to_load_from_cache(repo, first)
        if isinstance(index, str):
            folder = pathlib.Path(index).parent
            if complete([p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]):
                return folder
    # Raised as huggingface_hub's own "not in cache" error so _hub_errors words it like the file case.
    raise LocalEntryNotFoundError(f"{repo} is not (fully) in the local cache")


def _is_unreachable(error: Exception) -> bool:
    """Offline mode, a network failure or a Hub outage: the cases where the local cache should answer."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code >= 500
    # OfflineModeIsEnabled and requests' errors are OSErrors; httpx-based versions raise TransportError.
    transport = tuple(m.TransportError for name in ("httpx2", "httpx") if (m := sys.modules.get(name)))
    return isinstance(error, (OSError, *transport))


def _not_diffusers_message(repo: str, missing: list[str], names: list[str]) -> str:
    checkpoints = [n for n in names if _has_checkpoint_extension(n) and "/" not in n]
    hint = f"; its checkpoint files: {', '.join(checkpoints)}" if checkpoints else ""
    return (
        f"{repo} is not a diffusers-format Stable Diffusion repo (no {', '.join(missing)}); "
        f"name a single checkpoint file instead, e.g. {repo}/FILE.safetensors{hint}"
    )


@contextlib.contextmanager
def _hub_errors(target: HubTarget, spec: str, command: str, flag: str | None,
                local: str = "checkpoint file") -> Iterator[None]:  # fmt: skip
    """Turn huggingface_hub exceptions into one-line BoothErrors that say what to do next (`local`: what `flag`
    takes instead, offline)."""
    from huggingface_hub import errors as hf

    try:
        yield
    except (hf.HfHubHTTPError, hf.LocalEntryNotFoundError, hf.EntryNotFoundError) as e:
        raise BoothError(_hub_message(e, target, spec, command, flag, local)) from e


def _hub_message(e: Exception, target: HubTarget, spec: str, command: str, flag: str | None,
                 local_kind: str = "checkpoint file") -> str:  # fmt: skip
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    login = "run `hf auth login` (or set HF_TOKEN)"
    if isinstance(e, hf.GatedRepoError):
        return (
            f"{target.repo} is gated: accept its licence on https://huggingface.co/{target.repo} and {login}"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        # A typo'd local path can parse as a repo id, so say both were tried.
        local = (
            "" if spec in ALIASES or spec.startswith(("http://", "https://")) else " (nor as a local path)"
        )
        return (f"model {spec!r}: repository {target.repo} not found on the Hugging Face Hub{local}; "
                f"check the name, or if it is private {login}")  # fmt: skip
    if isinstance(e, hf.RevisionNotFoundError):
        return f"revision {target.revision!r} not found in {target.repo} on the Hugging Face Hub"
    if isinstance(e, hf.LocalEntryNotFoundError):  # before EntryNotFoundError, its base class
        offline = "offline mode is on (HF_HUB_OFFLINE=1)"
        reason = offline if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        local = f", or pass {flag} with a local {local_kind}" if flag else ""
        return (f"model {spec!r} ({target}) is not downloaded and {reason}; run `booth download {command}` on a "
                f"machine with internet access (or set HF_HOME to a cache that has it){local}")  # fmt: skip
    if isinstance(e, hf.EntryNotFoundError):
        return (f"file {target.filename} not found in {target.repo} on the Hugging Face Hub; "
                f"check the name on https://huggingface.co/{target.repo}/tree/{target.revision or 'main'}")  # fmt: skip
    status = e.response.status_code if getattr(e, "response", None) is not None else None
    if status in (401, 403):
        return f"access to {target.repo} denied (HTTP {status}); {login}"
    return f"Hugging Face Hub error for {target}: {first_line(e, None)}"
