"""DVC stage ``dump_cams``: multi-scale + flip CAMs of every manifest row (METHODS.md §1 "Multi-scale CAM").

Consumes the manifest shards of ``prepare`` (the splits in ``dump_cams.splits``) and the trained classifier folder of
``train_classifier`` (``model.safetensors`` + ``config.json``). Produces ``data/cams/``: one CAM shard per manifest
shard, same name, same row order (schema in ``shards/cams.py``: fp16, present classes only, at ``cam_size``), plus
``metrics/cams.json`` {miou, threshold, best_miou, best_threshold, per_class} and ``metrics/cams_curve.json``.

Classes of a row: its tags; an untagged row (tags null) gets the classes whose sigmoid score exceeds
``predict_threshold``, with ``tag_source = "predicted"``; when none does, no class is forced on it: it is stored
with no class and ``tag_source = "unknown"`` (``refine.no_known_class`` decides its pseudo label). Every class's
score is always stored (``all_scores``), and the image's OOD score (``ood_score``: its pooled feature's distance to
the classifier's training images, in units of the held-out quantile; training/feature_stats.py) when the
classifier folder has ``feature_stats.safetensors``; ``metrics/cams.json`` counts the rows above 1.

Batching without changing the result: each image is resized to ``image_size`` on its long side and padded
bottom/right (black, as the training crops' padding) to a multiple of ``pad_multiple``; images of one padded shape
form a batch and ``valid`` masks keep padding out of the CAM normalisation and of the pooled scores. Padding to the
largest image *of a batch* instead would change an image's CAM with its neighbours (a ViT attends to every padded
token and interpolates its position embedding to the padded grid), so a CAM would depend on batch size and shard
order. Here an image's input is a function of the image alone: batched CAMs equal batch-1 CAMs up to rounding.

On a CPU, ``dump_cams.workers`` > 1 dumps in that many processes of one torch thread each (with fewer shards than
workers, each shard as pieces of whole batches; the stage writes every shard itself), and the classifier's
convolutions carry their BatchNorms folded in (``models/fold.py``): float rounding only, like ``runtime.num_threads``,
so neither is in the shard fingerprint.

Resumable per shard: fingerprint = the shard-deciding params + classifier hash + code version + the manifest shard's
sha256 + device type (bf16 on CUDA changes values). A rerun recomputes only missing or stale shards and prunes
shards that do not belong. Memory is bounded by one shard's encoded images plus one batch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from config.cli import stage_arguments
from config.schema import Params, load_params_or_exit
from labelling.cams import dump_cams


def run(params: Params, manifest_dir: Path, classifier_dir: Path, out_dir: Path, metrics_path: Path | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Dump the CAM shards; returns {computed, skipped, removed, images, seconds, metrics}."""
    return dump_cams(params, manifest_dir, classifier_dir, out_dir, metrics_path, progress=progress)

def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, manifest="data/manifest", classifier="data/classifier", out="data/cams",
                           metrics="metrics/cams.json")
    params = load_params_or_exit(args.params)
    run(params, Path(args.manifest), Path(args.classifier), Path(args.out), Path(args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
