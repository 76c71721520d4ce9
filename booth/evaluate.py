"""`booth evaluate`: render every checkpoint of a DreamBooth run (the base model too, as step 0) over a prompt
set, score the images the way the DreamBooth paper does, rank the checkpoints and name the best.

Two scorers:
- `paper`: DINO and CLIP-I (generated against the real subject photos), CLIP-T (each image against its prompt
  with the identifier removed) and PRES (the plain class prompt's images against the real subject, DINO), on
  booth's own towers (booth.vision, booth.metrics);
- `demo`: the shapes judge on the demo model (booth.shapes): the share of each image's foreground in the
  subject's colours, whether the background is the one asked for, and the class prompt's images.

The ranking: each checkpoint's subject score and prompt score are scaled to [0, 1] over the checkpoints compared
(a range narrower than the scorer's noise floor counts as that floor, so noise is not magnified), and the best
is the one closest to the ideal corner (1, 1); a tie goes to the earlier step, which has drifted less.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import metrics
from .atomic import write_text
from .errors import BoothError
from .formats import natural_key, safetensors_metadata
from .images import load_image, save_png

LIVE_CLASSES = {"dog", "cat"}  # the benchmark's live subjects; every other class is an object
SHARED = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
          "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
          "with a blue house in the background", "on top of a purple rug in a forest", "a red {}", "a purple {}",
          "a shiny {}", "a wet {}", "a cube shaped {}"]  # fmt: skip
OBJECTS = ["with a wheat field in the background", "with a tree and autumn leaves in the background",
           "with the Eiffel Tower in the background", "floating on top of water", "floating in an ocean of milk",
           "on top of green grass with sunflowers around it", "on top of a mirror",
           "on top of the sidewalk in a crowded street", "on top of a dirt road", "on top of a white rug"]  # fmt: skip
LIVE = ["wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf", "wearing a black top hat and a monocle",
        "in a chef outfit", "in a firefighter outfit", "in a police outfit", "wearing pink glasses",
        "wearing a yellow shirt", "in a purple wizard outfit"]  # fmt: skip


def dreambench_prompts(subject: str, live: bool) -> list[str]:
    """The benchmark's 25 prompts for `subject` ("sks dog"): "a {} <phrase>", or the quoted form as given."""
    phrases = SHARED + (LIVE if live else OBJECTS)
    return [p.format(subject) if "{}" in p else f"a {subject} {p}" for p in phrases]


def prompt_set(subject: str, custom: Sequence[str] | None, kind: str, live: bool) -> list[str]:
    """The prompts for `subject` ("sks dog"): a file's (`{}` standing for the subject), the demo's own (`kind`
    "demo"), or the benchmark's."""
    if custom is not None:
        return [p.replace("{}", subject) for p in custom]  # not str.format: a prompt may hold other braces
    return demo_prompts(subject) if kind == "demo" else dreambench_prompts(subject, live)


def demo_prompts(subject: str) -> list[str]:
    """The demo's own: the subject on each background colour."""
    from .shapes import COLORS

    return [f"a {subject} on a {c} background" for c in COLORS]


@dataclass(frozen=True)
class Candidate:
    """One model to score: `row` is what booth.render renders (a model, or a LoRA over its base)."""

    name: str
    row: object  # booth.render.Row
    step: int


@dataclass
class Scored:
    candidate: Candidate
    scores: dict[str, float]
    per_prompt: list[dict] = field(default_factory=list)
    class_images: list[Path] = field(default_factory=list)
    drift: float | None = None  # its class images' similarity to the base's at the same seeds


def candidates(targets: Sequence[str], base: str | None) -> list[Candidate]:
    """The base model (step 0), then each checkpoint the targets name (a run folder, a checkpoint folder, files),
    in step order."""
    from .render import Row, rows

    found: list = []
    for target in targets:
        path = Path(target)
        folder = path / "ckpts" if (path / "ckpts").is_dir() else path
        if folder.is_dir() and not any(folder.iterdir()):
            raise BoothError(f"{folder} has no checkpoints in it")
        listed = rows(str(folder), None)  # -m names the base only of LoRA files (as for txt2img)
        found += rows(str(folder), base) if base and any(r.lora for r in listed) else listed
    if not found:
        raise BoothError("no checkpoints to evaluate")
    if base is None:
        base = str(found[0].model) if found[0].lora else _recorded(found[0].path, "booth.base_model")
    if not base:
        raise BoothError("these checkpoints do not record their base model; give it with -m")
    out = [Candidate("base", Row(rows(base, None)[0].model), 0)]
    for row in sorted(dict.fromkeys(found), key=lambda r: natural_key(r.path)):
        out.append(Candidate(row.path.stem, row, _step(row.path)))
    return out


def _recorded(path: Path, key: str) -> str | None:
    return safetensors_metadata(path).get(key) if path.suffix == ".safetensors" else None


def _step(path: Path) -> int:
    recorded = _recorded(path, "booth.step")
    if recorded and recorded.isdigit():
        return int(recorded)
    m = re.search(r"(\d+)(?!.*\d)", path.stem)
    return int(m.group(1)) if m else 0


def identity(cands: Sequence[Candidate], cls: str, token: str | None) -> tuple[str, str]:
    """(the identifier, the class): the class as given, the identifier from the checkpoints' instance prompt
    ("a sks dog" -> "sks") unless given. A class other than the one the run recorded is a warning."""
    recorded_instance = recorded_class = None
    for c in cands[1:]:
        recorded_instance = recorded_instance or _recorded(c.row.path, "booth.instance_prompt")
        recorded_class = recorded_class or _recorded(c.row.path, "booth.class_prompt")
    if recorded_class and cls not in recorded_class.split():
        print(f"booth: warning: the run was trained with the class prompt {recorded_class!r}, not on {cls!r}",
              file=sys.stderr)  # fmt: skip
    if token is None and recorded_instance:
        extra = [w for w in recorded_instance.split() if w not in (recorded_class or "").split() and w != "a"]
        token = extra[0] if extra else None
    return token or "sks", cls


# ----------------------------------------------------------------------------- scorers


class PaperScorer:
    """DINO, CLIP-I, CLIP-T and PRES; each tower loaded once per call, images embedded in batches."""

    name, fidelity, prompt = "paper", "dino", "clip_t"
    keys = ("dino", "clip_i", "clip_t", "pres")
    floors = {"dino": 0.05, "clip_t": 0.01}
    # DINO of two photos of different dogs is about this: a class image further from the base's image at the same
    # seed than that no longer shows what the base drew
    drift_threshold, drift_measure = 0.5, "DINO similarity to the base model's class images at the same seeds"

    def __init__(self, dino: str, clip: str, device: torch.device, batch: int = 16):
        from .hub import find_tower
        from .vision import load_clip, load_dino

        self.models = {"dino": dino, "clip": clip}
        self.dino = load_dino(find_tower(dino, "--dino-model")).to(device)
        self.clip = load_clip(find_tower(clip, "--clip-model")).to(device)
        self.device, self.batch = device, batch

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        from .vision import CLIP_PREPROCESS, DINO_PREPROCESS, preprocess

        out = {"dino": [], "clip": []}
        for i in range(0, len(images), self.batch):
            chunk = images[i : i + self.batch]
            out["dino"].append(self.dino.features(preprocess(chunk, DINO_PREPROCESS).to(self.device)).cpu())
            out["clip"].append(
                self.clip.image_features(preprocess(chunk, CLIP_PREPROCESS).to(self.device)).cpu()
            )
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        from .vision import clip_ids

        return self.clip.text_features(clip_ids(texts).to(self.device)).cpu()

    def reals(self, images: Sequence[Image.Image]):
        return self.embed(images)

    def score_prompt(self, images, text: str, reals) -> dict[str, float]:
        e = self.embed(images)
        return {"dino": metrics.subject_similarity(e["dino"], reals["dino"]),
                "clip_i": metrics.subject_similarity(e["clip"], reals["clip"]),
                "clip_t": metrics.prompt_similarity(e["clip"], self.texts([text]))}  # fmt: skip

    def score_class(self, images, reals) -> dict[str, float]:
        return {"pres": metrics.subject_similarity(self.embed(images)["dino"], reals["dino"])}

    def drift(self, images, base_images, reals) -> float:
        return metrics.paired_cosine(self.embed(images)["dino"], self.embed(base_images)["dino"])


class DemoScorer:
    """The demo model's judge: `subject` (the share of each image's foreground in the subject's colours, read
    from the real images), `background` (the share of images on the background colour asked for), and on the class
    prompt's images `pres` (their subject share: lower is better) and `class` (the share judged the class)."""

    name, fidelity, prompt = "demo", "subject", "background"
    keys = ("subject", "background", "pres", "class")
    floors = {"subject": 0.1, "background": 0.1}
    # the demo model redraws the whole scene when its weights move, so comparing shapes pairwise says little;
    # what drift does to it is paint the class in the subject's colours
    drift_threshold = 0.5
    drift_measure = (
        "1 - the change in the class images' share of subject colours from the base's at the same seeds"
    )
    models: dict = {}

    def __init__(self, cls: str):
        self.cls = cls

    def reals(self, images: Sequence[Image.Image]) -> set[str]:
        from .shapes import COLORS, foreground, nearest_color

        counts = dict.fromkeys(COLORS, 0)
        for image in images:
            px = np.asarray(image.convert("RGB"), dtype=np.float32)
            far, _ = foreground(px)
            for name in map(nearest_color, px[far][::7]):  # a sample of the foreground's pixels is plenty
                counts[name] += 1
        total = max(sum(counts.values()), 1)
        return {name for name, n in counts.items() if n >= 0.1 * total}

    def _share(self, image: Image.Image, palette: set[str]) -> float:
        from .shapes import COLORS, foreground

        px = np.asarray(image.convert("RGB"), dtype=np.float32)
        far, _ = foreground(px)
        ours = np.zeros_like(far)
        for name in palette:
            ours |= np.linalg.norm(px - np.array(COLORS[name]), axis=-1) < 90
        return float((ours & far).sum() / max(far.sum(), 1))

    def score_prompt(self, images, text: str, palette) -> dict[str, float]:
        from .shapes import judge

        wanted = re.search(r"on a (\w+) background", text)
        on = [judge(i).background == wanted.group(1) for i in images] if wanted else []
        return {"subject": float(np.mean([self._share(i, palette) for i in images])),
                "background": float(np.mean(on)) if on else math.nan}  # fmt: skip

    def score_class(self, images, palette) -> dict[str, float]:
        from .shapes import judge

        return {"pres": float(np.mean([self._share(i, palette) for i in images])),
                "class": float(np.mean([judge(i).shape == self.cls for i in images]))}  # fmt: skip

    def drift(self, images, base_images, palette) -> float:
        changes = [
            abs(self._share(a, palette) - self._share(b, palette)) for a, b in zip(images, base_images)
        ]
        return 1 - float(np.mean(changes))


# ----------------------------------------------------------------------------- ranking


def rank(scored: Sequence[Scored], fidelity: str, prompt: str, floors: dict[str, float]) -> tuple[str, str]:
    """(the best candidate's name, the rule in words)."""

    def scaled(key: str) -> list[float]:
        values = [s.scores[key] for s in scored]
        lo, hi = min(values), max(values)
        return [
            (v - lo) / max(hi - lo, floors[key]) + (1 - (hi - lo) / max(hi - lo, floors[key])) for v in values
        ]

    f, p = scaled(fidelity), scaled(prompt)
    distance = [math.hypot(1 - a, 1 - b) for a, b in zip(f, p)]
    best = min(range(len(scored)), key=lambda i: (round(distance[i], 9), scored[i].candidate.step))
    rule = (f"closest to the ideal on {fidelity} and {prompt}, each scaled to [0, 1] over the checkpoints compared "
            f"(a range under {floors[fidelity]:g} and {floors[prompt]:g} counts as that); ties go to the earlier step")  # fmt: skip
    return scored[best].candidate.name, rule


# ----------------------------------------------------------------------------- rendering, with reuse


@dataclass(frozen=True)
class Plan:
    """What every candidate renders: the prompts (subject), the class prompt, the seeds and the sampling."""

    prompts: list[str]
    class_prompt: str
    seeds: list[int]
    settings: object  # booth.options.Settings

    def record(self, c: Candidate) -> dict:
        from dataclasses import asdict

        files = [p for p in (c.row.model, c.row.lora) if p is not None]
        return {"files": [[str(p), *_stamp(p)] for p in files], "prompts": self.prompts,
                "class_prompt": self.class_prompt, "seeds": self.seeds, "settings": asdict(self.settings)}  # fmt: skip


def _stamp(path: Path) -> list[int]:
    st = path.stat() if path.is_file() else (path / "model_index.json").stat()
    return [st.st_size, st.st_mtime_ns]


def renders(c: Candidate, plan: Plan, out: Path, device, dtype) -> tuple[list[list[Path]], list[Path]]:
    """The candidate's images (per prompt, then the class prompt's) under out/NAME/, rendered unless the same
    plan rendered them before (render.json records it)."""
    folder = out / c.name
    paths = [[folder / f"{p:02d}-{i}.png" for i in range(len(plan.seeds))] for p in range(len(plan.prompts))]
    klass = [folder / f"class-{i}.png" for i in range(len(plan.seeds))]
    record, manifest = plan.record(c), folder / "render.json"
    try:
        done = json.loads(manifest.read_text()) == record and all(p.is_file() for p in sum(paths, klass))
    except (OSError, ValueError):
        done = False
    if not done:
        _render(c, plan, paths, klass, device, dtype)
        write_text(manifest, json.dumps(record, indent=1))
    return paths, klass


def _render(c: Candidate, plan: Plan, paths, klass, device, dtype) -> None:
    from .lora import read_lora
    from .pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained(str(c.row.model), device=device, dtype=dtype)
    if c.row.lora:
        sd.set_loras([(read_lora(c.row.lora), 1.0)])
    paths[0][0].parent.mkdir(parents=True, exist_ok=True)
    jobs = [*zip(plan.prompts, paths), (plan.class_prompt, klass)]
    for prompt, files in tqdm(jobs, desc=f"rendering {c.name}", unit="prompt", file=sys.stderr, leave=False):
        for image, path in zip(sd.txt2img(prompt, seeds=plan.seeds, settings=plan.settings), files):
            save_png(image, path)


# ----------------------------------------------------------------------------- the whole evaluation


def evaluate(cands: Sequence[Candidate], scorer, plan: Plan, texts: Sequence[str], reals: Sequence[Path],
             out: Path, device, dtype, recipe: str | None = None) -> dict:  # fmt: skip
    """Render, score and rank; write out/metrics.json, out/metrics.csv and out/report.html; return the JSON
    document. Every path it records is absolute, so the report and other tools find the images from anywhere."""
    out, reals = Path(out).absolute(), [Path(p).absolute() for p in reals]
    real = scorer.reals([load_image(p) for p in reals])
    scored = []
    for c in cands:
        per_prompt, klass = renders(c, plan, out / "renders", device, dtype)
        scored.append(score(c, scorer, plan, texts, per_prompt, klass, real))
    base = scored[0] if scored[0].candidate.name == "base" else None
    for s in scored:
        s.drift = drift(scorer, s.class_images, base.class_images, real) if base else None
    return conclude(scored, scorer, reals, out, recipe)


def score(c: Candidate, scorer, plan: Plan, texts: Sequence[str], per_prompt: Sequence[Sequence[Path]],
          klass: Sequence[Path], real) -> Scored:  # fmt: skip
    """One candidate's scores: per prompt, their means, and the class prompt's."""
    rows = []
    for prompt, text, files in zip(plan.prompts, texts, per_prompt):
        s = scorer.score_prompt([load_image(p) for p in files], text, real)
        rows.append({"prompt": prompt, "text": text, "images": [str(p) for p in files], **s})
    means = {k: _mean([r[k] for r in rows]) for k in rows[0] if k in scorer.keys}
    means.update(scorer.score_class([load_image(p) for p in klass], real))
    return Scored(c, means, rows, list(klass))


def _mean(values: Sequence[float]) -> float:
    """The mean of the values that were measured (NaN: a prompt that does not ask for what a key measures)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def drift(scorer, klass: Sequence[Path], base: Sequence[Path], real) -> float:
    """How alike the class prompt's images are to the base model's at the same seeds (1: the same)."""
    return scorer.drift([load_image(p) for p in klass], [load_image(p) for p in base], real)


def drift_warnings(scored: Sequence[Scored], scorer) -> list[str]:
    return [drift_warning(s.candidate.name, s.drift, scorer) for s in scored
            if s.drift is not None and s.drift < scorer.drift_threshold]  # fmt: skip


def drift_warning(name: str, value: float, scorer) -> str:
    return (f"{name}: the class is drifting: raise -l or lower the learning rate ({scorer.drift_measure} is "
            f"{value:.2f}, under {scorer.drift_threshold:g})")  # fmt: skip


def conclude(scored: Sequence[Scored], scorer, reals: Sequence[Path], out: Path, recipe: str | None) -> dict:
    """Rank; write out/metrics.json, out/metrics.csv and out/report.html; return the JSON document."""
    from .report import write_report

    best, rule = rank(scored, scorer.fidelity, scorer.prompt, scorer.floors)
    doc = _document(scored, scorer, reals, best, rule)
    write_text(out / "metrics.json", json.dumps(doc, indent=1, allow_nan=False))
    write_text(out / "metrics.csv", _csv(scored, scorer))
    write_report(doc, out / "report.html", recipe)
    return doc


def _document(scored: Sequence[Scored], scorer, reals, best: str, rule: str) -> dict:
    def entry(s: Scored) -> dict:
        paper = {k: s.scores.get(k) for k in PaperScorer.keys}  # null under another scorer
        return {"name": s.candidate.name, "path": str(s.candidate.row.path), "step": s.candidate.step, **paper,
                "scores": _finite(s.scores), "drift": s.drift, "class_images": [str(p) for p in s.class_images],
                "per_prompt": [_finite(r) for r in s.per_prompt]}  # fmt: skip

    return {"reals": [str(p) for p in reals], "metric": scorer.name, "checkpoints": [_finite(entry(s)) for s in scored],
            "best": best, "rule": rule, "models": scorer.models, "keys": list(scorer.keys),
            "drift_threshold": scorer.drift_threshold, "drift_measure": scorer.drift_measure,
            "warnings": drift_warnings(scored, scorer)}  # fmt: skip


def _finite(d: dict) -> dict:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}


def _csv(scored: Sequence[Scored], scorer) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "path", "step", *scorer.keys])
    for s in scored:
        w.writerow([s.candidate.name, s.candidate.row.path, s.candidate.step,
                    *(f"{s.scores[k]:.6f}" for k in scorer.keys)])  # fmt: skip
    return buf.getvalue()


def table(doc: dict, keys: Sequence[str]) -> str:
    """The scores and the drift as a text table, the best marked."""

    def cell(value) -> str:
        return f"{value:>11.3f}" if value is not None else f"{'-':>11}"

    lines = [f"{'checkpoint':<24}{'step':>7}" + "".join(f"{k:>11}" for k in [*keys, "drift"])]
    for c in doc["checkpoints"]:
        values = "".join(cell(c["scores"].get(k)) for k in keys) + cell(c.get("drift"))
        mark = "  <- best" if c["name"] == doc["best"] else ""
        lines.append(f"{c['name']:<24}{c['step']:>7}{values}{mark}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- during training: --eval-every


def default_metric(model: Path) -> str:
    """The scorer for a base model: the shapes judge for booth's demo model, the paper's metrics for the rest."""
    from .formats import DEMO_FILE

    return "demo" if model.is_file() and model.resolve() == DEMO_FILE.resolve() else "paper"


def training_prompts(subject: str, cls: str, metric: str) -> list[str]:
    """The small prompt set --eval-every scores: the demo's own, or every fifth dreambench prompt (five)."""
    if metric == "demo":
        return demo_prompts(subject)
    return dreambench_prompts(subject, cls in LIVE_CLASSES)[::5]


class Monitor:
    """--eval-every: the weights being trained, rendered over a small prompt set at fixed seeds and scored as
    `booth evaluate` scores checkpoints. The renders and each step's scores go to RUN/eval/renders/NAME/; the means
    go into metrics.jsonl. The base model is scored before the first step, which the drift is measured against."""

    def __init__(self, render, scorer, plan: Plan, texts: Sequence[str], reals: Sequence[Path], out: Path):
        self.render, self.scorer, self.plan, self.texts = render, scorer, plan, texts
        self.out, self.reals = Path(out).absolute(), [Path(p).absolute() for p in reals]
        self.real = scorer.reals([load_image(p) for p in reals])

    def score(self, step: int) -> dict[str, float]:
        """Render and score the weights at `step` (0: the base); the means, prefixed "eval_", for the log."""
        name = "base" if step == 0 else f"step-{step:06d}"
        folder = self.out / "renders" / name
        paths = [
            [folder / f"{p:02d}-{i}.png" for i in range(len(self.plan.seeds))]
            for p in range(len(self.plan.prompts))
        ]
        klass = [folder / f"class-{i}.png" for i in range(len(self.plan.seeds))]
        folder.mkdir(parents=True, exist_ok=True)
        for prompt, files in [*zip(self.plan.prompts, paths), (self.plan.class_prompt, klass)]:
            for image, path in zip(self.render(prompt, self.plan.seeds, self.plan.settings), files):
                save_png(image, path)
        s = score(Candidate(name, None, step), self.scorer, self.plan, self.texts, paths, klass, self.real)
        base = [self.out / "renders" / "base" / p.name for p in klass]
        s.drift = drift(self.scorer, klass, base, self.real) if all(p.is_file() for p in base) else None
        if s.drift is not None and s.drift < self.scorer.drift_threshold:
            print(f"booth: warning: {drift_warning(f'step {step}', s.drift, self.scorer)}", file=sys.stderr)
        record = {"step": step, "scores": _finite(s.scores), "drift": s.drift,
                  "per_prompt": [_finite(r) for r in s.per_prompt]}  # fmt: skip
        write_text(folder / "scores.json", json.dumps(record, indent=1, allow_nan=False))
        return {
            f"eval_{k}": v
            for k, v in {**s.scores, "drift": s.drift}.items()
            if v is not None and math.isfinite(v)
        }

    def conclude(
        self, run: Path, base: Path, checkpoints: dict[int, Path], recipe: str | None
    ) -> dict | None:
        """Rank what was scored (the base and each step with its checkpoint); write the report and RUN/best.txt."""
        scored = []
        for step, path in [(0, base), *sorted(checkpoints.items())]:
            name = "base" if step == 0 else f"step-{step:06d}"
            try:
                record = json.loads((self.out / "renders" / name / "scores.json").read_text())
            except (OSError, ValueError):
                continue  # not scored (--eval-every added on resume, or a step that was not an eval step)
            klass = [self.out / "renders" / name / f"class-{i}.png" for i in range(len(self.plan.seeds))]
            scores = {k: math.nan if v is None else v for k, v in record["scores"].items()}
            scored.append(
                Scored(
                    Candidate(name, _RowOf(path), step), scores, record["per_prompt"], klass, record["drift"]
                )
            )
        if not scored:
            return None
        doc = conclude(scored, self.scorer, self.reals, self.out, recipe)
        best = next(s for s in scored if s.candidate.name == doc["best"])
        write_text(run / "best.txt", f"{best.candidate.row.path}\n")
        return doc


@dataclass(frozen=True)
class _RowOf:
    path: Path
