"""The review page: one static HTML file to look through pseudo labels in a browser, worst first.

Written by ``export`` (``data/export/review.html``, listed in ``SHA256SUMS``) and by ``relabel`` (in each version
folder, ``data/collections/<name>/<version>/review.html``). One table row per image: thumbnails of the image, of
its pseudo mask in the palette's colours (255 = ignore in the palette's ignore colour) and, where CAM shards are at
hand (``relabel``), of the CAM heat map over the image; then the row's labels (class names, with the classifier's
scores where known), ``tag_source`` (given | predicted) with the ``provenance`` (pseudo | corrected),
``label_score``, ``confidence`` and ``ignore_fraction``.

The page opens in the order *lowest label score first* (also without JavaScript); its inline script sorts by image
id, tag source, score, confidence or ignored share (click a column head; again to reverse) and filters by class and by
tag source, keeping a count of the rows shown. A legend gives the class colours.

Self-contained on purpose: thumbnails are embedded as ``data:`` URIs (JPEG for photos and CAMs, palette PNG for
masks) and CSS and script are inline, so the page is one file that opens from anywhere (a ``dvc get`` download, a
mail attachment, ``file://``) with nothing beside it to lose, and ``SHA256SUMS`` covers it with one line. Its
Content-Security-Policy forbids every load that is not inline or a ``data:`` URI: the page never touches a network.
The cost is base64's third on top of the thumbnails, so the row count is capped (``export.review_rows``,
``orchestration.review_rows``): the worst rows are the ones a reviewer needs.

Same inputs, same bytes (no timestamps, fixed encoder settings), so the page can sit in a checksummed package.
numpy + PIL + pyarrow only.
"""

from __future__ import annotations

import base64
import heapq
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from shards.cams import decode_cams
from shards.images import decode_mask_png, decode_rgb, encode_mask, long_side_size
from shards.io import atomic_write_bytes
from shards.overlays import cam_heat, jet
from shards.records import IGNORE_INDEX

REVIEW_NAME = "review.html"
THUMB_SIDE = 128  # px, long side of every thumbnail: masks stay readable, ~3 kB per JPEG thumbnail
JPEG_QUALITY = 80  # thumbnails only; the labels themselves are never re-encoded
CAM_BLEND = 0.5  # share of the heat map in the CAM thumbnail (as in shards/overlays.py)
ROW_COLUMNS = ["image_id", "split", "image", "mask", "labels", "tag_source", "provenance", "confidence",
               "object_confidence", "label_score", "ignore_fraction"]
RANK = "label_score"  # the per-image trust score (shards/pseudo_labels.py): the page's order, lowest first
CAM_COLUMNS = ["image_id", "classes", "scores", "cam_height", "cam_width", "cams"]
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# -- choosing the rows ---------------------------------------------------------------------------------------------
def _order_key(score: float | None, image_id: str) -> tuple[float, str]:
    """Worst first: lowest score, ties by id; a missing or NaN score counts as the worst."""
    bad = score is None or math.isnan(score)
    return (-math.inf if bad else float(score), image_id)


def _score(row: Mapping[str, Any]) -> float | None:
    """A row's rank: its ``label_score`` (rows of shards older than that column: their confidence)."""
    return row.get(RANK, row.get("confidence"))


def worst_rows(paths: Sequence[Path], limit: int) -> tuple[list[dict[str, Any]], int]:
    """The ``limit`` rows of the pseudo-label shards ``paths`` with the lowest label score (``ROW_COLUMNS`` only),
    worst first, and the number of rows in all. Reads two small columns of every row and the bytes of the chosen
    rows only."""
    refs = []
    for index, path in enumerate(paths):
        rank = RANK if RANK in pq.read_schema(path).names else "confidence"
        table = pq.read_table(path, columns=["image_id", rank])
        refs += [(_order_key(c, i), index) for i, c in zip(table["image_id"].to_pylist(),
                                                           table[rank].to_pylist())]
    chosen = heapq.nsmallest(max(limit, 0), refs)
    wanted: dict[int, list[str]] = {}
    for (_, image_id), index in chosen:
        wanted.setdefault(index, []).append(image_id)
    rows = []
    for index, ids in sorted(wanted.items()):
        names = pq.read_schema(paths[index]).names
        rows += pq.read_table(paths[index], columns=[c for c in ROW_COLUMNS if c in names],
                              filters=[("image_id", "in", ids)]).to_pylist()
    return sorted(rows, key=lambda r: _order_key(_score(r), r["image_id"])), len(refs)


def cam_rows(paths: Iterable[Path], image_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """image_id -> CAM row (``CAM_COLUMNS``) of those ``image_ids`` found in the CAM shards ``paths``."""
    ids = sorted(set(image_ids))
    if not ids:
        return {}
    return {row["image_id"]: row for path in paths
            for row in pq.read_table(path, columns=CAM_COLUMNS, filters=[("image_id", "in", ids)]).to_pylist()}


# -- thumbnails ----------------------------------------------------------------------------------------------------
def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return _data_uri("image/jpeg", buffer.getvalue())


def thumb_size(height: int, width: int, long_side: int = THUMB_SIDE) -> tuple[int, int]:
    """(h, w) of a thumbnail's pixels: the long side at ``long_side``, never enlarged (the page shows every
    thumbnail with its long side at ``long_side``: the browser scales small ones up, masks without blur)."""
    return long_side_size(height, width, min(long_side, max(height, width)))


def thumbnails(row: Mapping[str, Any], palette: Sequence[Sequence[int]], cam_row: Mapping[str, Any] | None = None,
               long_side: int = THUMB_SIDE) -> dict[str, Any]:
    """``{"size": (h, w), "image", "mask", "cam"}`` data URIs of one row (``cam`` None without a CAM row)."""
    rgb = decode_rgb(row["image"]["bytes"])
    mask = decode_mask_png(row["mask"]["bytes"])
    h, w = thumb_size(*rgb.shape[:2], long_side)
    small = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))  # (h, w, 3)
    small_mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))  # (h, w): ids, never blended
    out = {"size": (h, w), "image": _jpeg(small), "mask": _data_uri("image/png", encode_mask(small_mask, palette)),
           "cam": None}
    if cam_row is not None:
        heat = cam_heat(decode_cams(cam_row), (h, w))  # (h, w) in [0, 1]: max over the present classes
        out["cam"] = _jpeg(((1 - CAM_BLEND) * small + CAM_BLEND * jet(heat)).astype(np.uint8))
    return out


# -- the page ------------------------------------------------------------------------------------------------------
def _hex(colour: Sequence[int]) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in colour[:3])


def _fraction(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _sort_value(value: float | None) -> str:
    return "-1" if value is None or math.isnan(value) else f"{value:.6f}"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px}
table.facts{border-collapse:collapse;margin:8px 0}
table.facts th,table.facts td{text-align:left;padding:1px 12px 1px 0;font-weight:normal;vertical-align:top}
table.facts th{color:#666}
code{font:12px ui-monospace,monospace}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:8px 0}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:-2px;margin-right:4px}
.controls{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ccc;z-index:1}
.controls label{margin-right:16px}
#rows{border-collapse:collapse;margin-top:8px}
#rows th,#rows td{border-bottom:1px solid #e4e4e4;padding:4px 8px;text-align:left;vertical-align:top}
#rows th button{font:inherit;font-weight:bold;border:0;background:none;cursor:pointer;padding:0}
#rows th[aria-sort=ascending] button::after{content:" \\25B2"}
#rows th[aria-sort=descending] button::after{content:" \\25BC"}
#rows td.num{font-variant-numeric:tabular-nums;text-align:right}
#rows img{display:block;background:#eee}
#rows img.mask{image-rendering:pixelated}
.tag{display:inline-block;white-space:nowrap;margin:0 8px 2px 0}
.tag small{color:#666}
.predicted{color:#a33}
"""

_SCRIPT = """
(function () {
  var body = document.querySelector("#rows tbody");
  var rows = Array.prototype.slice.call(body.rows);
  var heads = Array.prototype.slice.call(document.querySelectorAll("#rows th[data-sort]"));
  var classFilter = document.getElementById("class-filter");
  var sourceFilter = document.getElementById("source-filter");
  var shown = document.getElementById("shown");
  var numeric = {score: true, confidence: true, ignore: true};
  var state = {key: "score", dir: 1};
  function value(row, key) {
    var v = row.getAttribute("data-" + key);
    return numeric[key] ? parseFloat(v) : v;
  }
  function compare(a, b) {
    var x = value(a, state.key), y = value(b, state.key);
    if (x < y) return -state.dir;
    if (x > y) return state.dir;
    x = a.getAttribute("data-id"); y = b.getAttribute("data-id");
    return x < y ? -1 : x > y ? 1 : 0;
  }
  function sort() {
    rows.sort(compare);
    rows.forEach(function (row) { body.appendChild(row); });
    heads.forEach(function (th) {
      if (th.getAttribute("data-sort") === state.key) {
        th.setAttribute("aria-sort", state.dir > 0 ? "ascending" : "descending");
      } else {
        th.removeAttribute("aria-sort");
      }
    });
  }
  function filter() {
    var k = classFilter.value, s = sourceFilter.value, n = 0;
    rows.forEach(function (row) {
      var ok = (!k || (" " + row.getAttribute("data-labels") + " ").indexOf(" " + k + " ") >= 0) &&
               (!s || row.getAttribute("data-source") === s);
      row.hidden = !ok;
      if (ok) n++;
    });
    shown.textContent = String(n);
  }
  heads.forEach(function (th) {
    th.querySelector("button").addEventListener("click", function () {
      var key = th.getAttribute("data-sort");
      state = {key: key, dir: state.key === key ? -state.dir : 1};
      sort();
    });
  });
  classFilter.addEventListener("change", filter);
  sourceFilter.addEventListener("change", filter);
  sort();
  filter();
})();
"""


def render_review(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str], palette: Sequence[Sequence[int]],
                  *, title: str, max_rows: int, total: int | None = None, cams: Mapping[str, Mapping] | None = None,
                  facts: Sequence[tuple[str, str]] = (), rows_param: str = "", ignore_index: int = IGNORE_INDEX,
                  long_side: int = THUMB_SIDE) -> str:
    """The page's HTML for the ``max_rows`` lowest-label-score ``rows`` (pseudo-label row dicts).

    ``cams`` (image_id -> CAM row) adds the CAM column, and the classifier's scores beside the labels; without it
    (None) the column is left out. ``total`` is the number of rows the shown ones were chosen from (default: all of
    ``rows``); ``facts`` are (label, text) lines of provenance for the page head; ``rows_param`` names the
    parameter that caps the rows.
    """
    shown = sorted(rows, key=lambda r: _order_key(_score(r), r["image_id"]))[:max(max_rows, 0)]
    total = len(rows) if total is None else total
    ignore_colour = palette[ignore_index] if len(palette) > ignore_index else (255, 255, 255)
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{e(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>"]
    if facts:
        out.append('<table class="facts">')
        out += [f"<tr><th>{e(label)}</th><td>{e(str(text))}</td></tr>" for label, text in facts]
        out.append("</table>")
    cap = f" (the cap is <code>{e(rows_param)}</code>)" if rows_param else ""
    out.append(f'<p id="summary">{len(shown)} of {total} images, the lowest score first{cap}. '
               "<b>score</b>: <code>label_score</code>, confidence times the labelled share of the image (1 for a "
               "mask corrected by hand); "
               "<b>confidence</b>: mean, over the pixels not ignored, of the winning class probability; "
               f"<b>ignored</b>: share of pixels set to {ignore_index} (left out of a segmenter's loss).</p>")
    out.append('<div class="legend" id="legend">')
    out += [f'<span><i class="swatch" style="background:{_hex(palette[k])}"></i>{k} {e(name)}</span>'
            for k, name in enumerate(class_names)]
    out.append(f'<span><i class="swatch" style="background:{_hex(ignore_colour)}"></i>{ignore_index} ignore</span>')
    out.append("</div>")
    options = "".join(f'<option value="{k}">{e(name)}</option>' for k, name in enumerate(class_names) if k)
    out.append('<div class="controls">'
               f'<label>class <select id="class-filter"><option value="">all classes</option>{options}</select>'
               "</label>"
               '<label>tags <select id="source-filter"><option value="">given and predicted</option>'
               '<option value="given">given</option><option value="predicted">predicted</option></select></label>'
               f'<span id="count">showing <b id="shown">{len(shown)}</b> of {len(shown)} rows</span></div>')
    with_cam = cams is not None
    out.append('<table id="rows"><thead><tr>'
               '<th data-sort="id"><button type="button">image id</button></th><th>image</th><th>pseudo mask</th>'
               + ("<th>CAM</th>" if with_cam else "") +
               '<th>labels</th><th data-sort="source"><button type="button">tags</button></th>'
               '<th data-sort="score" aria-sort="ascending"><button type="button">score</button></th>'
               '<th data-sort="confidence"><button type="button">confidence</button></th>'
               '<th data-sort="ignore"><button type="button">ignored</button></th></tr></thead><tbody>')
    for row in shown:
        cam_row = cams.get(row["image_id"]) if with_cam else None
        thumbs = thumbnails(row, palette, cam_row, long_side)
        h, w = long_side_size(*thumbs["size"], long_side)  # shown at one size: small images scaled up by the browser
        image_id, source = row["image_id"], row.get("tag_source") or ""
        scores = dict(zip(cam_row["classes"], cam_row["scores"])) if cam_row is not None else {}
        tags = "".join(
            f'<span class="tag"><i class="swatch" style="background:{_hex(palette[k])}"></i>{e(class_names[k])}'
            + (f" <small>{scores[k]:.2f}</small>" if k in scores else "") + "</span>" for k in row["labels"])
        cells = [f'<td><code>{e(image_id)}</code>'
                 + (f"<br><small>{e(row['split'])}</small>" if row.get("split") else "") + "</td>",
                 f'<td><img class="image" src="{thumbs["image"]}" width="{w}" height="{h}" alt="image"></td>',
                 f'<td><img class="mask" src="{thumbs["mask"]}" width="{w}" height="{h}" alt="pseudo mask"></td>']
        if with_cam:
            cells.append(f'<td><img class="cam" src="{thumbs["cam"]}" width="{w}" height="{h}" alt="CAM"></td>'
                         if thumbs["cam"] else "<td>–</td>")
        cells += [f"<td>{tags or '<small>none</small>'}</td>",
                  f'<td class="{e(source)}">{e(source)}'
                  + (f'<br><small class="provenance">{e(row["provenance"])}</small>' if row.get("provenance") else "")
                  + "</td>",
                  f'<td class="num score">{_fraction(_score(row))}</td>',
                  f'<td class="num confidence">{_fraction(row["confidence"])}</td>',
                  f'<td class="num ignore">{_fraction(row["ignore_fraction"])}</td>']
        out.append(f'<tr data-id="{e(image_id)}" data-score="{_sort_value(_score(row))}" '
                   f'data-confidence="{_sort_value(row["confidence"])}" '
                   f'data-ignore="{_sort_value(row["ignore_fraction"])}" '
                   f'data-labels="{" ".join(str(k) for k in row["labels"])}" data-source="{e(source)}">'
                   + "".join(cells) + "</tr>")
    out += ["</tbody></table>", f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""]
    return "\n".join(out)


def write_review(path: str | Path, rows: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                 palette: Sequence[Sequence[int]], *, max_rows: int, total: int | None = None,
                 **kwargs: Any) -> dict[str, Any]:
    """:func:`render_review` written atomically to ``path``; returns ``{"rows", "total", "bytes"}``."""
    page = render_review(rows, class_names, palette, max_rows=max_rows, total=total, **kwargs).encode("utf-8")
    atomic_write_bytes(path, page)
    return {"rows": min(len(rows), max(max_rows, 0)), "total": len(rows) if total is None else total,
            "bytes": len(page)}
