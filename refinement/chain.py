"""The refinement chain of the ``refine`` stage: CAMs of a batch of images -> pseudo masks (METHODS.md §2).

CAMs are upsampled (bilinear) to the working size: the original size, long side capped at ``max_side``.
Each *run* turns them into a probability stack, softmax over [constant background plane, present-class CAMs]:
with ``ignore_band`` two runs, background at ``high`` and at ``low``; without it one run at ``bkg``. Every method
of ``methods`` maps the stacks to refined stacks, in order; then each run's arg-max gives a label map, and the two
runs combine as ToCo's: the high run's class; where it says background, 255; where both say background, 0.
- ``[]``: no refiner. Since arg-max of softmax([t, cams]) is a class exactly when its CAM exceeds t, this is the
  plain rule at ``bkg`` or, with the band, the ignore-middle rule (class > high, 255 in (low, high], else 0).
- ``par``: PAR on both runs at once (one affinity per image: it depends on the image only), batched over
  ``batch_size`` images padded to the largest with a valid mask, on ``runtime.device``. As the first method it
  follows ToCo exactly (``models.pseudo.online_pseudo_labels``): CAMs resized to PAR's working resolution, softmax,
  PAR, bilinear upsampling; later in the chain it refines the stacks it is given.
- ``crf``: dense CRF of each run's stack with unary -log(p) (``refinement.crf.crf_inference``), one image at a time on
  CPU. First in the chain this is AFA/ToCo's CRF pseudo label (``crf_two_thresholds``); after ``par`` the
  PAR-refined probabilities are the CRF unaries; ``[crf, par]`` diffuses the CRF marginals with PAR.
- ``random_walk`` (AFA): each image's stack is area-resized to its affinity's token grid, propagated one step by
  T = A' / (row sum + ``random_walk.eps``) (A' = affinities within ``random_walk.radius`` tokens, raised to
  ``random_walk.power``;
  ``models/affinity.py``) and resized back (bilinear). First among the stack methods it runs, as AFA does, on the
  raw [background plane, CAMs] values before the softmax; later it propagates the probabilities and renormalises
  them. Needs the ``affinity`` column of CAM shards dumped from a classifier trained with ``use_afa``.
- ``fg_prior`` (TRT): before the stacks are built, each present CAM is multiplied by the class-agnostic foreground
  map to the power ``fg_power`` and renormalised (``models/trt.py``); it must come first. Needs the ``fg`` column
  of a classifier trained with ``use_trt``.
- ``superpixel``: maps averaged within SLIC superpixels of the image at working size (``refinement/superpixel.py``;
  superpixels of about ``superpixel.area`` px).
- ``feature_walk``: ``feature_walk.steps`` random-walk steps along the cosine affinity of a frozen pretrained
  backbone's token features, computed here from the image (``refinement/features.py``,
  ``models/feature_affinity.py``); the rows of its transition sum to 1.
  ``superpixel`` and ``feature_walk`` are linear and keep constants, so where they lead the chain (before any of
  par, crf, random_walk) they act on the CAMs themselves, before the thresholds (walked CAMs are rescaled to their
  own peaks, as WeCLIP renormalises them); the chain then goes on as if it started at the next method (ToCo's
  order when that is ``par``). Later in the chain they act on the probabilities of both runs, which stay
  normalised.
Masks come back to the original size (``out_sizes``) from the refined probabilities: each run's stack is upsampled
(bilinear, in bands of rows) and the rule above applied at that size, so a mask of a photo larger than the working
size has smooth boundaries, not the working size's pixels enlarged. ``confidence`` = mean over non-ignored pixels of
the maximum probability of the deciding stack (the high run; the only run without the band); the object confidence
the same mean over the pixels labelled with a class only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from config.schema import RefineParams
from models.affinity import propagate
from models.par import refine_with_par, working_size
from models.pseudo import background_logits, cams_with_background, present_softmax
from models.trt import fg_prior
from refinement.superpixel import pool_stacks, slic_segments
from shards.records import IGNORE_INDEX

COLUMN_OF = {"random_walk": ("affinity", "use_afa"), "fg_prior": ("fg", "use_trt")}
CAM_LEVEL = ("superpixel", "feature_walk")  # linear, constant-keeping: leading the chain, they refine the CAMs


def check_methods(methods: tuple[str, ...], first_row: dict | None, source: str = "") -> None:
    """Refuse, before any work, a chain whose methods need a CAM column that the CAM shards do not hold."""
    for method in methods:
        if method in COLUMN_OF and first_row is not None and first_row.get(COLUMN_OF[method][0]) is None:
            column, flag = COLUMN_OF[method]
            raise ValueError(f"refine.methods: {method} needs the CAM column {column!r}, which {source or 'the CAM shards'}"
                             f" lack (row {first_row.get('image_id')!r}); train the classifier with "
                             f"train_classifier.{flag}: true and dump its CAMs again")


def crf_step(rgbs: list[np.ndarray], stacks: torch.Tensor, counts: list[int], runs: int, cfg) -> torch.Tensor:
    """CRF of every image's every run on its own pixels and present slots. stacks: (B, runs * (P+1), H, W)."""
    from refinement.crf import crf_inference_runs

    out = stacks.detach().cpu().clone()
    planes = stacks.shape[1] // runs  # P + 1
    for b, rgb in enumerate(rgbs):
        h, w = rgb.shape[:2]
        image = rgb if rgb.flags.writeable else np.array(rgb)  # pydensecrf needs a writeable buffer
        spans = [(run * planes, run * planes + counts[b] + 1) for run in range(runs)]  # absent slots are 0: left out
        # the runs share one set of pairwise kernels (they depend on the image only): same marginals, half the set-up
        refined = crf_inference_runs(image, [out[b, lo:hi, :h, :w].numpy() for lo, hi in spans], cfg)
        for (lo, hi), marginals in zip(spans, refined):
            out[b, lo:hi, :h, :w] = torch.from_numpy(marginals)
    return out.to(stacks.device)


def walk_stacks(stacks: torch.Tensor, sizes: list[tuple[int, int]], affinities: list, p: RefineParams,
                runs: int, renormalise: bool) -> torch.Tensor:
    """``random_walk`` on every image's own pixels: (B, runs·(P+1), H, W) → same. ``affinities``: per image
    (affinity (N, N) array, (h, w) token grid), or None (an image whose row has none is left as it is)."""
    out = stacks.clone()
    for b, ((h, w), entry) in enumerate(zip(sizes, affinities)):
        if entry is None:
            continue
        affinity, grid = entry
        walked = propagate(stacks[b, :, :h, :w], torch.as_tensor(affinity, device=stacks.device), grid,
                           p.random_walk.radius, p.random_walk.power, p.random_walk.eps)
        if renormalise:  # probabilities: every run's planes sum to 1 again (T's rows sum to less than 1)
            walked = walked.view(runs, -1, h, w)
            walked = (walked / walked.sum(dim=1, keepdim=True).clamp(min=1e-12)).view(-1, h, w)
        out[b, :, :h, :w] = walked
    return out


def superpixel_step(stacks: torch.Tensor, rgbs: list[np.ndarray], sizes: list[tuple[int, int]],
                    p: RefineParams) -> torch.Tensor:
    """``superpixel``: every image's maps (B, C, H, W) averaged within its SLIC superpixels, on its own pixels."""
    cfg = p.superpixel
    segments = [slic_segments(rgb, cfg.area, cfg.compactness, cfg.sigma) for rgb in rgbs]
    return pool_stacks(stacks, sizes, segments)


def feature_walk_step(stacks: torch.Tensor, rgbs: list[np.ndarray], sizes: list[tuple[int, int]],
                      p: RefineParams, device: torch.device) -> torch.Tensor:
    """``feature_walk``: every image's maps (B, C, H, W) walked along its backbone features' affinity."""
    from models.feature_affinity import walk_maps
    from refinement.features import token_features

    cfg = p.feature_walk
    out = stacks.clone()
    for b, ((h, w), features) in enumerate(zip(sizes, token_features(rgbs, cfg, device))):
        out[b, :, :h, :w] = walk_maps(stacks[b, :, :h, :w], features.to(stacks.device), cfg.power, cfg.radius,
                                      cfg.steps)
    return out


def leading_cam_methods(methods: list[str]) -> list[str]:
    """The methods at the head of the chain that refine the CAMs themselves (``CAM_LEVEL``)."""
    lead = []
    for method in methods:
        if method not in CAM_LEVEL:
            break
        lead.append(method)
    return lead


def refine_cam_maps(cam_t: torch.Tensor, rgbs: list[np.ndarray], sizes: list[tuple[int, int]], methods: list[str],
                    p: RefineParams, device: torch.device) -> torch.Tensor:
    """The CAMs (B, P, H, W) through the leading ``superpixel`` / ``feature_walk`` methods, before any threshold.
    A walked CAM is rescaled to its own peak: averaging lowers peaks, and the thresholds are set for max-normalised
    CAMs (absent slots and padding stay 0)."""
    for method in methods:
        if method == "superpixel":
            cam_t = superpixel_step(cam_t, rgbs, sizes, p)
        elif method == "feature_walk":
            peaks = cam_t.amax(dim=(-2, -1), keepdim=True)  # (B, P, 1, 1)
            walked = feature_walk_step(cam_t, rgbs, sizes, p, device).clamp(min=0)
            cam_t = walked * (peaks / walked.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12))
    return cam_t


def refine_chunk(rgbs: list[np.ndarray], cams: list[np.ndarray], classes: list[list[int]], p: RefineParams,
                 device: torch.device, extras: list[dict] | None = None,
                 out_sizes: list[tuple[int, int]] | None = None) -> list[tuple[np.ndarray, float, float | None]]:
    """(mask uint8, confidence, object confidence) per image; rgbs are (h, w, 3) uint8 at working size. Masks are
    (H, W) of ``out_sizes`` (the images' original sizes; default: the working size), made from the probabilities
    upsampled to that size. The object confidence is the deciding probability's mean over the pixels labelled with
    a class (None without any): unlike ``confidence``, not dominated by the background.

    ``extras``: per image {"fg": (ch, cw) array or None, "affinity": ((N, N) array, grid) or None}, the seed
    method columns that ``fg_prior`` and ``random_walk`` read.
    """
    extras = extras or [{} for _ in rgbs]
    sizes = [rgb.shape[:2] for rgb in rgbs]
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    slots = max(1, max(len(c) for c in classes))
    batch = len(rgbs)
    cam_t = torch.zeros(batch, slots, height, width)
    images = torch.zeros(batch, 3, height, width)
    valid = torch.zeros(batch, height, width, dtype=torch.bool)
    slot_to_label = torch.zeros(batch, slots + 1, dtype=torch.long)  # slot 0 = background
    for b, ((h, w), rgb, cam, ids) in enumerate(zip(sizes, rgbs, cams, classes)):
        if len(ids):
            cam = F.interpolate(torch.from_numpy(cam)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            if "fg_prior" in p.methods:
                fg = extras[b].get("fg")
                if fg is None:
                    raise ValueError("refine.methods: fg_prior needs the CAM shards' fg column (use_trt)")
                fg = F.interpolate(torch.from_numpy(fg)[None, None], size=(h, w), mode="bilinear",
                                   align_corners=False)[0, 0]
                cam = fg_prior(cam, fg, p.fg_power)
            cam_t[b, : len(ids), :h, :w] = cam
            slot_to_label[b, 1: len(ids) + 1] = torch.tensor(ids)
        images[b, :, :h, :w] = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
        valid[b, :h, :w] = True
    present = (slot_to_label[:, 1:] > 0).float()  # (B, P)
    cam_t, images, valid, present = (t.to(device) for t in (cam_t, images, valid, present))
    backgrounds = (p.thresholds.high, p.thresholds.low) if p.ignore_band else (p.thresholds.bkg,)
    n_runs = len(backgrounds)
    methods = [m for m in p.methods if m != "fg_prior"]  # the methods that map stacks to stacks
    cam_level = leading_cam_methods(methods)
    if cam_level:  # superpixel / feature_walk first: they refine the CAMs, and the chain goes on from the next
        cam_t = refine_cam_maps(cam_t, rgbs, sizes, cam_level, p, device)
        methods = methods[len(cam_level):]
    affinities = [e.get("affinity") for e in extras]
    if "random_walk" in methods and any(a is None for a in affinities):
        raise ValueError("refine.methods: random_walk needs the CAM shards' affinity column (use_afa)")
    if methods[:1] == ["random_walk"]:  # AFA's order: walk the raw [background, CAMs] values, then softmax
        raw = torch.cat([background_logits(cam_t, t) for t in backgrounds], dim=1)
        raw = walk_stacks(raw, sizes, affinities, p, n_runs, renormalise=False)
        stacks = torch.cat([present_softmax(r, present)
                            for r in raw.view(batch, n_runs, slots + 1, height, width).unbind(1)], dim=1)
        methods = methods[1:]
    else:
        # ToCo's order when PAR comes first: resize CAMs to PAR's working resolution, then softmax
        size = working_size(height, width, p.par.scale) if methods[:1] == ["par"] else None
        stacks = torch.cat([cams_with_background(cam_t, present, t, size) for t in backgrounds], dim=1)
    for method in methods:  # (B, runs * (P+1), H, W) -> same
        if method == "par":
            stacks = refine_with_par(images, stacks, p.par, valid)
        elif method == "crf":
            stacks = crf_step(rgbs, stacks, [len(c) for c in classes], n_runs, p.crf)
        elif method == "random_walk":
            if stacks.shape[-2:] != (height, width):
                stacks = F.interpolate(stacks, size=(height, width), mode="bilinear", align_corners=False)
            stacks = walk_stacks(stacks, sizes, affinities, p, n_runs, renormalise=True)
        elif method in CAM_LEVEL:  # on the probabilities: rows sum to 1, so every run stays normalised
            if stacks.shape[-2:] != (height, width):
                stacks = F.interpolate(stacks, size=(height, width), mode="bilinear", align_corners=False)
            stacks = (superpixel_step(stacks, rgbs, sizes, p) if method == "superpixel"
                      else feature_walk_step(stacks, rgbs, sizes, p, device))
    if stacks.shape[-2:] != (height, width):
        stacks = F.interpolate(stacks, size=(height, width), mode="bilinear", align_corners=False)
    runs = stacks.view(batch, len(backgrounds), slots + 1, height, width).cpu()
    results = []
    for b, (h, w) in enumerate(sizes):
        size = tuple(out_sizes[b]) if out_sizes is not None else (h, w)
        mask, top = labels_at(runs[b, :, :, :h, :w], slot_to_label[b], size, p.ignore_band)
        kept, objects = top[mask != IGNORE_INDEX], top[(mask != IGNORE_INDEX) & (mask != 0)]
        results.append((mask, float(kept.mean()) if kept.size else 0.0,
                        float(objects.mean()) if objects.size else None))
    return results


BAND_VALUES = 1 << 22  # values of one band of upsampled probabilities (16 MB of float32): bounds a huge photo's memory


def labels_at(runs: torch.Tensor, slot_to_label: torch.Tensor, size: tuple[int, int], ignore_band: bool
              ) -> tuple[np.ndarray, np.ndarray]:
    """One image's runs (R, P+1, h, w) -> (mask (H, W) uint8, top (H, W) float32) at ``size``: the probabilities
    upsampled bilinearly (as ``F.interpolate``, align_corners=False) a band of output rows at a time, the rule of
    the module docstring applied to them, and the deciding run's maximum probability."""
    n_runs, planes, h, w = runs.shape
    height, width = size
    mask, top = np.empty((height, width), np.uint8), np.empty((height, width), np.float32)
    flat = runs.reshape(1, n_runs * planes, h, w)
    xs = ((torch.arange(width) + 0.5) * (w / width) - 0.5) * (2.0 / w) + (1.0 / w) - 1.0  # normalised, as grid_sample
    band = max(1, BAND_VALUES // max(1, n_runs * planes * width))
    for start in range(0, height, band):
        stop = min(height, start + band)
        if (height, width) == (h, w):
            part = flat[:, :, start:stop]
        else:
            ys = ((torch.arange(start, stop) + 0.5) * (h / height) - 0.5) * (2.0 / h) + (1.0 / h) - 1.0
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)[None]  # (1, rows, W, 2): x, y
            part = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
        part = part.view(n_runs, planes, stop - start, width)
        labels = [slot_to_label[r.argmax(dim=0)] for r in part]  # (rows, W) per run
        out = labels[0]
        if ignore_band:
            out = torch.where(labels[0] == 0, torch.where(labels[1] == 0, 0, IGNORE_INDEX), labels[0])
        mask[start:stop] = out.numpy().astype(np.uint8)
        top[start:stop] = part[0].amax(dim=0).numpy()
    return mask, top
