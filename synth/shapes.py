"""The embedded "shapes" dataset: a procedural generator that writes a PASCAL-VOC-layout folder.

Each class has a characteristic outline *and* a characteristic fill texture; colours are drawn from one
shared range for every class, so colour carries no class information and a classifier trained on image tags
must learn shape and texture. Weak supervision is made hard on purpose:

- textured, cluttered backgrounds (smooth noise, gradients, distractor blobs, line clutter), some of which
  carry striped blobs that look like object texture;
  ``backgrounds`` and ``clutter`` make a harder variant (e.g. ``[clutter, lines]`` at ``clutter`` 2);
- context bias: "boat" sits on a "water" background and "plane" on a "sky" background with probability
  ``context_bias``, and those backgrounds are rare otherwise, so CAMs learn to leak onto the context;
- occlusion: later objects are drawn over earlier ones; the mask holds only visible pixels, and an object
  whose visible part is too small is not drawn at all (so tags always equal the classes in the mask);
- a VOC-style 255 band on every visible outline, slight blur, sensor noise and JPEG compression.

Image ``index`` of ``split`` comes from ``np.random.default_rng([seed, split_index, index])``: the output is
identical run to run and independent of generation order, so a process pool can write it.
numpy + PIL only (this module is in the torch-free ``shards`` layer).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from config.loader import to_dict
from config.schema import RuntimeConfig, ShapesConfig
from parallel.shard_map import map_tasks
from shards.records import IGNORE_INDEX, voc_palette
from shards.voc_xml import annotation_xml

CLASS_NAMES: tuple[str, ...] = ("disc", "square", "triangle", "star", "ring", "cross", "boat", "plane")
# Class -> fill texture; the texture is attached to the object (it rotates with it).
CLASS_TEXTURES: dict[str, str] = {
    "disc": "dots", "square": "checker", "triangle": "diagonal", "star": "concentric",
    "ring": "sectors", "cross": "grid", "boat": "zigzag", "plane": "speckle",
}
# Class -> the background it usually sits on (context bias).
CONTEXT_BACKGROUNDS: dict[str, str] = {"boat": "water", "plane": "sky"}
# The generic backgrounds (images without a context background) are drawn from ``cfg.backgrounds``: noise,
# gradient, clutter, lines.
SPLITS: tuple[str, ...] = ("train", "val")


@dataclass(frozen=True)
class ObjectPlan:
    name: str
    size: float  # circumscribed diameter in px
    centre: tuple[float, float]  # (x, y)
    angle: float  # radians


@dataclass(frozen=True)
class ScenePlan:
    """What an image will show, drawn before any pixel is rendered (objects back to front)."""

    height: int
    width: int
    background: str
    objects: tuple[ObjectPlan, ...]


# ---------------------------------------------------------------- planning


def _rng(cfg: ShapesConfig, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([cfg.seed, SPLITS.index(split), index])


def _plan(cfg: ShapesConfig, rng: np.random.Generator) -> ScenePlan:
    side = rng.uniform(cfg.min_side, cfg.max_side)
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))  # width / height
    width = int(np.clip(round(side * math.sqrt(aspect)), cfg.min_side, cfg.max_side))
    height = int(np.clip(round(side / math.sqrt(aspect)), cfg.min_side, cfg.max_side))
    short = min(width, height)

    count = int(rng.integers(1, cfg.max_objects + 1))
    names = [CLASS_NAMES[i] for i in rng.integers(0, len(CLASS_NAMES), size=count)]
    # sqrt(U) leans towards large objects (mean at 2/3 of the range), as in photographs of things.
    sizes = short * (cfg.min_object + (cfg.max_object - cfg.min_object) * np.sqrt(rng.random(count)))
    # The front object is never occluded; keep it large enough that its core survives the ignore band.
    floor = min(0.2, cfg.max_object) * short
    if sizes.max() < floor:
        sizes[-1] = floor

    objects: list[ObjectPlan] = []
    for name, size in zip(names, sizes):
        radius = size / 2
        # Centre at most half a radius outside the frame; prefer spots that overlap others only partly.
        for _ in range(6):
            cx = rng.uniform(radius * 0.5, max(width - radius * 0.5, radius * 0.5 + 1))
            cy = rng.uniform(radius * 0.5, max(height - radius * 0.5, radius * 0.5 + 1))
            if all(math.hypot(cx - o.centre[0], cy - o.centre[1]) >= 0.35 * (radius + o.size / 2) for o in objects):
                break
        tilt = rng.uniform(-0.3, 0.3) if name == "boat" else rng.uniform(0, 2 * math.pi)
        objects.append(ObjectPlan(name, float(size), (float(cx), float(cy)), float(tilt)))

    # Context bias: the first context class in drawing order decides; a failed draw falls back to a generic
    # background, so P(context background | its class alone) == context_bias exactly.
    anchors = [o.name for o in objects if o.name in CONTEXT_BACKGROUNDS]
    if anchors:
        if rng.random() < cfg.context_bias:
            background = CONTEXT_BACKGROUNDS[anchors[0]]
        else:
            background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    else:
        u = rng.random()
        if u < cfg.context_elsewhere:
            background = "water"
        elif u < 2 * cfg.context_elsewhere:
            background = "sky"
        else:
            background = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    return ScenePlan(height, width, background, tuple(objects))


def plan_image(cfg: ShapesConfig, split: str, index: int) -> ScenePlan:
    """The scene plan of one image (objects before occlusion drops), without painting it: cheap statistics."""
    return _layout(cfg, _rng(cfg, split, index))[0]


# ---------------------------------------------------------------- geometry


def _circle(radius: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)


def _unit_polygons(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Outline of a class in the unit disc, as (polygon (N, 2), fill) pairs drawn in order (fill 0 cuts)."""
    if name == "disc":
        return [(_circle(1.0), 1)]
    if name == "square":
        return [(np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, 0.7], [-0.7, 0.7]]), 1)]
    if name == "triangle":
        t = np.deg2rad([-90, 30, 150])
        return [(np.stack([np.cos(t), np.sin(t)], 1), 1)]
    if name == "star":
        t = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.4, 0.5))
        return [(np.stack([r * np.cos(t), r * np.sin(t)], 1), 1)]
    if name == "ring":
        return [(_circle(1.0), 1), (_circle(rng.uniform(0.45, 0.6)), 0)]
    if name == "cross":
        a, b = 0.3, 1.0 / math.sqrt(1 + 0.09)  # arm half-width; arm end inside the unit disc
        pts = [[a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a],
               [-a, -a], [-a, -b]]
        return [(np.array(pts), 1)]
    if name == "boat":  # side view: hull, mast, main sail and jib; y points down
        hull = np.array([[-1.0, 0.3], [1.0, 0.3], [0.65, 0.7], [-0.65, 0.7]])
        main = np.array([[0.0, -0.95], [0.0, 0.3], [-0.8, 0.3]])
        jib = np.array([[0.12, -0.75], [0.75, 0.3], [0.12, 0.3]])
        mast = np.array([[-0.04, -0.95], [0.1, -0.95], [0.1, 0.3], [-0.04, 0.3]])
        return [(hull, 1), (main, 1), (jib, 1), (mast, 1)]
    if name == "plane":  # top view, nose towards +x
        body = _circle(1.0) * np.array([0.98, 0.13])
        wings = np.array([[0.28, -0.09], [-0.18, -0.92], [-0.4, -0.92], [-0.16, -0.09],
                          [-0.16, 0.09], [-0.4, 0.92], [-0.18, 0.92], [0.28, 0.09]])
        tail = np.array([[-0.7, -0.05], [-0.92, -0.38], [-1.0, -0.38], [-0.94, 0.0],
                         [-1.0, 0.38], [-0.92, 0.38], [-0.7, 0.05]])
        return [(body, 1), (wings, 1), (tail, 1)]
    raise ValueError(f"unknown class {name!r}")


def _object_mask(obj: ObjectPlan, stretch: float, height: int, width: int,
                 rng: np.random.Generator) -> np.ndarray:
    """The full (unoccluded) object as a (H, W) bool mask, clipped to the frame."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    rotation = np.array([[cos, sin], [-sin, cos]])  # row vectors: p @ R rotates by +angle
    for poly, fill in _unit_polygons(obj.name, rng):
        pts = poly * np.array([stretch, 1 / stretch]) * (obj.size / 2) @ rotation + np.array(obj.centre)
        draw.polygon([tuple(p) for p in pts], fill=fill)
    return np.asarray(canvas, dtype=bool)


# ---------------------------------------------------------------- textures and colours


def _two_colours(rng: np.random.Generator, min_distance: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours from the range shared by every class, far enough apart for the texture to show."""
    first = rng.uniform(0, 255, 3)
    candidates = rng.uniform(0, 255, (16, 3))
    far = np.linalg.norm(candidates - first, axis=1) >= min_distance
    second = candidates[int(np.argmax(far))] if far.any() else 255 - first
    return first, second


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(H, W) float32 in [0, 1]: a random grid of ``cells`` across, upsampled bicubically."""
    gh, gw = max(2, round(cells * height / max(height, width))), max(2, round(cells * width / max(height, width)))
    grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """A 0/1 float pattern over object-local coordinates ``u, v`` (pixels, origin at the object centre)."""
    phase = rng.uniform(0, 1, 2)
    if kind == "dots":
        fu, fv = (u / period + phase[0]) % 1 - 0.5, (v / period + phase[1]) % 1 - 0.5
        return (fu * fu + fv * fv < rng.uniform(0.22, 0.32) ** 2).astype(np.float32)
    if kind == "checker":
        return ((np.floor(u / period + phase[0]) + np.floor(v / period + phase[1])) % 2).astype(np.float32)
    if kind == "diagonal":
        angle = np.deg2rad(45 + rng.uniform(-8, 8))
        return (((u * math.cos(angle) + v * math.sin(angle)) / period + phase[0]) % 1 < 0.5).astype(np.float32)
    if kind == "concentric":
        return ((np.hypot(u, v) / period + phase[0]) % 1 < 0.5).astype(np.float32)
    if kind == "sectors":
        spokes = int(rng.integers(8, 13))
        return ((np.arctan2(v, u) / (2 * np.pi) * spokes + phase[0]) % 1 < 0.5).astype(np.float32)
    if kind == "grid":
        width = rng.uniform(0.2, 0.3)
        on = ((u / period + phase[0]) % 1 < width) | ((v / period + phase[1]) % 1 < width)
        return on.astype(np.float32)
    if kind == "zigzag":
        tri = np.abs((u / period + phase[0]) % 1 - 0.5)  # triangle wave in [0, 0.5]
        return (((v / period) + tri * rng.uniform(1.0, 1.6)) % 1 < 0.5).astype(np.float32)
    if kind == "speckle":  # camouflage blotches in image coordinates
        h, w = u.shape
        blotches = _smooth_noise(rng, h, w, max(2, round(max(h, w) / period)))
        return (blotches > 0.5).astype(np.float32)
    if kind == "stripes":  # distractor texture for background blobs, any angle
        angle = rng.uniform(0, np.pi)
        return (((u * math.cos(angle) + v * math.sin(angle)) / period) % 1 < 0.5).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _paint_object(canvas: np.ndarray, obj: ObjectPlan, visible: np.ndarray, rng: np.random.Generator) -> None:
    """Fill the visible pixels of ``obj`` on ``canvas`` (H, W, 3 float32) with its class texture."""
    ys, xs = np.nonzero(visible)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - obj.centre[0], yy - obj.centre[1]
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # object-local axes
    period = rng.uniform(0.7, 1.3) * float(np.clip(obj.size / 8, 4, 12))
    pattern = _texture(CLASS_TEXTURES[obj.name], u, v, period, rng)
    first, second = _two_colours(rng)
    shade = 1 + rng.uniform(-0.25, 0.25) * u / obj.size  # soft light falloff across the object
    colour = (first + (second - first) * pattern[..., None]) * shade[..., None]  # (h, w, 3)
    region = visible[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1][region] = colour[region]


# ---------------------------------------------------------------- backgrounds


def _random_blob(rng: np.random.Generator, centre: tuple[float, float], radius: float) -> list[tuple]:
    """An irregular closed outline (no class looks like it): a circle with a random radial wobble."""
    t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    wobble = 1 + sum(rng.uniform(0, 0.3) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    r = radius * wobble / wobble.max()
    return [(centre[0] + a, centre[1] + b) for a, b in zip(r * np.cos(t), r * np.sin(t))]


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    first, second = _two_colours(rng, min_distance=40)
    return first + (second - first) * t[..., None]


def _background(kind: str, rng: np.random.Generator, height: int, width: int,
                clutter: float = 1.0) -> np.ndarray:
    """(H, W, 3) float32 background of the given kind; ``clutter`` multiplies its distractors."""
    short = min(height, width)
    if kind == "noise":
        fields = [_smooth_noise(rng, height, width, int(rng.integers(3, 8))) for _ in range(3)]
        low, high = rng.uniform(0, 120, 3), rng.uniform(130, 255, 3)
        image = low + (high - low) * np.stack(fields, -1)
        return image + 40 * (_smooth_noise(rng, height, width, 40)[..., None] - 0.5)
    if kind == "gradient":
        return _gradient(rng, height, width) + 30 * (_smooth_noise(rng, height, width, 24)[..., None] - 0.5)
    if kind in ("clutter", "lines"):
        image = _gradient(rng, height, width)
        canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        count = round(int(rng.integers(8, 30)) * clutter)
        for _ in range(count):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            centre = (rng.uniform(0, width), rng.uniform(0, height))
            if kind == "lines":
                length, angle = rng.uniform(0.1, 0.6) * short, rng.uniform(0, np.pi)
                end = (centre[0] + length * math.cos(angle), centre[1] + length * math.sin(angle))
                draw.line([centre, end], fill=colour, width=int(rng.integers(1, 5)))
            else:
                draw.polygon(_random_blob(rng, centre, rng.uniform(0.02, 0.07) * short), fill=colour)
        image = np.asarray(canvas, dtype=np.float32)
        if kind == "clutter":  # a few striped blobs: texture alone must not give a class away
            for _ in range(round(int(rng.integers(1, 4)) * clutter)):
                blob = Image.new("L", (width, height), 0)
                centre = (rng.uniform(0, width), rng.uniform(0, height))
                ImageDraw.Draw(blob).polygon(_random_blob(rng, centre, rng.uniform(0.04, 0.09) * short), fill=1)
                inside = np.asarray(blob, dtype=bool)
                yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
                pattern = _texture("stripes", xx, yy, rng.uniform(4, 9), rng)
                first, second = _two_colours(rng)
                image[inside] = (first + (second - first) * pattern[..., None])[inside]
        return image
    if kind == "water":  # horizontal waves whose period grows towards the viewer
        deep = np.array([rng.uniform(10, 60), rng.uniform(60, 130), rng.uniform(110, 200)])
        light = np.clip(deep + rng.uniform(40, 90), 0, 255)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        period = rng.uniform(5, 9) * (0.6 + 0.8 * yy / height)
        wobble = 0.25 * np.sin(2 * np.pi * xx / rng.uniform(20, 60) + rng.uniform(0, 2 * np.pi))
        waves = 0.5 + 0.5 * np.sin(2 * np.pi * (yy / period + wobble))
        shimmer = _smooth_noise(rng, height, width, 30)
        t = np.clip(0.7 * waves + 0.6 * (shimmer - 0.5), 0, 1)
        return deep + (light - deep) * t[..., None]
    if kind == "sky":  # blue at the top, paler at the horizon, soft clouds
        top = np.array([rng.uniform(50, 110), rng.uniform(110, 170), rng.uniform(190, 245)])
        bottom = np.array([rng.uniform(180, 225), rng.uniform(200, 235), rng.uniform(225, 255)])
        t = (np.arange(height, dtype=np.float32) / height)[:, None, None]
        image = top + (bottom - top) * t * np.ones((1, width, 1), np.float32)
        clouds = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(clouds)
        for _ in range(int(rng.integers(2, 8))):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            rx, ry = rng.uniform(0.08, 0.25) * short, rng.uniform(0.04, 0.1) * short
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(rng.integers(120, 230)))
        alpha = np.asarray(clouds.filter(ImageFilter.GaussianBlur(rng.uniform(4, 10))), np.float32) / 255
        return image + (245 - image) * alpha[..., None]
    raise ValueError(f"unknown background {kind!r}")


# ---------------------------------------------------------------- labels


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: pixels within a ``width``-px band straddling every label change (VOC's 255 outline).

    A pixel is in the band when a (width + 1)-px window around it holds two labels; the window is
    offset by half a pixel so that the band is exactly ``width`` px wide across a straight edge.
    """
    if width <= 0:
        return np.zeros(labels.shape, dtype=bool)
    before, after = (width + 1) // 2, width // 2

    def window(array: np.ndarray, axis: int, reduce) -> np.ndarray:
        pad = [(0, 0), (0, 0)]
        pad[axis] = (before, after)
        padded = np.pad(array, pad, mode="edge")
        out = array.copy()
        for shift in range(before + after + 1):
            out = reduce(out, np.take(padded, range(shift, shift + array.shape[axis]), axis=axis))
        return out

    high = window(window(labels, 0, np.maximum), 1, np.maximum)
    low = window(window(labels, 0, np.minimum), 1, np.minimum)
    return high != low


def _visible_layout(cfg: ShapesConfig, plan: ScenePlan, masks: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Which objects to draw and the (H, W) owner map (-1 = background) of their visible pixels.

    Dropping an occluded object only uncovers background, so the loop can only shrink and ends quickly.
    """
    keep = list(range(len(masks)))
    while True:
        owner = np.full((plan.height, plan.width), -1, dtype=np.int16)
        for i in keep:
            owner[masks[i]] = i
        band = boundary_band(owner, cfg.boundary_width)
        survivors = []
        for i in keep:
            visible = owner == i
            shown = visible.sum()
            if shown >= cfg.min_visible_fraction * masks[i].sum() and (visible & ~band).sum() >= cfg.min_core_pixels:
                survivors.append(i)
        if survivors == keep:
            return owner, keep
        keep = survivors


def _layout(cfg: ShapesConfig, rng: np.random.Generator, attempts: int = 8):
    """Plan a scene and find its visible objects; re-plan (same stream, so still deterministic) in the rare
    case that nothing survives the band, which only tiny images with tiny objects can reach."""
    for _ in range(attempts):
        plan = _plan(cfg, rng)
        h, w = plan.height, plan.width
        masks = [_object_mask(o, math.exp(rng.uniform(-0.15, 0.15)), h, w, rng) for o in plan.objects]
        owner, keep = _visible_layout(cfg, plan, masks)
        if keep:
            break
    return plan, owner, keep


def _render(cfg: ShapesConfig, split: str, index: int):
    rng = _rng(cfg, split, index)
    plan, owner, keep = _layout(cfg, rng)
    h, w = plan.height, plan.width

    canvas = _background(plan.background, rng, h, w, cfg.clutter).astype(np.float32)
    labels = np.zeros((h, w), dtype=np.uint8)
    objects = []
    for i in keep:
        obj, visible = plan.objects[i], owner == i
        _paint_object(canvas, obj, visible, rng)
        labels[visible] = CLASS_NAMES.index(obj.name) + 1
        ys, xs = np.nonzero(visible)
        objects.append((obj.name, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    # The band follows instance outlines, so two touching objects of one class are separated too (as in VOC).
    labels[boundary_band(owner, cfg.boundary_width)] = IGNORE_INDEX

    # Mild camera realism: optical blur, then sensor noise (JPEG comes at write time).
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    image = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))), dtype=np.float32)
    image = image + rng.normal(0, rng.uniform(1.5, 5.0), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels, objects, plan


def generate_image(cfg: ShapesConfig, split: str, index: int
                   ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, tuple[int, int, int, int]]]]:
    """Image ``index`` of ``split``: ``(image (H, W, 3) uint8, mask (H, W) uint8, objects)``.

    ``mask`` holds 0 = background, k = ``CLASS_NAMES[k - 1]``, 255 = ignore band. ``objects`` lists every
    drawn instance, back to front, as ``(class name, (x0, y0, x1, y1))`` of its visible pixels: 0-based with
    exclusive ends, the box convention of shards/voc_xml.py (which writes them as VOC's 1-based inclusive
    ``bndbox``).
    """
    image, labels, objects, _ = _render(cfg, split, index)
    return image, labels, objects


# ---------------------------------------------------------------- writing


def image_id(split: str, index: int) -> str:
    return f"shapes_{split}_{index:06d}"


_PALETTE = [c for rgb in voc_palette() for c in rgb]


def write_one(task: tuple[ShapesConfig, str, str, int]) -> tuple[str, list[str], str]:
    cfg, root, split, index = task
    image, labels, objects, plan = _render(cfg, split, index)
    name = image_id(split, index)
    Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{name}.jpg"), quality=cfg.jpeg_quality)
    mask = Image.fromarray(labels)
    mask.putpalette(_PALETTE)  # "L" becomes "P": pixel = class index, VOC colours
    mask.save(os.path.join(root, "SegmentationClass", f"{name}.png"), optimize=False)
    with open(os.path.join(root, "Annotations", f"{name}.xml"), "wb") as f:
        f.write(annotation_xml(f"{name}.jpg", plan.height, plan.width, objects, folder="shapes"))
    return split, [cls for cls, _ in objects], plan.background


def _remove_stale_temporaries(root: Path) -> None:
    """Delete ``root.tmp-<pid>`` folders left by killed runs (their process is gone)."""
    for path in root.parent.glob(f"{root.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def write_dataset(cfg: ShapesConfig, root: str | Path, progress: bool = True, workers: int | None = None) -> dict:
    """Write the whole dataset in VOC layout under ``root``; returns counts (also in ``generator.json``).

    Everything goes to ``root.tmp-<pid>`` first and is renamed into place at the end (an existing ``root``
    is removed then), so a killed run never leaves a complete-looking half dataset.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True)

    start = time.perf_counter()
    sizes = {"train": cfg.num_train, "val": cfg.num_val}
    tasks = [(cfg, str(tmp), split, i) for split in SPLITS for i in range(sizes[split])]
    if workers is None:  # a pool pays for itself only past a few dozen images
        workers = min(2, os.cpu_count() or 1) if len(tasks) >= 64 else 1
    results = []
    stream = map_tasks("synth.shapes:write_one", tasks, RuntimeConfig(num_workers=workers, num_threads=1))
    for _, result in tqdm(stream, total=len(tasks), desc="shapes", unit="img", disable=not progress):
        results.append(result)
    results.sort(key=lambda r: r[0])  # completion order varies; the summary is built in image order

    for split in SPLITS:
        ids = "".join(f"{image_id(split, i)}\n" for i in range(sizes[split]))
        (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids)
    (tmp / "classes.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))

    per_class = {name: 0 for name in CLASS_NAMES}
    backgrounds: dict[str, dict[str, int]] = {}  # background -> class -> images (context bias at a glance)
    for _, classes, background in results:
        row = backgrounds.setdefault(background, {})
        for name in classes:
            per_class[name] += 1
        for name in set(classes):
            row[name] = row.get(name, 0) + 1
    counts = {
        "train": cfg.num_train, "val": cfg.num_val, "objects": sum(per_class.values()),
        "objects_per_class": per_class,
        "background_images": {k: sum(1 for r in results if r[2] == k) for k in sorted(backgrounds)},
        "background_class_images": {k: dict(sorted(v.items())) for k, v in sorted(backgrounds.items())},
        "seconds": round(time.perf_counter() - start, 2), "workers": workers,
    }
    meta = {"generator": "synth.shapes", "config": to_dict(cfg), "classes": list(CLASS_NAMES),
            "class_textures": CLASS_TEXTURES, "context_backgrounds": CONTEXT_BACKGROUNDS, "counts": counts}
    (tmp / "generator.json").write_text(json.dumps(meta, indent=2) + "\n")

    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return counts
