"""Decoding untrusted image and mask files into arrays we can rely on.

Every input image goes through :func:`decode_image`: it either returns an RGB ``uint8`` array plus the
bytes to store, or raises :class:`~shards.records.RejectError` with a reason for the rejects table. Nothing
that a file can contain (zero bytes, text, a truncated JPEG, a 60000x60000 PNG, a CMYK or 16-bit scan) may
crash ``prepare`` or be taken silently in a broken state.

Choices, so that nobody has to guess:
- Truncated files are rejected: decoding is forced (``load()``) under PIL's default
  ``ImageFile.LOAD_TRUNCATED_IMAGES = False`` (a RuntimeError if some import switched it on); PNGs are
  also ``verify()``-ed (chunk CRCs).
- Size limits are checked on the header (``width * height`` against ``max_pixels``) before any pixel is
  decoded. PIL's own bomb guard still applies above ``2 * Image.MAX_IMAGE_PIXELS`` (an error, rejected);
  its warning zone is superseded by ``max_pixels``.
- Transparency is composited onto white (what a viewer shows on a page); a fully opaque alpha is dropped.
- 16-bit data (grey, and RGB / RGBA PNGs, read at full depth) is scaled by 255/65535 (full range to full range,
  no contrast stretch) and re-encoded as an 8-bit PNG with a note; 32-bit integer data
  in the 16-bit range likewise; float data in [0, 1] is scaled by 255, in [0, 255] rounded; anything else
  is min-max stretched (and the note says so).
- CMYK is converted by PIL's naive formula (no ICC colour management).
- Multi-frame files (GIF, TIFF, MPO) keep their first frame.
- The original bytes are stored only for a plain RGB JPEG/PNG that needed no change (and for a camera MPO,
  a JPEG whose extra frames decoders skip); anything converted is re-encoded as PNG (lossless with respect
  to the decoded pixels).

Masks: :func:`decode_mask` turns a palette/grey PNG (indices) or an RGB colour mask (through the palette)
into a ``(H, W) uint8`` array of class ids and checks its size and values; :func:`encode_mask` /
:func:`decode_mask_png` are the palette-PNG format of every mask this project writes.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shards.files import read_source_file
from shards.records import IGNORE_INDEX, RejectError

_EXIF_ORIENTATION = 0x0112
_GREY_MODES = ("L", "1")
_ALPHA_MODES = ("RGBA", "LA", "RGBa", "La", "PA")
_WHITE = 255
MAX_MASK_BYTES = 256 * 2**20  # a mask read from a path (a PNG of a 90-megapixel image is far smaller)


@dataclass
class DecodedImage:
    """A decoded input image: pixels to work with, and the bytes to store in the manifest."""

    rgb: np.ndarray  # (H, W, 3) uint8
    data: bytes  # encoded image as stored (the original bytes, or a PNG re-encoding)
    format: str  # "jpeg" | "png"
    notes: str  # conversions applied ("" when the original file was taken as is)


def _open(data: bytes, name: str) -> Image.Image:
    """Open without decoding pixels; every PIL failure becomes a reject."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check (on the header, below) is the authority in PIL's warning zone.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RejectError(f"{name}: decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise RejectError(f"{name}: not an image (format not recognised)") from None
    except Exception as exc:  # noqa: BLE001 - untrusted input: any parser failure is a reject
        raise RejectError(f"{name}: unreadable image header ({type(exc).__name__}: {exc})") from None


def _check_size(width: int, height: int, *, name: str, max_pixels: int, min_side: int) -> None:
    if width <= 0 or height <= 0:
        raise RejectError(f"{name}: zero-size image {width}x{height}")
    if width * height > max_pixels:
        raise RejectError(f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                          "(possible decompression bomb)")
    if min(width, height) < min_side:
        raise RejectError(f"{name}: image {width}x{height} is smaller than min_side={min_side}")


def _scale_to_uint8(values: np.ndarray, mode: str) -> tuple[np.ndarray, str]:
    """Map single-channel 16-bit / 32-bit int / float pixels to uint8; returns the array and how."""
    values = values.astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0.0 and high <= 65535.0):
        # Full range to full range: 65535 -> 255. No stretch, so a dark scan stays dark.
        return np.rint(values * (255.0 / 65535.0)).astype(np.uint8), "16-bit scaled to 8-bit"
    if mode == "F" and low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8), "float [0, 1] scaled to 8-bit"
    if mode == "F" and low >= 0.0 and high <= 255.0:
        return np.rint(values).astype(np.uint8), "float [0, 255] rounded to 8-bit"
    span = high - low if high > low else 1.0
    return np.rint((values - low) * (255.0 / span)).astype(np.uint8), f"min-max stretched from [{low:g}, {high:g}]"


def _composite_on_white(rgba: Image.Image) -> tuple[Image.Image, str]:
    alpha = np.asarray(rgba.getchannel("A"))
    if alpha.min() == 255:
        return rgba.convert("RGB"), "opaque alpha dropped"
    background = Image.new("RGBA", rgba.size, (_WHITE, _WHITE, _WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB"), "alpha composited onto white"


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """Convert any supported mode to RGB; the note says what was done ("" for RGB)."""
    mode = im.mode
    if mode in ("RGB", "L") and "transparency" in im.info:  # a PNG tRNS colour key: one colour transparent
        rgb, how = _composite_on_white(im.convert("RGBA"))
        return rgb, f"{mode} with transparent colour -> RGB, {how}"
    if mode == "RGB":
        return im, ""
    if mode in _GREY_MODES:
        return im.convert("L").convert("RGB"), f"grey {mode} -> RGB"
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        if has_alpha:
            rgb, how = _composite_on_white(im.convert("RGBA"))
            return rgb, f"palette {mode} -> RGB, {how}"
        return im.convert("RGB"), f"palette {mode} -> RGB"
    if mode in _ALPHA_MODES:
        rgb, how = _composite_on_white(im.convert("RGBA"))
        return rgb, f"{mode} -> RGB, {how}"
    if mode == "CMYK":
        return im.convert("RGB"), "CMYK -> RGB (no ICC)"
    if mode in ("RGBX", "YCbCr"):
        return im.convert("RGB"), f"{mode} -> RGB"
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey, how = _scale_to_uint8(np.asarray(im), mode)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB"), f"{mode} {how} -> RGB"
    raise RejectError(f"unsupported image mode {mode}")


def _png_depth(data: bytes) -> tuple[int, bool]:
    """A PNG's ``(bit depth, has colour)`` from its IHDR chunk (bytes 24 and 25 of the file)."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return 0, False
    return data[24], data[25] in (2, 6)  # colour type 2 = RGB, 6 = RGBA


def _sixteen_bit_colour(data: bytes, im: Image.Image) -> Image.Image:
    """A 16-bit RGB(A) PNG at full depth, scaled like 16-bit grey (PIL keeps only the high byte of each sample)."""
    import cv2  # imported here: only 16-bit colour PNGs need it

    values = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if values is None or values.dtype != np.uint16 or values.ndim != 3 or values.shape[:2] != im.size[::-1]:
        return im  # cannot read it at full depth: PIL's high bytes, still with the note
    channels = cv2.COLOR_BGRA2RGBA if values.shape[2] == 4 else cv2.COLOR_BGR2RGB
    scaled = np.rint(cv2.cvtColor(values, channels) * (255.0 / 65535.0)).astype(np.uint8)
    converted = Image.fromarray(scaled, "RGBA" if scaled.shape[2] == 4 else "RGB")
    converted.info = {k: v for k, v in im.info.items() if k != "transparency"}  # a 16-bit colour key: not ours
    return converted


def decode_image(data: bytes, *, name: str, max_pixels: int, min_side: int) -> DecodedImage:
    """Decode an untrusted encoded image fully; raise :class:`RejectError` for anything not usable.

    ``name`` only labels messages (a path or id). See the module docstring for the conversion rules.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was switched on by some import; decode_image "
                           "would then take truncated files silently")
    if not data:
        raise RejectError(f"{name}: empty file (0 bytes)")
    im = _open(data, name)
    width, height = im.size
    _check_size(width, height, name=name, max_pixels=max_pixels, min_side=min_side)
    source_format = (im.format or "").upper()
    notes: list[str] = []
    try:
        if source_format == "PNG":
            # verify() checks every chunk's CRC (load() does not): a damaged IDAT is caught here.
            _open(data, name).verify()
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            im.seek(0)
            notes.append(f"first of {frames} frames")
        im.load()  # force the full decode: truncated data raises here
        if source_format == "PNG" and _png_depth(data) == (16, True):
            im = _sixteen_bit_colour(data, im)
            notes.append(f"16-bit {im.mode} scaled to 8-bit")
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in range(2, 9):
            im = ImageOps.exif_transpose(im)
            notes.append(f"EXIF orientation {orientation} applied")
        im, how = _to_rgb(im)
    except RejectError as exc:
        raise RejectError(f"{name}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted input: any decoder failure is a reject
        raise RejectError(f"{name}: corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    if how:
        notes.append(how)
    rgb = np.array(im, dtype=np.uint8)  # (H, W, 3), a writeable copy
    if not notes and source_format in ("JPEG", "PNG"):
        return DecodedImage(rgb=rgb, data=bytes(data), format=source_format.lower(), notes="")
    if source_format == "MPO" and len(notes) == 1 and frames > 1:
        # Phone cameras write MPO: a plain JPEG followed by extra images that every decoder skips, so the
        # original bytes decode to these pixels (re-encoding as PNG would cost 5-10x the space).
        return DecodedImage(rgb=rgb, data=bytes(data), format="jpeg", notes=f"MPO, {notes[0]}")
    if source_format not in ("JPEG", "PNG"):
        notes.append(f"{source_format or 'unknown'} re-encoded as PNG")
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG")
    return DecodedImage(rgb=rgb, data=buffer.getvalue(), format="png", notes="; ".join(notes))


# ---------------------------------------------------------------------------------------------- masks


def _flat_palette(palette: Sequence) -> list[int]:
    """Accept ``[(r, g, b), ...]`` or a flat ``[r, g, b, r, g, b, ...]``; return a flat list of 768 ints."""
    flat = [int(v) for entry in palette for v in entry] if palette and not isinstance(palette[0], int) \
        else [int(v) for v in palette]
    if len(flat) % 3:
        raise ValueError(f"palette length {len(flat)} is not a multiple of 3")
    return (flat + [0] * 768)[:768]


def _valid_ids(num_classes: int) -> list[int]:
    return list(range(num_classes + 1)) + [IGNORE_INDEX]


def _colours_to_ids(rgb: np.ndarray, *, name: str, num_classes: int, palette: Sequence) -> np.ndarray:
    """Map an (H, W, 3) colour mask to class ids through the palette; unknown colours are rejected."""
    flat = _flat_palette(palette)
    lookup = {}
    for class_id in _valid_ids(num_classes):
        colour = tuple(flat[3 * class_id: 3 * class_id + 3])
        lookup.setdefault(colour, class_id)
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]  # (H, W)
    uniques, inverse = np.unique(keys, return_inverse=True)
    ids = np.empty(len(uniques), dtype=np.uint8)
    for index, key in enumerate(uniques.tolist()):
        colour = (key >> 16, (key >> 8) & 255, key & 255)
        if colour not in lookup:
            raise RejectError(f"{name}: mask colour {colour} is not a class colour of the palette")
        ids[index] = lookup[colour]
    return ids[inverse.reshape(keys.shape)]


def decode_mask(data_or_array, *, name: str, size: tuple[int, int] | None, num_classes: int,
                palette: Sequence) -> np.ndarray:
    """Decode a ground-truth or label mask into ``(H, W) uint8`` class ids (0 = background, 255 = ignore).

    ``data_or_array``: encoded bytes, a path, a PIL image or an array (``(H, W)`` ids or ``(H, W, 3)``
    colours). Palette and grey images are taken as indices; RGB(A) images are mapped through ``palette``.
    ``size`` is the image's ``(width, height)`` the mask must match (``None`` skips that check).
    Values must be in ``{0..num_classes, 255}``.
    """
    source = data_or_array
    if isinstance(source, (str, os.PathLike)):
        source = read_source_file(source, max_bytes=MAX_MASK_BYTES, what="mask file")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise RejectError(f"{name}: empty mask file (0 bytes)")
        source = _open(bytes(source), name)
    if isinstance(source, Image.Image):
        try:
            source.load()
            if source.mode in ("RGB", "RGBA", "RGBX"):
                array = np.asarray(source.convert("RGB"))
            elif source.mode in ("P", "L", "1") or source.mode.startswith("I"):
                array = np.asarray(source.convert("L") if source.mode == "1" else source)
            else:
                raise RejectError(f"unsupported mask mode {source.mode}")
        except RejectError as exc:
            raise RejectError(f"{name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - untrusted input
            raise RejectError(f"{name}: corrupt or truncated mask ({type(exc).__name__}: {exc})") from None
    else:
        array = np.asarray(source)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        array = _colours_to_ids(array[..., :3].astype(np.uint8), name=name, num_classes=num_classes,
                                palette=palette)
    if array.ndim != 2:
        raise RejectError(f"{name}: mask has shape {array.shape}, expected (H, W)")
    height, width = array.shape
    if size is not None and (width, height) != tuple(size):
        raise RejectError(f"{name}: mask {width}x{height} differs from image {size[0]}x{size[1]}")
    values = np.flatnonzero(np.bincount(array.ravel(), minlength=256)) if array.dtype == np.uint8 \
        else np.unique(array)
    bad = values[~np.isin(values, _valid_ids(num_classes))]
    if bad.size:
        raise RejectError(f"{name}: mask value {bad[0].item()} is not a class id (0..{num_classes}) "
                          f"or {IGNORE_INDEX}")
    return np.array(array, dtype=np.uint8)  # a writeable, contiguous copy


def encode_mask(mask: np.ndarray, palette: Sequence) -> bytes:
    """Encode ``(H, W) uint8`` class ids as a palette ("P" mode) PNG."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be (H, W) uint8, got {mask.shape} {mask.dtype}")
    image = Image.fromarray(mask, "P")
    image.putpalette(_flat_palette(palette))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """Read a mask written by :func:`encode_mask` (or any palette/grey PNG) back to ``(H, W) uint8`` ids."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"mask PNG has mode {image.mode}, expected P or L")
        return np.array(image, dtype=np.uint8)


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def long_side_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) of an image scaled so that its long side is ``long_side``: each side multiplied by
    ``long_side / max(height, width)`` and rounded (Python's ``round``), at least 1. ``long_side <= 0`` keeps the size.

    The one size rule of every "long side to N" resize (network inputs, stored CAMs, refine's working size,
    overlays), so that sizes computed without the pixels match the resized pixels exactly.
    """
    if long_side <= 0 or max(height, width) == long_side:
        return height, width
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_long(rgb: np.ndarray, long_side: int, resample=Image.BILINEAR) -> np.ndarray:
    """``rgb`` resized to :func:`long_side_size` (the array itself when that is its size)."""
    h, w = rgb.shape[:2]
    size = long_side_size(h, w, long_side)
    if size == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size[::-1], resample))
