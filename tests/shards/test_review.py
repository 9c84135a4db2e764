"""The review page (shards/review.py): which rows, in which order, with which thumbnails, nothing external, same bytes
every time; then the page itself in a real headless Chromium (tests/browser.py): rows shown, sorting, filtering by
class and by tag source, images that decode, no network request, no console error."""

import base64
import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards.cams import encode_cams
from shards.images import decode_mask_png
from shards.records import voc_palette
from shards.review import THUMB_SIDE, render_review, worst_rows, write_review
from tests.browser import MISSING, chromium_paths, headless_chromium
from tests.export_inputs import CLASS_NAMES, synthetic_row, write_inputs

PALETTE = voc_palette()
N_ROWS = 12


def make_rows(n: int = N_ROWS, seed: int = 1) -> list[dict]:
    """Pseudo-label rows as refine writes them (tests/export_inputs.py), with one confidence tie."""
    rng = np.random.default_rng(seed)
    rows = [synthetic_row(rng, f"img_{i:03d}", "train", i)[0] for i in range(n)]
    if n > 5:
        rows[5]["label_score"] = rows[2]["label_score"]  # a tie: the id decides
    return rows


def make_cams(rows: list[dict], seed: int = 2) -> dict[str, dict]:
    """CAM rows (fp16, 16 x 20) for every row but the last, with a score per label."""
    rng = np.random.default_rng(seed)
    cams = {}
    for row in rows[:-1]:
        classes = list(row["labels"])
        maps = rng.random((len(classes), 16, 20)).astype(np.float32)  # (P, h, w)
        cams[row["image_id"]] = {"image_id": row["image_id"], "classes": classes,
                                 "scores": [float(s) for s in rng.uniform(0.3, 1.0, len(classes))],
                                 "cam_height": 16, "cam_width": 20, "cams": encode_cams(maps)}
    return cams


def worst_first(rows: list[dict]) -> list[str]:
    return [r["image_id"] for r in sorted(rows, key=lambda r: (r["label_score"], r["image_id"]))]


def row_ids(page: str) -> list[str]:
    return re.findall(r'<tr data-id="([^"]+)"', page)


def decode_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def render(rows, **kwargs):
    return render_review(rows, CLASS_NAMES, PALETTE, **{"title": "review", "max_rows": 100, **kwargs})


def test_the_worst_rows_come_first_capped_and_in_the_same_bytes_every_time():
    rows = make_rows()
    page = render(rows, max_rows=5, total=40, rows_param="export.review_rows")
    assert row_ids(page) == worst_first(rows)[:5]
    assert "5 of 40 images, the lowest score first" in page and "export.review_rows" in page
    assert render(list(reversed(rows)), max_rows=5, total=40, rows_param="export.review_rows") == page
    tied = [i for i in row_ids(render(rows)) if i in ("img_002", "img_005")]
    assert tied == ["img_002", "img_005"]
    assert row_ids(render(rows, max_rows=0)) == []


def test_a_missing_confidence_counts_as_the_worst():
    rows = make_rows(4)
    rows[3]["label_score"] = float("nan")
    page = render(rows)
    assert row_ids(page)[0] == "img_003" and 'data-score="-1"' in page


def test_worst_rows_reads_the_lowest_confidence_rows_of_the_shards(tmp_path):
    inputs = write_inputs(tmp_path)
    paths = sorted(inputs["pseudo"].glob("*.parquet"))
    everything = [r for p in paths for r in pq.read_table(p).to_pylist()]
    chosen, total = worst_rows(paths, 4)
    assert total == len(everything) == 10
    assert [r["image_id"] for r in chosen] == worst_first(everything)[:4]
    assert set(chosen[0]) == {"image_id", "split", "image", "mask", "labels", "tag_source", "provenance",
                              "confidence", "object_confidence", "label_score", "ignore_fraction"}  # the bytes of the chosen rows, not the boxes or pixel counts
    assert worst_rows(paths, 0) == ([], 10) and len(worst_rows(paths, 99)[0]) == 10


def test_thumbnails_keep_the_aspect_mask_ids_and_palette_and_the_cam_column_needs_cams():
    rows = make_rows(3)
    rows[0]["image"]["bytes"] = _png(np.zeros((300, 150, 3), np.uint8))  # larger than a thumbnail: shrunk
    page = render(rows)
    assert "<th>CAM</th>" not in page and 'class="cam"' not in page
    images = re.findall(r'<img class="image" src="([^"]+)" width="(\d+)" height="(\d+)"', page)
    masks = re.findall(r'<img class="mask" src="([^"]+)" width="(\d+)" height="(\d+)"', page)
    by_id = {r["image_id"]: r for r in rows}
    for image_id, (image, iw, ih), (mask, mw, mh) in zip(row_ids(page), images, masks):
        row = by_id[image_id]
        im, mk = decode_uri(image), decode_uri(mask)
        assert im.format == "JPEG" and mk.format == "PNG" and mk.mode == "P"
        assert im.size == mk.size and (iw, ih) == (mw, mh) and max(int(iw), int(ih)) == THUMB_SIDE  # shown size
        source = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert max(im.size) == min(THUMB_SIDE, max(source.size))  # pixels: shrunk, never enlarged
        assert abs(im.size[0] / im.size[1] - source.size[0] / source.size[1]) < 0.05
        ids = set(np.unique(np.asarray(mk)).tolist())
        assert ids <= set(np.unique(decode_mask_png(row["mask"]["bytes"])).tolist()) and 255 in ids
        assert mk.getpalette()[: 3 * 4] == [v for c in PALETTE[:4] for v in c]
    with_cams = render(rows, cams=make_cams(rows))
    assert "<th>CAM</th>" in with_cams
    cams = re.findall(r'<img class="cam" src="([^"]+)"', with_cams)
    assert len(cams) == 2 and all(decode_uri(c).format == "JPEG" for c in cams)  # the last row has no CAM: "–"
    assert with_cams.count("<td>–</td>") == 1
    assert re.search(r"<small>0\.\d\d</small>", with_cams)  # the classifier's scores beside the labels


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_nothing_external_and_every_name_escaped(tmp_path):
    rows = make_rows(3)
    names = ["background", "<script>alert(1)</script>", "a&b", 'q"uote']
    page_path = tmp_path / "review.html"
    result = write_review(page_path, rows, names, PALETTE, title="<i>t</i>", max_rows=2,
                          facts=[("source", "<b>x</b>")])
    page = page_path.read_text()
    assert result == {"rows": 2, "total": 3, "bytes": page_path.stat().st_size}
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<i>t</i>" not in page and "<b>x</b>" not in page and "a&amp;b" in page
    assert all(ref.startswith("data:") for ref in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert not re.search(r"https?:|//[a-z]|url\(", re.sub(r'data:[^"]*', "", page))
    assert "default-src 'none'; img-src data:" in page
    assert [p.name for p in tmp_path.iterdir()] == ["review.html"]  # written atomically: no temporary left


# -- in a real browser -------------------------------------------------------------------------------------------------
needs_chromium = pytest.mark.skipif(chromium_paths() is None, reason=MISSING)


@pytest.fixture(scope="module")
def browser():
    if chromium_paths() is None:
        pytest.skip(MISSING)
    with headless_chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    rows = make_rows()
    path = tmp_path_factory.mktemp("review") / "review.html"
    write_review(path, rows, CLASS_NAMES, PALETTE, title="review", max_rows=len(rows), cams=make_cams(rows),
                 rows_param="orchestration.review_rows")
    return path, rows


def shown(driver) -> list[dict]:
    """The rows the browser displays, in order, with their sort attributes."""
    from selenium.webdriver.common.by import By

    return [{"id": tr.get_attribute("data-id"), "score": float(tr.get_attribute("data-score")),
             "confidence": float(tr.get_attribute("data-confidence")),
             "ignore": float(tr.get_attribute("data-ignore")), "source": tr.get_attribute("data-source"),
             "labels": [int(k) for k in tr.get_attribute("data-labels").split()]}
            for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tbody tr") if tr.is_displayed()]


def click_sort(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'#rows th[data-sort="{key}"] button').click()


def choose(driver, select_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_visible_text(text)


@needs_chromium
def test_the_browser_shows_every_row_worst_first_with_decoded_images_and_no_request(browser, page):
    from selenium.webdriver.common.by import By

    path, rows = page
    browser.get(path.resolve().as_uri())
    assert [r["id"] for r in shown(browser)] == worst_first(rows)
    assert browser.find_element(By.ID, "shown").text == str(N_ROWS)
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.className, i.complete, i.naturalWidth, i.naturalHeight,"
        " i.width, i.height])")
    assert len(images) == 3 * N_ROWS - 1  # image, mask, CAM per row; the last row has no CAM
    assert {c for c, *_ in images} == {"image", "mask", "cam"}
    for cls, complete, natural_w, natural_h, w, h in images:
        assert complete and natural_w > 0 and natural_h > 0, f"{cls} thumbnail did not decode"
        assert max(w, h) == THUMB_SIDE and abs(natural_w / natural_h - w / h) < 0.05
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    legend = browser.find_element(By.ID, "legend").text
    assert all(name in legend for name in CLASS_NAMES) and "255 ignore" in legend
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors  # a CSP violation or a script error would be here


@needs_chromium
def test_the_browser_sorts_by_each_column_and_reverses_on_a_second_click(browser, page):
    path, rows = page
    browser.get(path.resolve().as_uri())
    click_sort(browser, "score")  # the page opened ascending: now descending
    order = shown(browser)
    assert [r["id"] for r in order] == [r["id"] for r in sorted(order, key=lambda r: (-r["score"], r["id"]))]
    assert [r["id"] for r in order] != worst_first(rows)
    click_sort(browser, "score")
    assert [r["id"] for r in shown(browser)] == worst_first(rows)
    click_sort(browser, "confidence")  # another column: ascending first
    order = shown(browser)
    assert [r["confidence"] for r in order] == sorted(r["confidence"] for r in order)
    click_sort(browser, "ignore")
    order = shown(browser)
    assert [r["ignore"] for r in order] == sorted(r["ignore"] for r in order)
    assert len({r["ignore"] for r in order}) > 1
    click_sort(browser, "id")
    click_sort(browser, "id")
    assert [r["id"] for r in shown(browser)] == sorted((r["image_id"] for r in rows), reverse=True)
    th = browser.execute_script("return document.querySelector('#rows th[data-sort=\"id\"]').getAttribute('aria-sort')")
    assert th == "descending"


@needs_chromium
def test_the_browser_filters_by_class_and_tag_source_and_counts_the_rows(browser, page):
    from selenium.webdriver.common.by import By

    path, rows = page
    browser.get(path.resolve().as_uri())
    for k in (1, 2, 3):
        having = [r["image_id"] for r in rows if k in r["labels"]]
        assert 0 < len(having) < N_ROWS, "the test rows must have and lack every class"
        choose(browser, "class-filter", CLASS_NAMES[k])
        visible = shown(browser)
        assert sorted(r["id"] for r in visible) == sorted(having)
        assert all(k in r["labels"] for r in visible)
        assert browser.find_element(By.ID, "shown").text == str(len(having))
    choose(browser, "source-filter", "predicted")  # class 3 and predicted tags together
    expected = sorted(r["image_id"] for r in rows if 3 in r["labels"] and r["tag_source"] == "predicted")
    assert sorted(r["id"] for r in shown(browser)) == expected
    choose(browser, "class-filter", "all classes")
    predicted = [r["image_id"] for r in rows if r["tag_source"] == "predicted"]
    assert 0 < len(predicted) < N_ROWS and sorted(r["id"] for r in shown(browser)) == sorted(predicted)
    click_sort(browser, "confidence")  # sorting keeps the filter
    assert sorted(r["id"] for r in shown(browser)) == sorted(predicted)
    choose(browser, "source-filter", "given and predicted")
    assert len(shown(browser)) == N_ROWS and browser.find_element(By.ID, "shown").text == str(N_ROWS)

