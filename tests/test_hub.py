"""booth.hub against a fake Hugging Face Hub on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when it is imported, so every download
scenario runs `booth.hub` in a subprocess with its own environment. A dead proxy is set for everything
but 127.0.0.1, so an endpoint the fake forgot fails the test instead of reaching the real Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from booth import hub
from booth.errors import BoothError

ROOT = Path(__file__).resolve().parents[1]
SD15_REPO, SD15_FILE = hub.ALIASES["sd15"]
SD14_REPO, SD14_FILE = hub.ALIASES["sd14"]

# What booth must fetch from a full diffusers pipeline repo, and what it must leave alone.
DIFFUSERS_NEEDED = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "scheduler/scheduler_config.json",
}
DIFFUSERS_UNWANTED = {
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "feature_extractor/preprocessor_config.json",
    SD15_FILE,
    "v1-5-pruned.ckpt",
    "README.md",
}
FP16_ONLY = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",  # pickles lose to the fp16 safetensors variant
}


def _content(repo: str, path: str) -> bytes:
    return f"{repo}:{path}\n".encode() * 3


REPOS = {
    SD15_REPO: DIFFUSERS_NEEDED | DIFFUSERS_UNWANTED,
    SD14_REPO: {SD14_FILE, "sd-v1-4-full-ema.ckpt", "README.md"},
    "someone/fp16-only": FP16_ONLY,
    "someone/files": {"sub/dir/model.safetensors", "other.ckpt"},
    "someone/gated": {"model.safetensors"},
    # a metric's tower: a transformers repo with every framework's weights, of which booth takes one
    "openai/clip-vit-base-patch32": {
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "preprocessor_config.json",
        "README.md",
    },
    "facebook/dino-vits16": {"config.json", "pytorch_model.bin", "preprocessor_config.json"},
}
GATED = {"someone/gated"}


class FakeHub:
    """The few Hub endpoints huggingface_hub calls, serving REPOS; records every request."""

    def __init__(self, repos: dict[str, set[str]]):
        self.files = {repo: {p: _content(repo, p) for p in paths} for repo, paths in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloaded(self) -> set[str]:
        """Repo paths fetched with GET .../resolve/..., as 'OWNER/NAME:PATH'."""
        return {
            f"{p[0]}/{p[1]}:{'/'.join(p[4:])}" for m, p in self._paths() if m == "GET" and p[2] == "resolve"
        }

    def _paths(self):
        return [(m, [unquote(s) for s in urlparse(u).path.split("/") if s]) for m, u in self.requests]

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                fake.requests.append(("HEAD", self.path))
                fake._route(self, body=False)

            def do_GET(self):
                fake.requests.append(("GET", self.path))
                fake._route(self, body=True)

            def log_message(self, *args):  # keep pytest output clean
                pass

        return Handler

    def _route(self, req, body: bool) -> None:
        parts = [unquote(s) for s in urlparse(req.path).path.split("/") if s]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(req, f"{parts[2]}/{parts[3]}", parts[4:], body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(req, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
        self.unhandled.append((req.command, req.path))
        self._send(req, 418, b"fake hub: unhandled endpoint", body)

    def _repo_error(self, req, repo: str, rev: str, body: bool) -> bool:
        if repo not in self.files:
            self._send(req, 404, b"Repository not found", body, {"X-Error-Code": "RepoNotFound"})
        elif repo in GATED:
            self._send(req, 403, b"gated", body, {"X-Error-Code": "GatedRepo"})
        elif rev not in ("main", self.commit(repo)):
            self._send(req, 404, b"Invalid rev id", body, {"X-Error-Code": "RevisionNotFound"})
        else:
            return False
        return True

    def _api(self, req, repo: str, rest: list[str], body: bool) -> None:
        rev = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
        if self._repo_error(req, repo, rev, body):
            return
        files = self.files[repo]
        if rest[:1] == ["tree"]:  # list_repo_tree, used by snapshot_download
            data = [
                {"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                for p, c in sorted(files.items())
            ]
        else:  # model_info / repo_info
            data = {
                "id": repo,
                "sha": self.commit(repo),
                "siblings": [{"rfilename": p} for p in sorted(files)],
            }
        self._send(req, 200, json.dumps(data).encode(), body, {"Content-Type": "application/json"})

    def _resolve(self, req, repo: str, rev: str, path: str, body: bool) -> None:
        if self._repo_error(req, repo, rev, body):
            return
        headers = {"X-Repo-Commit": self.commit(repo)}
        content = self.files[repo].get(path)
        if content is None:
            return self._send(
                req, 404, b"Entry not found", body, {**headers, "X-Error-Code": "EntryNotFound"}
            )
        headers["ETag"] = f'"{hashlib.sha256(content).hexdigest()}"'
        self._send(req, 200, content, body, headers)

    @staticmethod
    def _send(req, status: int, content: bytes, body: bool, headers: dict | None = None) -> None:
        req.send_response(status)
        for key, value in {**(headers or {}), "Content-Length": str(len(content))}.items():
            req.send_header(key, value)
        req.end_headers()
        if body:
            req.wfile.write(content)


@pytest.fixture
def fake_hub():
    server = FakeHub(REPOS)
    yield server
    server.stop()
    assert not server.unhandled, f"booth called endpoints the fake hub lacks: {server.unhandled}"


_RUNNER = """
import json, sys
from booth import hub
from booth.errors import BoothError
for func, *args in json.loads(sys.argv[1]):
    try:
        print(json.dumps({"path": str(getattr(hub, func)(*args))}))
    except BoothError as error:
        print(json.dumps({"error": str(error)}))
"""


def call_many(tmp_path: Path, endpoint: str, calls: list[list[str]], offline: bool = False) -> list[dict]:
    """Run booth.hub.FUNC(*ARGS) for each [FUNC, *ARGS] in one fresh interpreter: {"path"} or {"error"}."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
    dead_proxy = "http://127.0.0.1:9"  # anything not on 127.0.0.1 fails here instead of going out
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HTTP_PROXY=dead_proxy,
        HTTPS_PROXY=dead_proxy,
        ALL_PROXY=dead_proxy,
        NO_PROXY="127.0.0.1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(calls)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(calls), f"booth.hub wrote to stdout: {proc.stdout!r}"
    return [json.loads(line) for line in lines]


def call(tmp_path: Path, endpoint: str, func: str, *args: str, offline: bool = False) -> dict:
    return call_many(tmp_path, endpoint, [[func, *args]], offline)[0]


def test_alias_downloads_once_then_works_offline(fake_hub, tmp_path):
    first = call(tmp_path, fake_hub.url, "resolve", "sd15")
    path = Path(first["path"])
    assert path.read_bytes() == fake_hub.files[SD15_REPO][SD15_FILE]
    assert str(tmp_path / "hf") in str(path)
    assert fake_hub.downloaded() == {f"{SD15_REPO}:{SD15_FILE}"}
    fake_hub.stop()
    # Explicit offline mode, then a Hub that refuses connections: both answer from the cache.
    assert call(tmp_path, fake_hub.url, "resolve", "sd15", offline=True) == first
    assert call(tmp_path, fake_hub.url, "resolve", "sd15") == first


def test_alias_not_cached_offline_names_download_command(tmp_path):
    result = call(tmp_path, "http://127.0.0.1:9", "resolve", "sd15", offline=True)
    assert "booth download sd15" in result["error"]
    assert SD15_REPO in result["error"] and "HF_HOME" in result["error"]


def test_diffusers_repo_fetches_only_what_booth_needs(fake_hub, tmp_path):
    folder = Path(call(tmp_path, fake_hub.url, "resolve", SD15_REPO)["path"])
    assert fake_hub.downloaded() == {f"{SD15_REPO}:{p}" for p in DIFFUSERS_NEEDED}
    for name in DIFFUSERS_NEEDED:
        assert (folder / name).read_bytes() == fake_hub.files[SD15_REPO][name]
    assert not any((folder / name).exists() for name in DIFFUSERS_UNWANTED)
    fake_hub.stop()
    assert call(tmp_path, fake_hub.url, "resolve", SD15_REPO, offline=True) == {"path": str(folder)}


def test_diffusers_repo_with_only_fp16_variants(fake_hub, tmp_path):
    call(tmp_path, fake_hub.url, "resolve", "someone/fp16-only")
    expected = FP16_ONLY - {"text_encoder/pytorch_model.bin"}
    assert fake_hub.downloaded() == {f"someone/fp16-only:{p}" for p in expected}


def test_diffusers_repo_not_cached_offline(tmp_path):
    result = call(tmp_path, "http://127.0.0.1:9", "resolve", SD15_REPO, offline=True)
    assert f"booth download {SD15_REPO}" in result["error"]


def test_single_file_repo_is_not_a_diffusers_repo(fake_hub, tmp_path):
    error = call(tmp_path, fake_hub.url, "resolve", SD14_REPO)["error"]
    assert "not a diffusers-format" in error and SD14_FILE in error
    assert fake_hub.downloaded() == set()


def test_repo_file_and_url_forms(fake_hub, tmp_path):
    repo, name = "someone/files", "sub/dir/model.safetensors"
    commit = fake_hub.commit(repo)
    url = f"https://huggingface.co/{repo}/blob/{commit}/{name}?download=true"
    by_url = Path(call(tmp_path, fake_hub.url, "resolve", url)["path"])
    assert by_url.read_bytes() == fake_hub.files[repo][name]
    assert ("GET", f"/{repo}/resolve/{commit}/{name}") in fake_hub.requests  # the URL's revision
    # Same file at main: huggingface_hub only checks the commit, then reuses the cached blob.
    assert Path(call(tmp_path, fake_hub.url, "resolve", f"{repo}/{name}")["path"]) == by_url
    assert ("HEAD", f"/{repo}/resolve/main/{name}") in fake_hub.requests
    assert fake_hub.downloaded() == {f"{repo}:{name}"}


HUB_ERRORS = {
    "nobody/missing": ["nobody/missing", "not found"],
    "nobody/missing/model.safetensors": ["nobody/missing", "not found"],
    "someone/files/nope.safetensors": ["nope.safetensors", "not found", "someone/files"],
    "https://huggingface.co/someone/files/resolve/v9/other.ckpt": ["'v9'", "not found"],
    "someone/gated/model.safetensors": ["gated", "hf auth login", "HF_TOKEN", "licence"],
    "someone/gated": ["gated", "hf auth login"],
}


def test_hub_errors_are_actionable(fake_hub, tmp_path):
    results = call_many(tmp_path, fake_hub.url, [["resolve", spec] for spec in HUB_ERRORS])
    for (spec, expected), result in zip(HUB_ERRORS.items(), results):
        assert all(part in result["error"] for part in expected), (spec, result)
        assert "\n" not in result["error"]
    assert fake_hub.downloaded() == set()


def test_download_default_alias_and_repo_file(fake_hub, tmp_path):
    calls = [
        ["download"],
        ["download", "sd14", "sd-v1-4-full-ema.ckpt"],
        ["download", "someone/files", "other.ckpt"],
    ]
    default, other, by_repo = (Path(r["path"]) for r in call_many(tmp_path, fake_hub.url, calls))
    assert default.read_bytes() == fake_hub.files[SD15_REPO][SD15_FILE]
    assert other.read_bytes() == fake_hub.files[SD14_REPO]["sd-v1-4-full-ema.ckpt"]
    assert by_repo.read_bytes() == fake_hub.files["someone/files"]["other.ckpt"]
    assert fake_hub.downloaded() == {
        f"{SD15_REPO}:{SD15_FILE}",
        f"{SD14_REPO}:sd-v1-4-full-ema.ckpt",
        "someone/files:other.ckpt",
    }


def test_download_with_file_not_cached_offline(tmp_path):
    error = call(tmp_path, "http://127.0.0.1:9", "download", "someone/files", "other.ckpt", offline=True)[
        "error"
    ]
    assert "booth download someone/files other.ckpt" in error


# In-process tests below never reach huggingface_hub's network code (conftest sets HF_HUB_OFFLINE=1).


def test_local_paths_pass_through(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    assert hub.resolve(str(ckpt)) == ckpt
    assert hub.resolve(str(tmp_path)) == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.resolve("~/model.safetensors") == ckpt
    # A local folder shadows a repo id of the same name.
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("owner/name") == Path("owner/name")


@pytest.mark.parametrize(
    "spec", ["./nope.ckpt", "/no/such/file.safetensors", "~/nope", "nope.ckpt", "a/b/c", "a/b.pt"]
)
def test_missing_local_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BoothError, match="checkpoint not found"):
        hub.resolve(spec)


def test_unknown_spec_lists_aliases():
    with pytest.raises(BoothError, match="sd15, sd14"):
        hub.resolve("sd99")


def test_parse_rules():
    assert hub.parse("sd14") == hub.HubTarget(SD14_REPO, SD14_FILE)
    # the published SD 2.1 512 file (stabilityai's repo, its safetensors variant)
    sd21 = hub.HubTarget("stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors")
    assert hub.parse("sd21-base") == sd21
    assert hub.parse("sd21") == hub.HubTarget(
        "stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors"
    )
    assert hub.parse("o/n") == hub.HubTarget("o/n")
    assert hub.parse("o/n/a/b.ckpt") == hub.HubTarget("o/n", "a/b.ckpt")
    url = "https://huggingface.co/o/n/resolve/refs%2Fpr%2F3/a/b.safetensors"
    assert hub.parse(url) == hub.HubTarget("o/n", "a/b.safetensors", "refs/pr/3")
    with pytest.raises(BoothError, match="unsupported URL"):
        hub.parse("https://example.com/o/n/resolve/main/a.ckpt")


def test_diffusers_file_preference():
    names = {
        "model_index.json",
        *(f"{c}/config.json" for c in hub.COMPONENTS),
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
    }
    chosen, missing = hub.diffusers_files(names)
    assert not missing
    assert {n for n in chosen if not n.endswith(".json")} == {
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
    }
    assert hub.diffusers_files(names - {"vae/config.json", *(n for n in names if n.startswith("unet/d"))})[
        1
    ] == [
        "vae/config.json",
        "unet weights",
    ]


@pytest.mark.parametrize(
    "call",
    [
        ["download", "someone/files", "../../etc/passwd.ckpt"],
        ["download", "someone/files", "/abs/model.safetensors"],
        ["download", "sd15", "a//b.safetensors"],
        ["download", "https://huggingface.co/o/n/resolve/main/../../x.safetensors"],
        ["resolve", "https://huggingface.co/o/n/resolve/../x.safetensors"],
        ["resolve", "o/n/sub/../../x.safetensors"],
    ],
)
def test_a_path_that_leaves_the_repo_is_refused_before_the_network(call):
    """huggingface_hub raises its own exception for `..` in a file name; booth says what is wrong first."""
    func, *args = call
    with pytest.raises(BoothError, match="not a file name inside a Hub repo|is not a revision"):
        getattr(hub, func)(*args)


def test_the_offline_hint_names_the_commands_own_model_flag():
    for flag in ("-c", "-m"):
        with pytest.raises(BoothError, match=f"or pass {flag} with a local checkpoint file"):
            hub.find("someone/not-downloaded", flag)
    # booth download has no model flag to suggest
    for args in (["someone/not-downloaded"], ["someone/files", "other.ckpt"]):
        with pytest.raises(BoothError, match="booth download") as e:
            hub.download(*args)
        assert "pass" not in str(e.value), e.value


def test_a_metric_tower_fetches_its_config_and_one_weights_file(fake_hub, tmp_path):
    clip, dino = "openai/clip-vit-base-patch32", "facebook/dino-vits16"
    got = call_many(tmp_path, fake_hub.url, [["find_tower", clip, "--clip-model"], ["find_tower", dino, "--dino-model"],
                                             ["resolve", dino]])  # fmt: skip
    folders = [Path(r["path"]) for r in got]
    assert fake_hub.downloaded() == {f"{clip}:config.json", f"{clip}:model.safetensors", f"{dino}:config.json",
                                     f"{dino}:pytorch_model.bin"}, "safetensors first, and nothing else"  # fmt: skip
    assert (folders[0] / "model.safetensors").read_bytes() == fake_hub.files[clip]["model.safetensors"]
    assert folders[2] == folders[1], "booth download REPO of a transformers repo fetches the same"
    fake_hub.stop()
    assert call(tmp_path, fake_hub.url, "find_tower", clip, "--clip-model", offline=True) == {
        "path": str(folders[0])
    }


def test_a_metric_tower_not_cached_offline_says_what_to_download(tmp_path):
    error = call(tmp_path, "http://127.0.0.1:9", "find_tower", "openai/clip-vit-base-patch32", "--clip-model",
                 offline=True)["error"]  # fmt: skip
    assert "booth download openai/clip-vit-base-patch32" in error
    assert "or pass --clip-model with a local model folder" in error


def test_a_repo_that_is_no_tower(fake_hub, tmp_path):
    error = call(tmp_path, fake_hub.url, "find_tower", SD15_REPO, "--dino-model")["error"]
    assert "is not a transformers model repo" in error
    assert fake_hub.downloaded() == set()


def test_a_tower_spec_that_is_neither_folder_nor_repo(tmp_path):
    (tmp_path / "file.bin").write_bytes(b"x")
    for spec in (str(tmp_path / "file.bin"), "not a repo"):
        with pytest.raises(
            BoothError, match="--clip-model .*: give a model folder .* or a Hugging Face repo"
        ):
            hub.find_tower(spec, "--clip-model")
    assert hub.find_tower(str(tmp_path), "--clip-model") == tmp_path
