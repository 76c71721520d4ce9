"""booth.report: the HTML report of `booth evaluate`, checked as markup (parsed: it is well-formed XML) and in a
real headless Chromium (it loads from disk with no console errors, shows every part, and its images decode)."""

import base64
import errno
import io
import re
import xml.etree.ElementTree as ET

import pytest
from helpers import console_errors, open_in_browser, save_screenshot
from PIL import Image

from booth import atomic, report
from booth.report import render, ticks, write_report

NAMES = ["base", "step-000200", "step-000400", "step-000600"]
KEYS = ["subject", "background", "pres", "class"]
EVIL = 'a <script>alert(1)</script> & "sks" shape'
COLOURS = [(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 200, 40)]


def _image(path, colour, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_doc(tmp_path) -> dict:
    """Four checkpoints over two prompts (one of them hostile markup), a score of None, a missing image (the
    last checkpoint's second prompt), relative and absolute image paths, and a drifting class at step 600."""
    scores = [[0.2, 1.0, 0.1, 1.0], [0.5, None, 0.2, 1.0], [0.8, 0.9, 0.3, 0.75], [0.9, 0.8, 0.6, 0.5]]
    checkpoints = []
    for i, (name, values) in enumerate(zip(NAMES, scores)):
        rel = f"renders/{name}/00-0.png"
        _image(tmp_path / rel, COLOURS[i], size=(512, 384))
        second = (
            _image(tmp_path / "renders" / name / "01-0.png", COLOURS[i]) if i < 3 else tmp_path / "gone.png"
        )
        klass = _image(tmp_path / "renders" / name / "class-0.png", COLOURS[i])
        per_prompt = [{"prompt": "a sks shape on a red background", "text": "a shape on a red background",
                       "images": [rel, "renders/x.png"], "subject": values[0], "background": values[1]},
                      {"prompt": EVIL, "text": "a shape", "images": [str(second)], "subject": values[0],
                       "background": None}]  # fmt: skip
        checkpoints.append({"name": name, "path": f"/runs/run0/ckpts/{name}.safetensors", "step": 200 * i,
                            "dino": None, "clip_i": None, "clip_t": None, "pres": values[2],
                            "scores": dict(zip(KEYS, values)), "drift": [1.0, 0.9, 0.7, 0.5][i],
                            "class_images": [str(klass)], "per_prompt": per_prompt})  # fmt: skip
    reals = [str(_image(tmp_path / "reals" / f"{k}.png", (90, 90, 90 + 40 * k))) for k in range(2)]
    return {"reals": reals, "metric": "demo", "checkpoints": checkpoints, "best": "step-000400",
            "rule": "closest to the ideal on subject & background", "models": {"judge": "<shapes>"},
            "keys": KEYS, "drift_threshold": 0.6,
            "warnings": ["step 600: the class is drifting: raise -l or lower the learning rate"]}  # fmt: skip


def parse(html: str) -> ET.Element:
    assert html.startswith("<!DOCTYPE html>\n")
    return ET.fromstring(html.removeprefix("<!DOCTYPE html>\n"))


def find(root: ET.Element, tag: str, cls: str | None = None, **attrs) -> list[ET.Element]:
    """The `tag` elements with the class `cls` among their classes and the attributes `attrs`."""
    return [e for e in root.iter(tag) if (cls is None or cls in e.get("class", "").split())
            and all(e.get(k.replace("_", "-")) == v for k, v in attrs.items())]  # fmt: skip


def text(e: ET.Element) -> str:
    return "".join(e.itertext())


@pytest.fixture
def written(tmp_path):
    doc = make_doc(tmp_path)
    path = write_report(doc, tmp_path / "report.html", recipe="lr: 5e-6\nprompt: <sks> & co\n")
    return doc, path, path.read_text(encoding="utf-8")


def test_user_text_is_escaped(written):
    _, _, html = written
    assert "<script" not in html  # the prompt's tag, and no script of its own either
    assert "a &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;sks&quot; shape" in html
    prompts = [text(th) for th in find(parse(html), "th", "prompt")]
    assert prompts == ["a sks shape on a red background", EVIL, "the class prompt"]
    assert text(find(parse(html), "pre", id="recipe")[0]) == "lr: 5e-6\nprompt: <sks> & co\n"


def test_title_summary_and_warnings(written):
    _, _, html = written
    root = parse(html)
    assert text(root.find("head/title")) == "booth evaluate: step-000400"
    summary = text(find(root, "p", "summary")[0])
    assert "step-000400 (step 400)" in summary and "subject & background" in summary
    assert [text(li) for li in find(root, "li", "warning")] == [
        "⚠ step 600: the class is drifting: raise -l or lower the learning rate"
    ]
    order = [html.index(s) for s in ['id="warnings"', 'id="metrics"', 'class="plot"', 'id="drift"', 'id="grid"',
                                     'id="reals"', 'id="recipe"', 'id="models"']]  # fmt: skip
    assert order == sorted(order)


def test_metric_table_marks_the_best_row_and_each_columns_best(written):
    _, _, html = written
    table = find(parse(html), "table", id="metrics")[0]
    rows = find(table, "tr", "checkpoint")
    assert [r.get("data-name") for r in rows] == NAMES
    assert [r.get("data-name") for r in find(table, "tr", "best")] == ["step-000400"]
    tops = {k: [r.get("data-name") for r in rows if find(r, "td", "top", data_key=k)] for k in KEYS}
    # subject and background: the highest; pres: the lowest; class: a tie at 1.0 marks both
    assert tops == {"subject": ["step-000600"], "background": ["base"], "pres": ["base"],
                    "class": ["base", "step-000200"]}  # fmt: skip
    assert text(find(rows[1], "td", data_key="background")[0]) == "–"
    assert text(find(rows[2], "td", data_key="subject")[0]) == "0.800"
    assert [r.get("data-name") for r in rows if find(r, "td", "low", data_key="drift")] == ["step-000600"]


def test_a_plot_per_metric_with_ticks_tooltips_and_the_best_marked(written):
    _, _, html = written
    plots = find(parse(html), "svg", "plot")
    assert [p.get("data-metric") for p in plots] == KEYS
    at_best = {"subject": "0.800", "background": "0.900", "pres": "0.300", "class": "0.750"}
    for svg in plots:
        key = svg.get("data-metric")
        none = 1 if key == "background" else 0  # step-000200's background is None
        assert len(find(svg, "circle", "point")) == len(NAMES) - none
        assert [text(p) for p in find(svg, "circle", "best")] == [
            f"step-000400 (step 400): {key} {at_best[key]}"
        ]
        assert len(find(svg, "circle", "ring")) == 1
        labels = [text(t) for t in svg.iter("text")]
        assert {"0", "200", "400", "600", "training step", key} <= set(labels)
    # a None breaks the line: background's points are base, then 400 and 600
    background = plots[1]
    assert [len(p.get("points").split()) for p in find(background, "polyline", "line")] == [2]


def test_drift_plot_has_the_threshold_line(written):
    _, _, html = written
    drift = find(parse(html), "svg", id="drift")[0]
    assert "plot" not in drift.get("class").split()  # svg.plot is one per score key
    (line,) = find(drift, "line", "threshold")
    assert line.get("y1") == line.get("y2") and text(line) == "threshold 0.6"
    low = find(drift, "circle", "low")
    assert [text(p) for p in low] == ["step-000600 (step 600): drift 0.500 – drifting"]
    # the threshold sits between the lowest point (0.5) and the next (0.7): higher on the page means larger
    ys = {text(p).split(" ")[0]: float(p.get("cy")) for p in find(drift, "circle", "point")}
    assert ys["step-000400"] < float(line.get("y1")) < ys["step-000600"]


def test_no_drift_no_drift_plot(tmp_path):
    doc = make_doc(tmp_path)
    for c in doc["checkpoints"]:
        del c["drift"]
    html = render(doc, tmp_path)
    assert not find(parse(html), "svg", id="drift")
    assert [th.text for th in parse(html).iter("th") if th.text == "drift"] == []


def test_grid_rows_columns_thumbnails_and_placeholders(written):
    _, _, html = written
    grid = find(parse(html), "table", id="grid")[0]
    head = grid.find("thead/tr").findall("th")
    assert [h.get("class") for h in head[1:]] == ["checkpoint", "checkpoint", "best", "checkpoint"]
    rows = grid.find("tbody").findall("tr")
    assert len(rows) == 3  # two prompts, then the class prompt
    for row in rows:
        cells = row.findall("td")
        assert len(cells) == len(NAMES) and [c.get("class") for c in cells].index("best") == 2
    assert len(find(grid, "td", "best")) == 3
    missing = [
        (r, c) for r, row in enumerate(rows) for c, cell in enumerate(row.findall("td")) if find(cell, "div")
    ]
    assert missing == [(1, 3)]  # the last checkpoint's image of the second prompt does not exist
    images = list(grid.iter("img"))
    assert len(images) == 3 * len(NAMES) - 1
    thumb = Image.open(
        io.BytesIO(base64.b64decode(images[0].get("src").removeprefix("data:image/jpeg;base64,")))
    )
    assert thumb.format == "JPEG" and thumb.size == (96, 72)  # 512x384, its longer side down to 96
    assert abs(thumb.getpixel((48, 36))[0] - COLOURS[0][0]) < 8  # base's own (red) image, not another's
    assert "subject 0.200" in images[0].get("title")
    assert len(list(find(parse(html), "div", id="reals")[0].iter("img"))) == 2


def test_self_contained(written):
    _, _, html = written
    root = parse(html)
    linked = [(e.tag, k, v) for e in root.iter() for k, v in e.attrib.items() if k in ("src", "href")]
    assert linked and all(v.startswith("data:image/jpeg;base64,") for _, _, v in linked)
    assert not re.search(r"https?://|url\(|@import|<link|<script", html)


def test_same_document_same_bytes(tmp_path, written):
    doc, path, html = written
    first = path.read_bytes()
    write_report(doc, path, recipe="lr: 5e-6\nprompt: <sks> & co\n")
    assert path.read_bytes() == first
    other = write_report(doc, tmp_path / "again.html", recipe="lr: 5e-6\nprompt: <sks> & co\n")
    assert other.read_bytes() == first


def test_written_atomically(tmp_path, written, monkeypatch):
    doc, path, html = written
    assert not list(tmp_path.glob(".*.tmp"))

    def half_then_full_disk(target, content):  # booth.atomic.write_text, stopped half-way by a full disk
        with atomic.atomic_path(target) as tmp:
            tmp.write_text(content[: len(content) // 2], encoding="utf-8")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "write_text", half_then_full_disk)
    doc["best"] = "base"
    with pytest.raises(atomic.DiskFull):
        write_report(doc, path)
    assert path.read_text(encoding="utf-8") == html
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_failure_after_the_whole_text_leaves_the_old_report(tmp_path, written, monkeypatch):
    """The real write path: the new text is all on disk (in a temporary) when the flush fails."""
    doc, path, html = written

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    doc["best"] = "base"
    with pytest.raises(atomic.DiskFull):
        write_report(doc, path)
    assert path.read_text(encoding="utf-8") == html
    assert not list(tmp_path.glob(".*.tmp"))


def test_nothing_to_show_still_writes(tmp_path):
    """Every image missing, every score None, no keys list, no optional field: a report all the same."""
    doc = {"reals": ["nope.png"], "metric": "paper", "best": "base", "rule": "r", "models": {},
           "checkpoints": [{"name": n, "path": "p", "step": 100 * i, "scores": {"dino": None, "clip_t": None},
                            "per_prompt": [{"prompt": "p", "text": "p", "images": ["no.png"]}]}
                           for i, n in enumerate(["base", "step-000100"])]}  # fmt: skip
    root = parse(write_report(doc, tmp_path / "r.html").read_text(encoding="utf-8"))
    assert [p.get("data-metric") for p in find(root, "svg", "plot")] == ["dino", "clip_t"]
    assert not find(root, "circle") and not find(root, "img") and not find(root, "ul", id="warnings")
    assert len(find(root, "div", "missing")) == 3


@pytest.mark.parametrize("lo,hi,integer", [(0, 800, True), (0.61, 0.84, False), (0.5, 0.5, False), (0, 0, True),
                                           (-0.02, 0.013, False), (0, 3, True), (0.5, 0.5 + 1e-12, False),
                                           (0, 1e-12, False)])  # fmt: skip
def test_ticks_are_round_and_span_the_data(lo, hi, integer):
    t = ticks(lo, hi, integer)
    assert 2 <= len(t) <= 7 and t[0] <= lo and t[-1] >= hi
    assert not (integer and lo >= 0 and t[0] < 0)  # no negative training step on an axis
    steps = {round(b - a, 9) for a, b in zip(t, t[1:])}
    assert len(steps) == 1 and re.fullmatch(
        r"0\.0*[125]|[125]0*", format(steps.pop(), "f").rstrip("0").rstrip(".")
    )


def test_report_in_a_browser(tmp_path):
    """The report as a person sees it: Chromium, from disk, offline."""
    doc = make_doc(tmp_path)
    path = write_report(doc, tmp_path / "report.html", recipe="lr: 5e-6\n")
    with open_in_browser(path) as (driver, errors):
        from selenium.webdriver.common.by import By  # here: without Selenium, open_in_browser skips the test

        assert errors == []
        assert driver.title == "booth evaluate: step-000400"
        rows = driver.find_elements(By.CSS_SELECTOR, "table#metrics tr.checkpoint")
        assert [r.get_attribute("data-name") for r in rows] == NAMES and all(r.is_displayed() for r in rows)
        plots = driver.find_elements(By.CSS_SELECTOR, "svg.plot") + driver.find_elements(
            By.CSS_SELECTOR, "svg#drift"
        )
        assert [p.get_attribute("data-metric") for p in plots] == [*KEYS, "drift"]
        assert all(p.is_displayed() and p.size["width"] > 100 and p.size["height"] > 100 for p in plots)
        loaded = driver.execute_script(
            "return [...document.querySelectorAll('#grid img, #reals img')].map(i => i.complete && i.naturalWidth)"
        )
        # 11 grid cells with an image (the 12th is missing), then the 2 real photos; only the first row's 512 px
        # renders are big enough to be scaled down (a thumbnail never scales up)
        assert loaded == [96] * 4 + [64] * (2 * len(NAMES) - 1) + [64, 64]
        # the best column shows as such: its cells wear another background than the rest
        best = driver.find_element(By.CSS_SELECTOR, "#grid td.best").value_of_css_property("background-color")
        other = driver.find_element(By.CSS_SELECTOR, "#grid td:not(.best)").value_of_css_property(
            "background-color"
        )
        assert best != other
        shot = save_screenshot(driver, "report.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(shot).size[1] >= driver.execute_script(
            "return document.documentElement.scrollHeight"
        )

        # and the console check can fail: a page that asks the network for an image (refused: no network here)
        (tmp_path / "remote.html").write_text('<img src="https://example.com/a.png">')
        driver.get((tmp_path / "remote.html").as_uri())
        assert any("a.png" in e["message"] or "ERR_" in e["message"] for e in console_errors(driver))


def test_scores_equal_but_for_rounding_still_plot(tmp_path):
    """Two checkpoints whose scores differ in the 12th digit (the same model twice): the axis gets room instead
    of a zero-height range."""
    doc = {"checkpoints": [{"name": n, "path": n, "step": s, "scores": {"dino": 0.5 + d}, "per_prompt": []}
                           for n, s, d in (("base", 0, 0.0), ("step-000100", 100, 1e-12))],
           "best": "base", "rule": "r", "keys": ["dino"]}  # fmt: skip
    html = write_report(doc, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'data-metric="dino"' in html and "nan" not in html.lower()
