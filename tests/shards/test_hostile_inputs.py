"""A standing corpus of hostile inputs (issue 14): folder, VOC and COCO sources full of what users' disks hold.

Each case names one input and its exact outcome: a manifest row (with its note) or a reject row (with its reason);
the sources as a whole must account for every input. The ``EXIT_2`` cases are whole-source errors: ``prepare``
stops with exit code 2 before any shard, naming the file and the key or entry. Everything is generated here.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from config.schema import PrepareConfig
from labelling.ingest import build_manifest
from shards.images import decode_rgb
from shards.io import ShardSet
from shards.records import voc_palette
from stages import prepare

MAX_FILE_BYTES = 200_000
RNG = np.random.default_rng(14)


# --------------------------------------------------------------------------------------------- file makers


def noise(width: int = 40, height: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def jpeg(width: int = 40, height: int = 32) -> bytes:
    return encode(noise(width, height))


def png16(channels: int) -> tuple[bytes, np.ndarray]:
    """A 16-bit RGB (3) or RGBA (4, opaque) PNG and its 16-bit RGB samples."""
    rgb = RNG.integers(0, 65536, (32, 40, 3), dtype=np.uint16)
    bgr = rgb[..., ::-1]
    if channels == 4:
        bgr = np.concatenate([bgr, np.full((32, 40, 1), 65535, np.uint16)], axis=2)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(bgr))
    assert ok
    return data.tobytes(), rgb


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and an IHDR chunk declaring ``width x height`` (a decompression-bomb header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(noise(), exif=exif.tobytes())


def palette_mask(values: np.ndarray) -> bytes:
    image = Image.fromarray(values.astype(np.uint8), "P")
    image.putpalette([c for rgb in voc_palette() for c in rgb])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def fifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


def unix_socket(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


# ----------------------------------------------------------------------------------------------- sources


def build_folder(root: Path, outside: Path) -> list:
    """A folder source with one entry per case; returns what must stay open (the socket)."""
    keep = []
    ok = jpeg()
    put(root / "ok.jpg", ok)
    put(root / "zz_copy.jpg", ok)  # same bytes, later in sorted order
    rgb16, _ = png16(3)
    put(root / "rgb16.png", rgb16)
    put(root / "rgba16.png", png16(4)[0])
    grey16 = RNG.integers(0, 65536, (32, 40), dtype=np.uint16)
    put(root / "grey16.png", cv2.imencode(".png", grey16)[1].tobytes())
    put(root / "cmyk.jpg", encode(np.zeros((32, 40, 4), np.uint8) + RNG.integers(0, 256, 4, dtype=np.uint8),
                                  mode="CMYK"))
    put(root / "rotated.jpg", exif_rotated())
    put(root / "anim.gif", encode(noise()[..., 0], "GIF", mode="L"))
    put(root / "photo.heic", b"\x00\x00\x00\x18ftypheic" + bytes(64))
    put(root / "README", "not an image")
    put(root / "notes.txt", "a note")
    fifo(root / "f.jpg")
    keep.append(unix_socket(root / "s.jpg"))
    os.symlink("/dev/zero", root / "z.jpg")
    put(outside / "elsewhere.jpg", jpeg())
    os.symlink(outside / "elsewhere.jpg", root / "outside.jpg")
    os.symlink(root / "ok.jpg", root / "zlink.jpg")  # inside the root: read, and a byte duplicate of ok
    os.symlink(root / "missing.jpg", root / "broken.jpg")
    put(root / "sub" / "deep.webp", encode(noise(), "WEBP", lossless=True))
    os.symlink(root / "sub", root / "sublink")
    put(outside / "folder" / "far.jpg", jpeg())
    os.symlink(outside / "folder", root / "outdir")
    put(root / "huge.jpg", bytes(MAX_FILE_BYTES + 1))
    put(root / "empty.jpg", b"")
    put(root / "text.jpg", "<html>not a jpeg</html>")
    whole = jpeg(64, 64)
    put(root / "truncated.jpg", whole[:len(whole) * 2 // 3])
    put(root / "bomb.png", png_header_only(9500, 9500))  # over max_pixels
    put(root / "megabomb.png", png_header_only(60000, 60000))  # over PIL's own guard too
    put(root / "tiny.png", encode(noise(4, 4), "PNG"))
    put(root / ".hidden.jpg", jpeg())
    put(root / ".cache" / "thumb.jpg", jpeg())
    put(root / "bad name.jpg", jpeg())
    put(root / "twin.jpg", jpeg())
    put(root / "twin.png", encode(noise(), "PNG"))
    put(root / "masked.jpg", jpeg())
    put(root / "masks" / "masked.png", palette_mask(np.zeros((10, 10))))  # wrong size
    put(root / "classes.txt", "cat\ndog\n")
    put(root / "tags.csv", "image,tags\nok.jpg,cat\nghost.jpg,dog\n")
    return keep


def build_voc(root: Path, outside: Path) -> None:
    ids = ["v_ok", "v_missing", "v_fifo", "v_outside", "v_badxml", "v_fifoxml", "v_badmask", "v_fifomask",
           "../etc", "v_ok", "v_copy", "v_size", "v_mask_ok"]
    put(root / "ImageSets" / "Segmentation" / "train.txt", "\n".join(ids) + "\n")
    put(root / "classes.txt", "cat\ndog\n")
    same = jpeg()
    put(root / "JPEGImages" / "v_ok.jpg", same)
    put(root / "JPEGImages" / "v_copy.jpg", same)
    fifo(root / "JPEGImages" / "v_fifo.jpg")
    put(outside / "voc_out.jpg", jpeg())
    os.symlink(outside / "voc_out.jpg", root / "JPEGImages" / "v_outside.jpg")
    for name in ("v_badxml", "v_fifoxml", "v_badmask", "v_fifomask", "v_size", "v_mask_ok"):
        put(root / "JPEGImages" / f"{name}.jpg", jpeg())
    put(root / "Annotations" / "v_badxml.xml", "<annotation><object><name>cat</name>")
    fifo(root / "Annotations" / "v_fifoxml.xml")
    put(root / "SegmentationClass" / "v_badmask.png", palette_mask(np.full((32, 40), 77)))
    fifo(root / "SegmentationClass" / "v_fifomask.png")
    put(root / "SegmentationClass" / "v_size.png", palette_mask(np.zeros((20, 20))))
    mask = np.zeros((32, 40))
    mask[5:20, 5:25] = 2
    put(root / "SegmentationClass" / "v_mask_ok.png", palette_mask(mask))


def build_coco(root: Path) -> None:
    images, annotations = [], []

    def add(name: str, declared=(40, 32), file_size=(40, 32), segmentation=None, write=True):
        number = len(images) + 1
        images.append({"id": number, "file_name": f"{name}.jpg", "width": declared[0], "height": declared[1]})
        if write:
            put(root / "train" / f"{name}.jpg", jpeg(*file_size))
        if segmentation is not None:
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": 1,
                                "iscrowd": 0, "segmentation": segmentation})

    add("c_ok", segmentation=[[2, 2, 30, 2, 30, 20, 2, 20]])
    add("c_nonnumeric", segmentation=[[2, 2, "x", 2, 30, 20]])
    add("c_odd", segmentation=[[2, 2, 30, 2, 30]])
    add("c_rle_string", segmentation={"size": [32, 40], "counts": "!!!~~~"})
    add("c_rle_negative", segmentation={"size": [32, 40], "counts": [10, -5, 1275]})
    add("c_rle_size", segmentation={"size": [10, 10], "counts": [100]})
    add("c_rle_badsize", segmentation={"size": "32x40", "counts": [1280]})
    add("c_declared_huge", declared=(20000, 20000), file_size=(64, 48), segmentation=[[1, 1, 10, 1, 10, 10]])
    add("c_missing", write=False, segmentation=[[1, 1, 10, 1, 10, 10]])
    add("c_segtype", segmentation=42)
    put(root / "annotations" / "instances_train.json", json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    keep = build_folder(base / "folder", outside)
    build_voc(base / "voc", outside)
    build_coco(base / "coco")
    results = {}
    configs = {
        "folder": PrepareConfig(source="folder", root=str(base / "folder"), splits=("train",), rows_per_shard=8,
                                max_file_bytes=MAX_FILE_BYTES),
        "voc": PrepareConfig(source="voc", root=str(base / "voc"), splits=("train",), rows_per_shard=8),
        "coco": PrepareConfig(source="coco", root=str(base / "coco"), splits=("train",), rows_per_shard=8),
    }
    for name, cfg in configs.items():
        out = base / f"manifest-{name}"
        tracemalloc.start()
        summary = build_manifest(cfg, out, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows = {r["image_id"]: r for f in sorted(out.glob("*.parquet")) if f.name != "rejects.parquet"
                for r in pq.read_table(f).to_pylist()}
        rejects = pq.read_table(out / "rejects.parquet").to_pylist()
        results[name] = (summary, rows, rejects, peak)
    yield base, results
    for sock in keep:
        sock.close()


ROW, REJECT, TWICE = "row", "reject", "row and reject"

# (source, image id, outcome, the note or reason it must contain)
CASES = [
    ("folder", "ok", ROW, ""),
    ("folder", "zz_copy", REJECT, "duplicate of ok"),
    ("folder", "zlink", REJECT, "duplicate of ok"),  # a link inside the root is read like a file
    ("folder", "rgb16", ROW, "16-bit RGB scaled to 8-bit"),
    ("folder", "rgba16", ROW, "16-bit RGBA scaled to 8-bit"),
    ("folder", "grey16", ROW, "16-bit scaled to 8-bit -> RGB"),
    ("folder", "cmyk", ROW, "CMYK -> RGB"),
    ("folder", "rotated", ROW, "EXIF orientation 6 applied"),
    ("folder", "anim", REJECT, "unsupported format .gif"),
    ("folder", "photo", REJECT, "unsupported format .heic"),
    ("folder", "README", REJECT, "unsupported format (no extension)"),
    ("folder", "notes", REJECT, "unsupported format .txt"),
    ("folder", "f", REJECT, "not a regular file (fifo)"),
    ("folder", "s", REJECT, "not a regular file (socket)"),
    ("folder", "z", REJECT, "link leaves the dataset root"),
    ("folder", "outside", REJECT, "link leaves the dataset root"),
    ("folder", "broken", REJECT, "broken link"),
    ("folder", "sub__deep", ROW, "WEBP re-encoded as PNG"),
    ("folder", "sublink", REJECT, "link to a folder inside the dataset root, not followed"),
    ("folder", "outdir", REJECT, "link leaves the dataset root"),
    ("folder", "huge", REJECT, f"exceeds prepare.max_file_bytes={MAX_FILE_BYTES}"),
    ("folder", "empty", REJECT, "empty file (0 bytes)"),
    ("folder", "text", REJECT, "not an image (format not recognised)"),
    ("folder", "truncated", REJECT, "corrupt or truncated image"),
    ("folder", "bomb", REJECT, "9500x9500 = 90250000 pixels exceeds max_pixels"),
    ("folder", "megabomb", REJECT, "decompression bomb"),
    ("folder", "tiny", REJECT, "smaller than min_side"),
    ("folder", ".hidden", REJECT, "hidden file"),
    ("folder", ".cache", REJECT, "hidden folder, not read"),
    ("folder", "bad name", REJECT, "has characters outside"),
    ("folder", "twin", TWICE, "duplicate id"),  # twin.jpg taken, twin.png refused
    ("folder", "masked", REJECT, "mask 10x10 differs from image 40x32"),
    ("folder", "ghost", REJECT, "tags row for a missing image 'ghost.jpg'"),
    ("voc", "v_missing", REJECT, "image file not found"),
    ("voc", "v_fifo", REJECT, "not a regular file (fifo)"),
    ("voc", "v_outside", REJECT, "link leaves the dataset root"),
    ("voc", "v_badxml", REJECT, "unreadable annotation XML"),
    ("voc", "v_fifoxml", REJECT, "annotation XML is not a regular file (fifo)"),
    ("voc", "v_badmask", REJECT, "mask value 77 is not a class id"),
    ("voc", "v_fifomask", REJECT, "mask file is not a regular file (fifo)"),
    ("voc", "../etc", REJECT, "contains a path separator"),
    ("voc", "v_ok", TWICE, "duplicate id"),  # listed twice
    ("voc", "v_copy", REJECT, "duplicate of v_ok"),
    ("voc", "v_size", REJECT, "mask 20x20 differs from image 40x32"),
    ("voc", "v_mask_ok", ROW, ""),
    ("coco", "c_ok", ROW, ""),
    ("coco", "c_nonnumeric", REJECT, "annotations[1].segmentation: polygon 0 has a non-numeric or infinite "
                                     "coordinate 'x'"),
    ("coco", "c_odd", REJECT, "annotations[2].segmentation: polygon 0 has an odd number of coordinates"),
    ("coco", "c_rle_string", REJECT, "annotations[3].segmentation"),
    ("coco", "c_rle_negative", REJECT, "annotations[4].segmentation: RLE 'counts' list must hold non-negative"),
    ("coco", "c_rle_size", REJECT, "annotations[5].segmentation: RLE size 10x10 differs from image 40x32"),
    ("coco", "c_rle_badsize", REJECT, "annotations[6].segmentation: RLE 'size' must be [height, width]"),
    ("coco", "c_declared_huge", REJECT, "the image entry declares 20000x20000, the image file is 64x48"),
    ("coco", "c_missing", REJECT, "image file not found"),
    ("coco", "c_segtype", REJECT, "unsupported segmentation of type int"),
]


@pytest.mark.parametrize("source, image_id, outcome, text", CASES,
                         ids=[f"{s}-{i}-{o.replace(' ', '-')}" for s, i, o, _ in CASES])
def test_each_input_has_its_exact_outcome(corpus, source, image_id, outcome, text):
    _, results = corpus
    _, rows, rejects, _ = results[source]
    reasons = [r["reason"] for r in rejects if r["image_id"] == image_id]
    if outcome == TWICE:
        assert image_id in rows and reasons == [text], reasons
    elif outcome == ROW:
        assert image_id in rows and not reasons, reasons
        assert rows[image_id]["notes"] == text if not text else text in rows[image_id]["notes"], rows[image_id]["notes"]
    else:
        assert image_id not in rows
        assert len(reasons) == 1 and text in reasons[0], reasons


def test_every_input_is_counted_once(corpus):
    base, results = corpus
    for name, (summary, rows, rejects, _) in results.items():
        assert summary["inputs"] == len(rows) + len(rejects) == sum(summary["images"].values()) + summary["rejects"]
    # the folder: every entry under the root but the source's own files is a row or a reject
    _, rows, rejects, _ = results["folder"]
    root = base / "folder"
    entries = {e for e in os.listdir(root) if e not in ("masks", "classes.txt", "tags.csv")}
    entries = (entries - {"sub"}) | {"sub/deep.webp"}
    accounted = [Path(r["source_path"]).relative_to(root).as_posix() for r in rows.values()]
    accounted += [Path(r["path"]).relative_to(root).as_posix() for r in rejects if r["image_id"] != "ghost"]
    assert sorted(accounted) == sorted(entries)
    assert {c[1] for c in CASES if c[0] == "folder"} == set(rows) | {r["image_id"] for r in rejects}
    assert len(CASES) + len(EXIT_2) >= 50  # kinds of input in the corpus, most of them bad


def test_sixteen_bit_rgb_is_scaled_not_truncated(corpus):
    base, results = corpus
    _, rows, _, _ = results["folder"]
    row = rows["rgb16"]
    assert row["image"]["path"].endswith(".png")
    stored = decode_rgb(row["image"]["bytes"])
    assert Image.open(io.BytesIO(row["image"]["bytes"])).mode == "RGB"  # 8-bit, not the 16-bit original
    samples = cv2.cvtColor(cv2.imread(row["source_path"], cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
    assert np.array_equal(stored, np.rint(samples * (255.0 / 65535.0)).astype(np.uint8))


def test_declared_sizes_are_checked_before_any_mask_is_drawn(corpus):
    _, results = corpus
    peak = results["coco"][3]
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MiB traced: a 20000x20000 mask (400 MB) was drawn"


def test_duplicates_kept_with_a_note_when_asked(corpus, tmp_path):
    base, _ = corpus
    cfg = PrepareConfig(source="voc", root=str(base / "voc"), splits=("train",), duplicates="keep")
    build_manifest(cfg, tmp_path / "m", progress=False)
    rows = {r["image_id"]: r for f in (tmp_path / "m").glob("train-*.parquet") for r in pq.read_table(f).to_pylist()}
    assert rows["v_copy"]["notes"] == "same bytes as v_ok"


def test_links_outside_the_root_are_followed_when_allowed(corpus, tmp_path):
    base, _ = corpus
    cfg = PrepareConfig(source="folder", root=str(base / "folder"), splits=("train",), max_file_bytes=MAX_FILE_BYTES,
                        links_outside_root=True)
    build_manifest(cfg, tmp_path / "m", progress=False)
    rows = {r["image_id"] for f in (tmp_path / "m").glob("train-*.parquet") for r in pq.read_table(f).to_pylist()}
    rejects = {r["image_id"]: r["reason"] for r in pq.read_table(tmp_path / "m" / "rejects.parquet").to_pylist()}
    assert {"outside", "outdir__far"} <= rows
    assert rejects["z"] == "not a regular file (character device)"  # /dev/zero: never read


# ---------------------------------------------------------------------------------- whole-source errors


def coco_file(root: Path, **change) -> None:
    put(root / "train" / "a.jpg", jpeg())
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 32}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": []}],
            "categories": [{"id": 1, "name": "cat"}]}
    data.update(change)
    put(root / "annotations" / "instances_train.json", json.dumps(data))


def voc_tree(root: Path, xml: str) -> None:
    put(root / "ImageSets" / "Segmentation" / "train.txt", "a\n")
    put(root / "JPEGImages" / "a.jpg", jpeg())
    put(root / "Annotations" / "a.xml", xml)
    put(root / "classes.txt", "cat\n")


EXIT_2 = {
    "coco-annotation-string": ("coco", lambda r: coco_file(r, annotations=["oops"]),
                               ["instances_train.json", "annotations[0] is a str, not an object"]),
    "coco-annotations-not-list": ("coco", lambda r: coco_file(r, annotations={"a": 1}),
                                  ["instances_train.json", "'annotations' is a dict, not a list"]),
    "coco-image-no-height": ("coco", lambda r: coco_file(r, images=[{"id": 1, "file_name": "a.jpg", "width": 40}]),
                             ["instances_train.json", "images[0].height is None, not an integer"]),
    "coco-image-string": ("coco", lambda r: coco_file(r, images=["a.jpg"]),
                          ["images[0] is a str, not an object"]),
    "coco-unknown-category": ("coco", lambda r: coco_file(r, annotations=[{"image_id": 1, "category_id": [1]}]),
                              ["annotations[0].category_id refers to unknown category id [1]"]),
    "voc-unknown-class": ("voc", lambda r: voc_tree(r, "<annotation><object><name>cow</name></object></annotation>"),
                          ["a.xml", "cow"]),
    "voc-no-split-list": ("voc", lambda r: (put(r / "JPEGImages" / "a.jpg", jpeg())),
                          ["split 'train'", "train.txt"]),
}


@pytest.mark.parametrize("case", sorted(EXIT_2))
def test_whole_source_errors_stop_before_any_work(case, tmp_path, capsys):
    source, build, expected = EXIT_2[case]
    root = tmp_path / "data"
    build(root)
    (tmp_path / "params.yaml").write_text(f"prepare:\n  source: {source}\n  root: {root}\n  splits: [train]\n")
    out = tmp_path / "manifest"
    code = prepare.main(["--params", str(tmp_path / "params.yaml"), "--out", str(out), "--metrics",
                         str(tmp_path / "m.json")])
    error = capsys.readouterr().err
    assert code == 2 and all(text in error for text in expected), error
    assert "Traceback" not in error
    assert not out.exists() or not ShardSet(out).index()  # nothing was done


def test_a_duplicate_params_key_stops_prepare(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("prepare:\n  min_side: 16\n  min_side: 100000\n")
    code = prepare.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "m"), "--metrics",
                         str(tmp_path / "m.json")])
    error = capsys.readouterr().err
    assert code == 2 and "params.yaml" in error and "prepare.min_side" in error, error
    assert not (tmp_path / "m").exists()
