"""booth evaluate: a demo DreamBooth run's checkpoints rendered, scored, ranked; the paper's metrics on random
towers equal transformers' on the same images; renders are reused; bad input is one clear line."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import error_of, open_in_browser, save_screenshot

import booth.evaluate
from booth import vision
from booth.cli import main
from booth.evaluate import Candidate, Scored, rank
from booth.shapes import outlined_star_subject

ARGS = ["-c", "star", "--images-per-prompt", "2", "--steps", "6", "--sampler", "ddim"]


TRAIN = ["dreambooth", "-m", "demo", "-c", "star", "--iterations", "600", "--learning-rate", "1e-4", "-l", "1",
         "--class-img-count", "20", "--ddim-steps", "20", "--seed", "0", "--no-random-resize",
         "--save-precision", "fp32", "--eval-every", "200"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo DreamBooth run of the outlined star (the recipe of tests/test_demo.py), scored every 200 steps
    (checkpoints then too); what --eval-every wrote, read before `booth evaluate` writes into RUN/eval."""
    tmp = tmp_path_factory.mktemp("evaluate")
    outlined_star_subject(tmp / "subject")
    code = main(
        [*TRAIN, "-i", str(tmp / "subject"), "-o", str(tmp / "out"), "--class-dir", str(tmp / "class")]
    )
    assert code == 0
    folder = tmp / "out" / "run0"
    during = {"doc": json.loads((folder / "eval" / "metrics.json").read_text()),
              "report": (folder / "eval" / "report.html").read_text(), "best": (folder / "best.txt").read_text(),
              "log": [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]}  # fmt: skip
    return folder, tmp / "subject", during


def train_args(folder: Path, subject: Path, out: Path) -> list[str]:
    """Another run of TRAIN on the fixture's subject and class images, into `out`."""
    return [*TRAIN, "-i", str(subject), "-o", str(out), "--class-dir", str(folder.parent.parent / "class")]


@pytest.fixture(scope="module")
def run(trained):
    return trained[:2]


@pytest.fixture(scope="module")
def demo_eval(run):
    folder, subject = run
    assert main(["evaluate", str(folder), "--subject-dir", str(subject), "--metric", "demo", *ARGS]) == 0
    return folder / "eval"


def test_the_demo_scorer_names_a_trained_checkpoint(demo_eval):
    doc = json.loads((demo_eval / "metrics.json").read_text())
    names = [c["name"] for c in doc["checkpoints"]]
    assert names == ["base", "step-000200", "step-000400", "step-000600"]
    assert [c["step"] for c in doc["checkpoints"]] == [0, 200, 400, 600]
    by_name = {c["name"]: c for c in doc["checkpoints"]}
    assert doc["best"] != "base"
    assert by_name[doc["best"]]["scores"]["subject"] > by_name["base"]["scores"]["subject"] + 0.2
    assert all(
        0 <= c["scores"][k] <= 1
        for c in doc["checkpoints"]
        for k in ("subject", "background", "pres", "class")
    )
    assert doc["metric"] == "demo" and doc["rule"].startswith(
        "closest to the ideal on subject and background"
    )
    assert all(c["dino"] is None for c in doc["checkpoints"]), "no paper metric under the demo scorer"
    first = doc["checkpoints"][1]["per_prompt"][0]
    assert (
        first["prompt"] == "a sks star on a red background" and first["text"] == "a star on a red background"
    )
    assert all(Path(p).is_file() for p in first["images"]) and len(first["images"]) == 2


def test_the_csv_agrees_with_the_json(demo_eval):
    doc = json.loads((demo_eval / "metrics.json").read_text())
    rows = list(csv.DictReader((demo_eval / "metrics.csv").open()))
    assert [r["name"] for r in rows] == [c["name"] for c in doc["checkpoints"]]
    for row, c in zip(rows, doc["checkpoints"]):
        assert int(row["step"]) == c["step"]
        for key in ("subject", "background", "pres", "class"):
            assert float(row[key]) == pytest.approx(c["scores"][key], abs=1e-6)


def test_a_second_call_only_scores(run, demo_eval, monkeypatch, capsys):
    folder, subject = run
    before = (demo_eval / "metrics.json").read_bytes()
    monkeypatch.setattr(booth.evaluate, "_render", lambda *a: pytest.fail("rendered again"))
    assert main(["evaluate", str(folder), "--subject-dir", str(subject), "--metric", "demo", *ARGS]) == 0
    assert (demo_eval / "metrics.json").read_bytes() == before
    out = capsys.readouterr()
    assert "<- best" in out.out and "booth: best: " in out.err


def test_the_paper_metrics_equal_transformers_on_the_same_images(run, tmp_path):
    """Random towers in Hugging Face format as --dino-model and --clip-model: the JSON's DINO, CLIP-I, CLIP-T and
    PRES equal what transformers' models give on booth's preprocessing of the same renders."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                              patch_size=16, image_size=224), add_pooling_layer=False).eval()  # fmt: skip
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                           patch_size=32, image_size=224), projection_dim=32)).eval()  # fmt: skip
    dino.save_pretrained(tmp_path / "dino")
    clip.save_pretrained(tmp_path / "clip")
    folder, subject = run
    out = tmp_path / "eval"
    assert main(["evaluate", str(folder / "ckpts" / "step-000600.safetensors"), "--subject-dir", str(subject),
                 "--dino-model", str(tmp_path / "dino"), "--clip-model", str(tmp_path / "clip"), "-o", str(out), "--metric", "paper",
                 "--prompts", str(_prompts(tmp_path)), *ARGS]) == 0  # fmt: skip
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["models"] == {"dino": str(tmp_path / "dino"), "clip": str(tmp_path / "clip")}
    reals = [_image(p) for p in sorted(subject.glob("*.png"))]
    entry = doc["checkpoints"][1]
    images = [_image(p) for row in entry["per_prompt"] for p in row["images"]]
    klass = [_image(p) for p in sorted((out / "renders" / entry["name"]).glob("class-*.png"))]
    with torch.no_grad():
        d = lambda ims: dino(pixel_values=vision.preprocess(ims, vision.DINO_PREPROCESS)).last_hidden_state[
            :, 0
        ]  # noqa: E731
        c = lambda ims: clip.get_image_features(pixel_values=vision.preprocess(ims, vision.CLIP_PREPROCESS))  # noqa: E731
        feature = lambda out: out if torch.is_tensor(out) else out.pooler_output  # noqa: E731
        cos = lambda a, b: torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1).mean().item()  # noqa: E731
        assert entry["dino"] == pytest.approx(cos(d(images), d(reals)), abs=1e-4)
        assert entry["clip_i"] == pytest.approx(cos(feature(c(images)), feature(c(reals))), abs=1e-4)
        assert entry["pres"] == pytest.approx(cos(d(klass), d(reals)), abs=1e-4)
        texts = [row["text"] for row in entry["per_prompt"]]
        ids = vision.clip_ids(texts)
        t = feature(clip.get_text_features(input_ids=ids))
        per = [cos(feature(c([_image(p) for p in row["images"]])), t[i : i + 1]) for i, row in
               enumerate(entry["per_prompt"])]  # fmt: skip
        assert entry["clip_t"] == pytest.approx(sum(per) / len(per), abs=1e-4)
    assert texts == ["a star in the snow", "a red star"]


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a {} in the snow\n\na red {}\n")
    return path


def _image(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_the_ranking_rule():
    def scored(step, fidelity, prompt):
        return Scored(Candidate(f"s{step}", None, step), {"f": fidelity, "p": prompt})

    floors = {"f": 0.05, "p": 0.05}
    # base: prompt-faithful, subject-blind; 600: the subject, prompts forgotten; 400: the balance
    entries = [scored(0, 0.2, 0.9), scored(200, 0.5, 0.85), scored(400, 0.7, 0.8), scored(600, 0.8, 0.3)]
    assert rank(entries, "f", "p", floors)[0] == "s400"
    tied = [scored(0, 0.2, 0.9), scored(200, 0.8, 0.8), scored(400, 0.8, 0.8), scored(600, 0.9, 0.2)]
    assert rank(tied, "f", "p", floors)[0] == "s200", "a tie goes to the earlier step"
    # differences under the floor are not magnified into a verdict
    flat = [scored(0, 0.50, 0.9), scored(200, 0.51, 0.5)]
    assert rank(flat, "f", "p", floors)[0] == "s0"


def test_bad_input(run, tmp_path, capsys):
    folder, subject = run
    (tmp_path / "empty").mkdir()
    cases = [
        (["--subject-dir", str(tmp_path / "empty")], "subject image folder .*empty is empty"),
        (
            ["--subject-dir", str(sorted(subject.glob("*.png"))[0])],
            "subject images must be a folder of images",
        ),
        (["--subject-dir", str(subject), str(tmp_path / "empty")], "has no checkpoints in it"),
        (["--subject-dir", str(subject), "--images-per-prompt", "0"], "--images-per-prompt must be from 1"),
        (["--subject-dir", str(subject), "--prompts", str(tmp_path / "none.txt")], "cannot read .*none.txt"),
    ]
    for extra, message in cases:
        target = [] if str(tmp_path / "empty") in extra[2:] else [str(folder)]
        code = main(
            ["evaluate", *target, *extra, "-c", "star", "--metric", "demo", "-o", str(tmp_path / "o")]
        )
        assert code != 0
        error = error_of(capsys)
        assert re.search(message, error), error
    assert not (tmp_path / "o").exists(), "nothing is written for bad input"


def test_a_missing_metric_model_offline_says_what_to_download(run, tmp_path, capsys):
    folder, subject = run
    code = main(["evaluate", str(folder), "--subject-dir", str(subject), "-o", str(tmp_path / "o"), "--metric",
                 "paper", *ARGS])  # fmt: skip
    assert code != 0
    assert "booth download facebook/dino-vits16" in error_of(capsys)
    # --eval-every with the paper's metrics: the towers are looked for before the run folder is made
    code = main([*TRAIN, "-i", str(subject), "-o", str(tmp_path / "run"), "--eval-metric", "paper"])
    assert code != 0
    assert "booth download facebook/dino-vits16" in error_of(capsys)
    assert not (tmp_path / "run").exists()


def test_a_class_other_than_the_runs_is_a_warning(run, tmp_path, capsys):
    folder, subject = run
    (tmp_path / "one.txt").write_text("a {} on a red background\n")
    args = ["evaluate", str(folder / "ckpts" / "step-000200.safetensors"), "--subject-dir", str(subject),
            "--metric", "demo", "-o", str(tmp_path / "o"), "--prompts", str(tmp_path / "one.txt"), "-c", "circle",
            "--images-per-prompt", "1", "--steps", "4"]  # fmt: skip
    assert main(args) == 0
    assert "the run was trained with the class prompt 'a star', not on 'circle'" in capsys.readouterr().err


def test_eval_every_scores_the_training_and_names_the_best(trained):
    folder, _, during = trained
    doc, log = during["doc"], during["log"]
    scored = {r["step"]: r for r in log if "eval_subject" in r}
    assert sorted(scored) == [0, 200, 400, 600], "the base before the first step, then every 200 steps"
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 601)), "one line per step, as before"
    assert [c["name"] for c in doc["checkpoints"]] == ["base", "step-000200", "step-000400", "step-000600"]
    for c in doc["checkpoints"]:
        for key in ("subject", "background", "pres", "class", "drift"):
            value = c["drift"] if key == "drift" else c["scores"][key]
            assert value == pytest.approx(scored[c["step"]][f"eval_{key}"]), (c["name"], key)
    assert doc["checkpoints"][0]["drift"] == 1.0, "the base is its own reference"
    assert doc["best"] != "base"
    best = Path(during["best"].strip())
    assert best == folder / "ckpts" / f"{doc['best']}.safetensors" and best.is_file()
    report = during["report"]
    assert all(c["name"] in report for c in doc["checkpoints"])
    assert f'<tr class="checkpoint best" data-name="{doc["best"]}"' in report


def test_without_the_prior_the_class_drifts_and_the_log_says_so(trained, tmp_path, capsys):
    """-l 0: the class prompt's images take on the subject's colours, and the monitor warns; with -l 1 (the
    fixture's run) they stay closer to the base's."""
    folder, subject, during = trained
    args = train_args(folder, subject, tmp_path)
    args[args.index("-l") + 1], args[args.index("--iterations") + 1] = "0", "200"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "booth: warning: step 200: the class is drifting: raise -l or lower the learning rate" in err
    doc = json.loads((tmp_path / "run0" / "eval" / "metrics.json").read_text())
    assert any(w.startswith("step-000200: the class is drifting") for w in doc["warnings"])
    assert "the class is drifting" in (tmp_path / "run0" / "eval" / "report.html").read_text()
    with_prior = {c["step"]: c["drift"] for c in during["doc"]["checkpoints"]}
    assert doc["checkpoints"][1]["drift"] < with_prior[200] - 0.1


def test_the_demo_report_in_a_browser_agrees_with_the_json(demo_eval):
    """The report of a real run, opened from disk in headless Chromium: no console error, a row, a plot per
    metric, the drift curve, every render loaded, the best the JSON names marked. Kept as a screenshot."""
    doc = json.loads((demo_eval / "metrics.json").read_text())
    with open_in_browser(demo_eval / "report.html") as (driver, errors):
        from selenium.webdriver.common.by import By

        assert errors == []
        rows = driver.find_elements(By.CSS_SELECTOR, "table#metrics tr.checkpoint")
        assert [r.get_attribute("data-name") for r in rows] == [c["name"] for c in doc["checkpoints"]]
        assert all(r.is_displayed() for r in rows)
        best = driver.find_elements(By.CSS_SELECTOR, "table#metrics tr.best")
        assert [r.get_attribute("data-name") for r in best] == [doc["best"]]
        plots = driver.find_elements(By.CSS_SELECTOR, "svg.plot")
        assert [p.get_attribute("data-metric") for p in plots] == doc["keys"]
        assert all(p.size["width"] > 100 for p in [*plots, driver.find_element(By.CSS_SELECTOR, "svg#drift")])
        widths = driver.execute_script(
            "return [...document.querySelectorAll('#grid img')].map(i => i.naturalWidth)"
        )
        cells = len(doc["checkpoints"]) * (len(doc["checkpoints"][0]["per_prompt"]) + 1)
        assert len(widths) == cells and all(w > 0 for w in widths)
        save_screenshot(driver, "demo-report.png")


def test_eval_every_carries_on_across_a_resume(trained, tmp_path):
    """Scored at 0 and 50, resumed to 100 with -r: the base is not scored again, the log and the verdict cover
    the whole run, and the best is a checkpoint on disk."""
    folder, subject, _ = trained
    args = train_args(folder, subject, tmp_path)
    args[args.index("--iterations") + 1], args[args.index("--eval-every") + 1] = "50", "50"
    assert main(args) == 0
    run = tmp_path / "run0"
    base = (run / "eval" / "renders" / "base" / "class-0.png").stat().st_mtime_ns
    assert main(["dreambooth", "-r", str(run), "--iterations", "100"]) == 0
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_subject" in r] == [0, 50, 100]
    assert (run / "eval" / "renders" / "base" / "class-0.png").stat().st_mtime_ns == base
    doc = json.loads((run / "eval" / "metrics.json").read_text())
    assert [c["name"] for c in doc["checkpoints"]] == ["base", "step-000050", "step-000100"]
    assert all(c["drift"] is not None for c in doc["checkpoints"])
    assert Path((run / "best.txt").read_text().strip()).name in {"demo", f"{doc['best']}.safetensors"}


def test_a_prompt_file_may_hold_other_braces():
    from booth.evaluate import prompt_set

    assert prompt_set("sks dog", ["a {} {style}", "plain {0} }"], "paper", False) == [
        "a sks dog {style}",
        "plain {0} }",
    ]
    assert prompt_set("sks dog", None, "paper", True)[15] == "a sks dog wearing a red hat"
    assert prompt_set("sks star", None, "demo", False)[0] == "a sks star on a red background"
