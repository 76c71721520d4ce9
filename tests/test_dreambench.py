"""booth.dreambench and `booth download dreambench` against a synthetic archive served on 127.0.0.1.

Most tests run the CLI in this process, with huggingface_hub's HF_HOME and HF_HUB_OFFLINE constants patched where
booth reads them; one runs `python -m booth` with the environment set, as a user would. A dead proxy is set for
everything but 127.0.0.1, so a URL the tests forgot to point at the fake fails instead of reaching GitHub.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import error_of
from huggingface_hub import constants
from PIL import Image

from booth import dreambench
from booth.cli import main
from booth.data import find_images
from booth.errors import BoothError

ROOT = Path(__file__).resolve().parents[1]
TOP = "dreambooth-main"
DEAD_PROXY = "http://127.0.0.1:9"


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (i * 8 % 256, 100, 200)).save(buf, "JPEG")
    return buf.getvalue()


def members(drop: str | None = None) -> dict[str, bytes]:
    files = {
        f"{TOP}/dataset/{s}/00.jpg": jpeg(i) for i, s in enumerate(dreambench.SUBJECT_CLASSES) if s != drop
    }
    files[f"{TOP}/dataset/dog/01.jpg"] = jpeg(99)
    files[f"{TOP}/dataset/prompts_and_classes.txt"] = b"Classes\nsubject_name,class\ndog,dog\n"
    files[f"{TOP}/dataset/references_and_licenses.txt"] = b"dog: Unsplash\n"
    files[f"{TOP}/README.md"] = b"# DreamBooth\n"
    files[f"{TOP}/docs/README.md"] = b"# not the dataset either\n"
    files[f"{TOP}/dreambooth.png"] = jpeg(1)
    return files


def build_zip(files: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored, so a flipped byte stays a CRC error
        for name, data in files.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def corrupt(archive: bytes, member: str) -> bytes:
    """`archive` with one byte of `member`'s data flipped: its CRC no longer matches."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        info = zf.getinfo(member)
    header = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(archive)
    data[header + info.file_size // 2] ^= 0xFF
    return bytes(data)


class FakeGitHub:
    """Serves `body` at /main.zip (a 404 elsewhere); `truncate` sends half of it under the full Content-Length."""

    def __init__(self):
        self.body = build_zip(members())
        self.truncate = False
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/main.zip"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake.requests.append(self.path)
                if self.path != "/main.zip":
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(fake.body)))
                self.end_headers()
                self.wfile.write(fake.body[: len(fake.body) // 2] if fake.truncate else fake.body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        return Handler


@pytest.fixture
def github(monkeypatch):
    server = FakeGitHub()
    monkeypatch.setenv("BOOTH_DREAMBENCH_URL", server.url)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setenv("BOOTH_DREAMBENCH_URL", DEAD_PROXY + "/nothing-here.zip")
    for key in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(key)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(key, DEAD_PROXY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def cached(home: Path) -> Path:
    return home / "booth" / "dreambench"


def leftovers(home: Path) -> list[str]:
    """What a download left in the cache besides the dataset folder and the lock."""
    parent = home / "booth"
    return (
        sorted(p.name for p in parent.iterdir() if p.name not in ("dreambench", ".lock"))
        if parent.exists()
        else []
    )


def test_download_extracts_only_the_dataset(github, online, hf_home, capsys):
    assert main(["download", "dreambench"]) == 0
    out, err = capsys.readouterr()
    root = cached(hf_home)
    assert out == f"{root}\n"
    assert "B/s" in err and "100%" in err  # tqdm's byte bar, on stderr
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(dreambench.SUBJECT_CLASSES)
    assert {p.name for p in root.iterdir() if p.is_file()} == {
        "prompts_and_classes.txt",
        "references_and_licenses.txt",
        "dreambench.json",
    }
    assert sorted(p.name for p in (root / "dog").iterdir()) == ["00.jpg", "01.jpg"]
    assert (root / "vase" / "00.jpg").read_bytes() == members()[f"{TOP}/dataset/vase/00.jpg"]
    manifest = json.loads((root / "dreambench.json").read_text())
    assert manifest["subjects"]["dog"] == {"00.jpg": (root / "dog" / "00.jpg").stat().st_size,
                                           "01.jpg": (root / "dog" / "01.jpg").stat().st_size}  # fmt: skip
    assert not list(hf_home.rglob("README.md")) and not list(hf_home.rglob("dreambooth.png"))
    assert leftovers(hf_home) == []  # the zip and the staging folder are gone
    assert github.requests == ["/main.zip"]


def test_second_download_uses_the_cache_even_offline(github, online, hf_home, capsys, monkeypatch):
    assert main(["download", "dreambench"]) == 0
    capsys.readouterr()
    github.stop()
    assert main(["download", "dreambench"]) == 0
    assert capsys.readouterr().out == f"{cached(hf_home)}\n"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "dreambench"]) == 0
    assert capsys.readouterr().out == f"{cached(hf_home)}\n"
    assert github.requests == ["/main.zip"]


def test_a_cache_that_lost_a_file_is_downloaded_again(github, online, hf_home, capsys):
    root = dreambench.download()
    (root / "dog" / "01.jpg").unlink()
    with pytest.raises(BoothError, match="booth download dreambench"):
        dreambench.subject_dir("dreambench:dog")
    (root / "dog" / "01.jpg").write_bytes(b"half")  # back, but not the file the manifest lists
    assert not dreambench.is_complete(root)
    assert dreambench.download() == root
    assert (root / "dog" / "01.jpg").is_file()
    assert github.requests == ["/main.zip", "/main.zip"]
    assert leftovers(hf_home) == []  # the incomplete folder moved aside was removed


def test_subject_dir_and_classes(github, online, hf_home):
    root = dreambench.download()
    folder = dreambench.subject_dir("dreambench:dog")
    assert folder == root / "dog"
    assert find_images(folder, "subject") == [root / "dog" / "00.jpg", root / "dog" / "01.jpg"]
    assert find_images(dreambench.subject_dir("dreambench:backpack_dog"), "subject") == [
        root / "backpack_dog" / "00.jpg"
    ]
    assert dreambench.subject_dir("photos/dog") == Path("photos/dog")
    assert len(dreambench.SUBJECT_CLASSES) == 30
    assert dreambench.subject_class("dog5") == "dog" and dreambench.subject_class(
        "dreambench:wolf_plushie"
    ) == ("stuffed animal")
    with pytest.raises(BoothError, match="unknown DreamBench subject 'nosuch'.*backpack, backpack_dog"):
        dreambench.subject_class("nosuch")


def test_evaluate_unknown_subject_lists_the_names(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "ckpts").mkdir(parents=True)
    assert main(["evaluate", str(run), "--subject-dir", "dreambench:nosuch", "-c", "dog"]) == 1
    error = error_of(capsys)
    assert "unknown DreamBench subject 'nosuch'" in error
    assert all(s in error for s in dreambench.SUBJECT_CLASSES)
    assert not (run / "eval").exists() and not (tmp_path / "eval").exists()


def test_evaluate_before_the_download_says_what_to_run(tmp_path, hf_home, capsys):
    run = tmp_path / "run"
    (run / "ckpts").mkdir(parents=True)
    assert main(["evaluate", str(run), "--subject-dir", "dreambench:dog", "-c", "dog"]) == 1
    assert "run `booth download dreambench` first" in error_of(capsys)
    assert not (run / "eval").exists() and not hf_home.exists()


def test_offline_without_the_dataset_is_actionable(github, hf_home, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "dreambench"]) == 1
    error = error_of(capsys)
    assert "HF_HUB_OFFLINE" in error and "run `booth download dreambench` online" in error
    assert str(cached(hf_home)) in error
    assert not hf_home.exists() and github.requests == []


def test_download_takes_no_file_name(capsys):
    assert main(["download", "dreambench", "dog"]) == 1
    assert "takes no file name" in error_of(capsys)


BAD = {
    "truncated": (lambda g: setattr(g, "truncate", True), ["damaged", "bytes", "booth download dreambench"]),
    "crc": (
        lambda g: setattr(g, "body", corrupt(build_zip(members()), f"{TOP}/dataset/cat/00.jpg")),
        ["damaged", f"{TOP}/dataset/cat/00.jpg fails its CRC check", "booth download dreambench"],
    ),
    "not an image": (
        lambda g: setattr(g, "body", build_zip({**members(), f"{TOP}/dataset/can/00.jpg": b"not a jpeg"})),
        ["damaged", "can/00.jpg is not a readable image"],
    ),
    "not a zip": (lambda g: setattr(g, "body", b"<html>rate limited</html>"), ["damaged", "booth download"]),
    "missing subject": (
        lambda g: setattr(g, "body", build_zip(members(drop="teapot"))),
        ["lacks the DreamBench subject(s) teapot", "BOOTH_DREAMBENCH_URL"],
    ),
    "404": (
        lambda g: setattr(g, "url", g.url.replace("main.zip", "gone.zip")),
        ["HTTP 404", "gone.zip", "retry"],
    ),
    "dotdot": (
        lambda g: setattr(g, "body", build_zip({**members(), "../evil": b"x"})),
        ["unsafe member '../evil'", "refusing"],
    ),
    "dotdot inside": (
        lambda g: setattr(g, "body", build_zip({**members(), f"{TOP}/dataset/../../evil": b"x"})),
        ["unsafe member", "evil"],
    ),
    "absolute": (
        lambda g: setattr(g, "body", build_zip({**members(), "/tmp/evil": b"x"})),
        ["unsafe member"],
    ),
    "symlink": (
        lambda g: setattr(g, "body", build_zip(members(), links=(f"{TOP}/dataset/dog/link.jpg",))),
        ["unsafe member", "link.jpg"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_downloads_leave_nothing(case, github, online, hf_home, tmp_path, monkeypatch, capsys):
    spoil, needles = BAD[case]
    spoil(github)
    monkeypatch.setenv("BOOTH_DREAMBENCH_URL", github.url)
    assert main(["download", "dreambench"]) == 1
    error = error_of(capsys)
    assert all(n in error for n in needles), error
    assert not cached(hf_home).exists()
    assert leftovers(hf_home) == []
    assert not (tmp_path / "evil").exists() and not (hf_home / "evil").exists()
    with pytest.raises(BoothError, match="not downloaded"):
        dreambench.subject_dir("dreambench:dog")


def test_unreachable_server(online, hf_home, monkeypatch, capsys):
    monkeypatch.setenv("BOOTH_DREAMBENCH_URL", "http://127.0.0.1:9/main.zip")  # nothing listens on port 9
    assert main(["download", "dreambench"]) == 1
    error = error_of(capsys)
    assert "cannot reach http://127.0.0.1:9/main.zip" in error and "BOOTH_DREAMBENCH_URL" in error
    assert leftovers(hf_home) == [] and not cached(hf_home).exists()


def test_a_killed_runs_temporaries_are_cleaned(github, online, hf_home):
    parent = hf_home / "booth"
    parent.mkdir(parents=True)
    dead = 999_999_999  # above any pid_max: no such process
    (parent / f".dreambench.zip.{dead}.abcd1234.tmp").write_bytes(b"half a zip")
    staging = parent / f".dreambench.{dead}.abcd1234.tmp"
    (staging / "dog").mkdir(parents=True)
    (staging / "dog" / "00.jpg").write_bytes(jpeg(0))
    live = parent / f".dreambench.{os.getpid()}.live1234.tmp"  # a running download's: left alone
    live.mkdir()
    # a half dataset under the final name, as a crash between the two renames of an earlier booth might leave
    (cached(hf_home) / "dog").mkdir(parents=True)
    assert dreambench.download() == cached(hf_home)
    assert leftovers(hf_home) == [live.name]
    assert dreambench.is_complete(cached(hf_home))


def test_the_cli_process_reads_the_environment(github, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "BOOTH_"))}
    env.update(HF_HOME=str(tmp_path / "hf2"), HF_HUB_OFFLINE="0", BOOTH_DREAMBENCH_URL=github.url,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))  # fmt: skip

    def booth(*argv, **extra):
        p = subprocess.run([sys.executable, "-m", "booth", *argv], env={**env, **extra}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        return p.returncode, p.stdout, p.stderr

    rc, out, err = booth("download", "dreambench")
    assert (rc, out) == (0, f"{tmp_path / 'hf2' / 'booth' / 'dreambench'}\n"), err
    assert booth("download", "dreambench", HF_HUB_OFFLINE="1")[:2] == (0, out)
    rc, _, err = booth("download", "dreambench", HF_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    assert rc == 1 and err.count("\n") == 1 and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert github.requests == ["/main.zip"]
