"""`booth evaluate`'s report: one self-contained HTML file (no network, no server, no JavaScript) that shows the
metric table, a plot of each metric against the training step, the class-drift curve, a thumbnail grid of the
renders, the real subject photos, the recipe and the models used.

Images are embedded as JPEG data URIs and the plots are inline SVG drawn here, so the file opens from disk
anywhere and can be mailed or archived on its own. The same document always gives the same bytes (no
timestamps, a fixed thumbnail encoding), so a report can be diffed or committed. The markup is also well-formed
XML, which keeps it easy to check with a parser.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from PIL import Image

from .atomic import write_text

THUMB = 96  # px, the longer side of a grid thumbnail
QUALITY = 80
# PRES is the class prompt's likeness to the subject: a high one means the class has collapsed into the subject
LOWER_IS_BETTER = {"pres"}
W, H = 300, 180  # a plot's size in px
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 10, 36  # its margins: room for the tick labels and the axis labels

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 1.5em;
       background: #fafafa; color: #222; font-size: 14px; line-height: 1.4; }
h1 { font-size: 1.5em; margin: 0 0 .2em; }
h2 { font-size: 1.15em; margin: 1.6em 0 .5em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
.summary { margin: 0 0 1em; color: #444; }
.warnings { list-style: none; padding: 0; margin: 1em 0; }
.warning { background: #fff4e0; border: 1px solid #f0b45c; border-left: 5px solid #e08a00; color: #6b4100;
           padding: .45em .8em; margin: .3em 0; border-radius: 3px; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f0f0f0; font-weight: 600; }
#metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
#metrics td.top { font-weight: 700; color: #0b5394; }
#metrics td.low { color: #b34700; font-weight: 700; }
#metrics tr.best td { background: #e8f4e8; }
.badge { display: inline-block; background: #2e7d32; color: #fff; font-size: .75em; padding: 0 .45em;
         border-radius: 8px; margin-left: .4em; vertical-align: middle; }
.plots { display: flex; flex-wrap: wrap; gap: .8em; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: .3em; }
figcaption { font-weight: 600; text-align: center; font-size: .9em; max-width: 300px; margin: 0 auto; }
svg text { font-size: 10px; fill: #444; font-family: inherit; }
svg .grid { stroke: #eee; }
svg .frame { stroke: #999; fill: none; }
svg .line { stroke: #1f77b4; stroke-width: 1.5; fill: none; }
svg .point { fill: #1f77b4; }
svg .point.low { fill: #d9534f; }
svg .ring { stroke: #2e7d32; stroke-width: 2; fill: none; }
svg .threshold { stroke: #d9534f; stroke-width: 1.2; stroke-dasharray: 5 3; }
#grid td, #grid th { text-align: center; vertical-align: middle; }
#grid th.prompt { text-align: left; font-weight: 400; max-width: 16em; font-size: .9em; }
#grid th.best, #grid td.best { background: #e8f4e8; border-left: 2px solid #2e7d32; border-right: 2px solid #2e7d32; }
#grid img { display: block; margin: auto; }
.missing { width: 96px; height: 96px; line-height: 96px; margin: auto; background: repeating-linear-gradient(
           45deg, #eee, #eee 6px, #f8f8f8 6px, #f8f8f8 12px); color: #999; font-size: .8em; }
.reals { display: flex; flex-wrap: wrap; gap: .4em; }
pre { background: #fff; border: 1px solid #ddd; padding: .6em; overflow-x: auto; font-size: .9em; }
dl.models { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dl.models dt { font-weight: 600; }
dl.models dd { margin: 0; font-family: ui-monospace, monospace; }
"""


def write_report(doc: dict, path: Path, recipe: str | None = None) -> Path:
    """Write `doc` (what `booth evaluate` puts in metrics.json) as an HTML report at `path`, atomically; image
    paths relative to the report's folder are resolved there. `recipe`: the run's recipe (args.yaml) to show."""
    path = Path(path)
    write_text(path, render(doc, path.parent, recipe))
    return path


def render(doc: dict, folder: Path, recipe: str | None = None) -> str:
    """The report's HTML; `folder` is where relative image paths start."""
    keys = score_keys(doc)
    best = doc.get("best")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>booth evaluate: {escape(str(best))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>booth evaluate</h1>",
        _summary(doc),
        _warnings(doc.get("warnings") or []),
        "<h2>Scores</h2>",
        _metric_table(doc, keys),
        '<h2>Scores by training step</h2><div class="plots">',
        *(_metric_plot(doc, key) for key in keys),
        "</div>",
        _drift_section(doc),
        "<h2>Renders</h2>",
        _grid(doc, folder),
        _reals(doc, folder),
        _recipe(recipe),
        _models(doc),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def score_keys(doc: dict) -> list[str]:
    """The scorer's keys in display order: the document's own list, else the first checkpoint's scores."""
    if doc.get("keys"):
        return list(doc["keys"])
    first = doc["checkpoints"][0] if doc.get("checkpoints") else {}
    return list(first.get("scores") or {})


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _summary(doc: dict) -> str:
    best = next((c for c in doc["checkpoints"] if c["name"] == doc.get("best")), None)
    step = f" (step {escape(str(best['step']))})" if best else ""
    return (f'<p class="summary">Best checkpoint: <strong id="best">{escape(str(doc.get("best")))}</strong>{step}'
            f" of {len(doc['checkpoints'])}, scored with the {escape(str(doc.get('metric')))} metrics; "
            f"ranked {escape(str(doc.get('rule') or ''))}.</p>")  # fmt: skip


def _warnings(warnings: Sequence[str]) -> str:
    if not warnings:
        return ""
    items = "".join(f'<li class="warning">⚠ {escape(str(w))}</li>' for w in warnings)
    return f'<ul id="warnings" class="warnings">{items}</ul>'


def best_values(doc: dict, keys: Sequence[str]) -> dict[str, float | None]:
    """Each key's best value over the checkpoints (the lowest for LOWER_IS_BETTER keys), None if none has one."""
    out = {}
    for key in keys:
        values = [v for c in doc["checkpoints"] if (v := _score(c, key)) is not None]
        pick = min if key in LOWER_IS_BETTER else max
        out[key] = pick(values) if values else None
    return out


def _score(checkpoint: dict, key: str) -> float | None:
    value = (checkpoint.get("scores") or {}).get(key, checkpoint.get(key))
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _has_drift(doc: dict) -> bool:
    return any(isinstance(c.get("drift"), (int, float)) for c in doc["checkpoints"])


def _metric_table(doc: dict, keys: Sequence[str]) -> str:
    tops, drift, threshold = best_values(doc, keys), _has_drift(doc), doc.get("drift_threshold")
    arrow = {k: "↓" if k in LOWER_IS_BETTER else "↑" for k in keys}
    head = "".join(f'<th data-key="{escape(k)}">{escape(k)} {arrow[k]}</th>' for k in keys)
    head += "<th>drift</th>" if drift else ""
    rows = []
    for c in doc["checkpoints"]:
        is_best = c["name"] == doc.get("best")
        cells = []
        for key in keys:
            value = _score(c, key)
            top = value is not None and value == tops[key]
            cells.append(
                f'<td class="num{" top" if top else ""}" data-key="{escape(key)}">{_fmt(value)}</td>'
            )
        if drift:
            low = c.get("drift") is not None and threshold is not None and c["drift"] < threshold
            cells.append(
                f'<td class="num{" low" if low else ""}" data-key="drift">{_fmt(c.get("drift"))}</td>'
            )
        badge = '<span class="badge">best</span>' if is_best else ""
        rows.append(f'<tr class="checkpoint{" best" if is_best else ""}" data-name="{escape(c["name"])}">'
                    f'<td class="name" title="{escape(str(c.get("path", "")))}">{escape(c["name"])}{badge}</td>'
                    f'<td class="num">{escape(str(c["step"]))}</td>{"".join(cells)}</tr>')  # fmt: skip
    return (f'<table id="metrics"><thead><tr><th>checkpoint</th><th>step</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")  # fmt: skip


# ----------------------------------------------------------------------------- plots


def ticks(lo: float, hi: float, integer: bool = False, n: int = 4) -> list[float]:
    """About `n` round tick values (1, 2 or 5 times a power of ten apart) that span [lo, hi]."""
    if hi <= lo and integer:  # the base model alone: steps start at 0, so widen upwards only
        hi = lo + 1
    elif hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):  # one value, or all (nearly) equal: room around it
        pad = 1.0 if lo == 0 else abs(lo) * 0.1
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    step = max(step, 1.0) if integer else step
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


@dataclass(frozen=True)
class Axes:
    """Maps data to the plot's pixels: x is the training step, y the value; the tick lists give the ranges."""

    xs: list[float]
    ys: list[float]

    def x(self, v: float) -> float:
        return LEFT + (v - self.xs[0]) / (self.xs[-1] - self.xs[0]) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        return H - BOTTOM - (v - self.ys[0]) / (self.ys[-1] - self.ys[0]) * (H - TOP - BOTTOM)


def _label(v: float) -> str:
    return format(v, "g")


def _frame(axes: Axes, y_label: str) -> list[str]:
    """Grid lines, the tick labels, the axis labels and the frame."""
    out, bottom = [], H - BOTTOM
    for v in axes.ys:
        y = axes.y(v)
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}"/>')
        out.append(f'<text x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{_label(v)}</text>')
    for v in axes.xs:
        x = axes.x(v)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{bottom}"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 13}" text-anchor="middle">{_label(v)}</text>')
    out.append(
        f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{bottom - TOP}"/>'
    )
    out.append(f'<text class="axis-label" x="{(LEFT + W - RIGHT) / 2:.1f}" y="{H - 4}" text-anchor="middle">'
               "training step</text>")  # fmt: skip
    mid = (TOP + bottom) / 2
    out.append(f'<text class="axis-label" x="12" y="{mid:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 12 {mid:.1f})">{escape(y_label)}</text>')  # fmt: skip
    return out


@dataclass(frozen=True)
class Point:
    step: float
    value: float | None
    tip: str  # the tooltip
    best: bool = False
    low: bool = False  # under the plot's threshold


def _series(axes: Axes, points: Sequence[Point]) -> list[str]:
    """The line (broken where a value is missing), a point with a tooltip per value, a ring on the best."""
    out, run = [], []
    for p in [*points, None]:
        if p is not None and p.value is not None:
            run.append(f"{axes.x(p.step):.1f},{axes.y(p.value):.1f}")
            continue
        if len(run) > 1:
            out.append(f'<polyline class="line" points="{" ".join(run)}"/>')
        run = []
    for p in points:
        if p.value is None:
            continue
        x, y = axes.x(p.step), axes.y(p.value)
        if p.best:
            out.append(f'<circle class="ring" cx="{x:.1f}" cy="{y:.1f}" r="7"/>')
        cls = "point" + (" best" if p.best else "") + (" low" if p.low else "")
        out.append(
            f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="3.5"><title>{escape(p.tip)}</title></circle>'
        )
    return out


def plot(points: Sequence[Point], y_label: str, attrs: str, threshold: float | None = None) -> str:
    """An SVG line plot of `points` against the step; `attrs` go on the <svg> element; `threshold` is drawn as
    a dashed line."""
    values = [p.value for p in points if p.value is not None] + ([threshold] if threshold is not None else [])
    steps = [p.step for p in points] or [0]
    axes = Axes(
        ticks(min(steps), max(steps), integer=True), ticks(min(values, default=0), max(values, default=1))
    )
    body = _frame(axes, y_label)
    if threshold is not None:
        y = axes.y(threshold)
        body.append(f'<line class="threshold" x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}">'
                    f"<title>threshold {_label(threshold)}</title></line>")  # fmt: skip
    body += _series(axes, points)
    return (f'<svg {attrs} width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
            f'aria-label="{escape(y_label)} by training step">{"".join(body)}</svg>')  # fmt: skip


def _metric_plot(doc: dict, key: str) -> str:
    points = [Point(c["step"], v := _score(c, key), f"{c['name']} (step {c['step']}): {key} {_fmt(v)}",
                    best=c["name"] == doc.get("best")) for c in doc["checkpoints"]]  # fmt: skip
    better = "lower" if key in LOWER_IS_BETTER else "higher"
    svg = plot(points, key, f'class="plot" data-metric="{escape(key)}"')
    return f"<figure><figcaption>{escape(key)} ({better} is better)</figcaption>{svg}</figure>"


def _drift_section(doc: dict) -> str:
    """The class prompt's images against the base model's at the same seeds: a fall means the model forgets
    the class (language drift), which prior preservation (-l) holds off."""
    if not _has_drift(doc):
        return ""
    threshold = doc.get("drift_threshold")
    points = []
    for c in doc["checkpoints"]:
        v = c.get("drift") if isinstance(c.get("drift"), (int, float)) else None
        low = v is not None and threshold is not None and v < threshold
        tip = f"{c['name']} (step {c['step']}): drift {_fmt(v)}" + (" – drifting" if low else "")
        points.append(Point(c["step"], v, tip, best=c["name"] == doc.get("best"), low=low))
    note = f", dashed: the threshold {_label(threshold)}" if threshold is not None else ""
    svg = plot(points, "drift", 'id="drift" class="drift-plot" data-metric="drift"', threshold)
    caption = f"the class prompt's images against the base model's (1 = the same){note}"
    return f'<h2>Class drift</h2><div class="plots"><figure><figcaption>{caption}</figcaption>{svg}</figure></div>'


# ----------------------------------------------------------------------------- images


def thumbnail(path: str | Path, folder: Path, size: int = THUMB) -> str | None:
    """The image at `path` (relative ones start at `folder`) as a small JPEG data URI; None if it cannot be
    read. Pillow's JPEG encoder is deterministic for fixed settings, so the same file gives the same URI."""
    file = Path(path)
    file = file if file.is_absolute() else folder / file
    try:
        with Image.open(file) as im:
            im.draft("RGB", (size * 2, size * 2))  # a JPEG decodes at a fraction of its size: much faster
            small = im.convert("RGB")
        small.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=QUALITY, optimize=False, progressive=False)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_cell(path: str | None, folder: Path, tip: str, cls: str = "") -> str:
    uri = thumbnail(path, folder) if path else None
    attr = f' class="{cls}"' if cls else ""
    if uri is None:
        what = f"missing: {path}" if path else "no image"
        return f'<td{attr}><div class="missing" title="{escape(what)}">missing</div></td>'
    return f'<td{attr}><img src="{uri}" alt="{escape(tip)}" title="{escape(tip)}"/></td>'


def _prompt_scores(entry: dict, keys: Sequence[str]) -> str:
    return ", ".join(f"{k} {_fmt(entry.get(k))}" for k in keys if k in entry)


def _entry(checkpoint: dict, i: int) -> dict:
    rows = checkpoint.get("per_prompt") or []
    return rows[i] if i < len(rows) else {}  # a checkpoint scored on fewer prompts shows placeholders


def _grid(doc: dict, folder: Path) -> str:
    """Rows: the prompts (then the class prompt); columns: the checkpoints; each cell the first image."""
    cks, keys = doc["checkpoints"], score_keys(doc)
    cols = ["best" if c["name"] == doc.get("best") else "" for c in cks]
    head = "".join(f'<th class="{cls or "checkpoint"}">{escape(c["name"])}<br/>step {escape(str(c["step"]))}</th>'
                   for c, cls in zip(cks, cols))  # fmt: skip
    rows = []
    for i in range(max((len(c.get("per_prompt") or []) for c in cks), default=0)):
        entries = [_entry(c, i) for c in cks]
        prompt = next((e["prompt"] for e in entries if e.get("prompt")), f"prompt {i + 1}")
        cells = []
        for c, e, cls in zip(cks, entries, cols):
            scores = _prompt_scores(e, keys)
            tip = f"{c['name']}: {prompt}" + (f" ({scores})" if scores else "")
            cells.append(_image_cell((e.get("images") or [None])[0], folder, tip, cls))
        rows.append(f'<tr class="prompt"><th class="prompt">{escape(prompt)}</th>{"".join(cells)}</tr>')
    if any(c.get("class_images") for c in cks):
        label = doc.get("class_prompt") or "the class prompt"
        cells = [_image_cell((c.get("class_images") or [None])[0], folder, f"{c['name']}: {label}", cls)
                 for c, cls in zip(cks, cols)]  # fmt: skip
        rows.append(
            f'<tr class="class"><th class="prompt"><em>{escape(label)}</em></th>{"".join(cells)}</tr>'
        )
    return (f'<table id="grid"><thead><tr><th>prompt</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")  # fmt: skip


def _reals(doc: dict, folder: Path) -> str:
    cells = []
    for p in doc.get("reals") or []:
        uri = thumbnail(p, folder)
        name = escape(Path(p).name)
        cells.append(f'<img src="{uri}" alt="{name}" title="{name}"/>' if uri else
                     f'<div class="missing" title="missing: {escape(str(p))}">missing</div>')  # fmt: skip
    return f'<h2>Subject photos</h2><div id="reals" class="reals">{"".join(cells)}</div>' if cells else ""


# ----------------------------------------------------------------------------- recipe and models


def _recipe(recipe: str | None) -> str:
    if recipe is None:
        return ""
    return f'<h2>Recipe</h2><pre id="recipe">{escape(recipe)}</pre>'


def _models(doc: dict) -> str:
    models = doc.get("models") or {}
    rows = [("metric", str(doc.get("metric")))] + [(k, str(v)) for k, v in models.items()]
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    return f'<h2>Models</h2><dl id="models" class="models">{items}</dl>'
