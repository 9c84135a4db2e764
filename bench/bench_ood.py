"""How well the OOD score tells pictures the classifier never saw from its own kind of images.

Scores, with a trained classifier folder (``feature_stats.safetensors`` beside the weights) and the dump params of
a params file, exactly as ``dump_cams`` computes them (labelling.cams.image_features):
- the manifest's val images (held out from the statistics' fit: the in-distribution reference), and
- the colour photos shipped with scikit-image (astronaut, cat, coffee, rocket, motorcycle, galaxies, tissue, retina,
  plus the chelsea/coffee/rocket photos cropped to four quarters: 20 photos), resized to the manifest's size range.
Prints the share above 1 for each, the medians, and the ROC AUC of the score as a photo-vs-val detector.

    python bench/bench_ood.py [--classifier data/classifier] [--manifest data/manifest] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry",
          "retina")


def photos(long_side: int) -> list[np.ndarray]:
    import skimage.data as skdata
    from PIL import Image

    out = []
    for name in PHOTOS:
        pixels = getattr(skdata, name)()
        rgb = (pixels[0] if isinstance(pixels, tuple) else pixels)[..., :3]
        crops = [rgb]
        if name in ("chelsea", "coffee", "rocket"):
            h, w = rgb.shape[:2]
            crops += [rgb[y: y + h // 2, x: x + w // 2] for y in (0, h // 2) for x in (0, w // 2)]
        for crop in crops:
            image = Image.fromarray(np.ascontiguousarray(crop))
            image.thumbnail((long_side, long_side))
            out.append(np.asarray(image))
    return out


def auc(positive: list[float], negative: list[float]) -> float:
    """P(score of a random positive > score of a random negative), ties half."""
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="data/classifier")
    parser.add_argument("--manifest", default="data/manifest")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    from config.schema import load_params
    from labelling.cams import image_features
    from shards.images import decode_rgb
    from shards.manifest import manifest_files
    from shards.sampling import RowIndex, RowReader
    from training import runtime as rt
    from training.classifier_model import load_classifier

    if not (Path(args.classifier) / "model.safetensors").is_file():
        print(f"{args.classifier}: no trained classifier (run `dvc repro train_classifier` first)", file=sys.stderr)
        return 2
    params = load_params(args.params)
    env = rt.setup_runtime("cpu", params.runtime.num_threads)
    model, _ = load_classifier(args.classifier, env.device)
    stats = model.feature_stats
    if stats is None:
        print(f"{args.classifier}: no feature_stats.safetensors (train the classifier again)", file=sys.stderr)
        return 2
    index = RowIndex(manifest_files(Path(args.manifest), "val"))
    reader = RowReader(index, columns=["image"])
    started = time.perf_counter()
    val = [decode_rgb(reader.row(i)["image"]["bytes"]) for i in range(len(index))]
    long_side = int(np.median([max(rgb.shape[:2]) for rgb in val]))

    def scores(images: list[np.ndarray]) -> list[float]:
        return [float(stats.scores(image_features(model, rgb, params.dump_cams, env)[None])[0]) for rgb in images]

    val_scores, photo_scores = scores(val), scores(photos(long_side))
    seconds = time.perf_counter() - started
    result = {
        "classifier": args.classifier, "statistics": {"images": stats.images, "held_out": stats.held_out,
                                                      "quantile": stats.quantile},
        "val": {"images": len(val_scores), "above_1": sum(s > 1 for s in val_scores),
                "median": round(float(np.median(val_scores)), 3)},
        "photos": {"images": len(photo_scores), "long_side": long_side, "above_1": sum(s > 1 for s in photo_scores),
                   "median": round(float(np.median(photo_scores)), 3),
                   "min": round(min(photo_scores), 3)},
        "auc_photo_vs_val": round(auc(photo_scores, val_scores), 4),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
