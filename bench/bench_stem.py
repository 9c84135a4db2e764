"""Forward time of the CPU preset's frozen CNN stem in NCHW vs channels_last (NHWC) memory format.

    python bench/bench_stem.py            # batch 32 at 128, 256 and 384 px, the params.yaml stem

``models/stem.py`` runs the stem channels_last; this shows why: oneDNN's depthwise and 1x1 convolutions are faster
in NHWC on CPU. Both rows run in the same process, on the same random input; the ratio is against NCHW.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.schema import load_params  # noqa: E402
from models.stem import create_stem  # noqa: E402


def timed(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    module(x[:2])  # warm-up: oneDNN primitive creation
    start = time.perf_counter()
    for _ in range(repeats):
        module(x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(Path(__file__).resolve().parent.parent / "params.yaml"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    p = load_params(args.params).train_classifier.model
    cnn = create_stem(p.stem, output_stride=p.stem_output_stride, frozen=True).module  # the timm CNN itself
    torch.manual_seed(0)
    print(f"# {p.stem} (output stride {p.stem_output_stride}) forward, batch {args.batch}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("| input | NCHW s | channels_last s | speed-up |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        for size in args.sizes:
            x = torch.randn(args.batch, 3, size, size)
            nchw = timed(cnn.to(memory_format=torch.contiguous_format), x.contiguous(), args.repeats)
            nhwc = timed(cnn.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last),
                         args.repeats)
            print(f"| {size} px | {nchw:.3f} | {nhwc:.3f} | {nchw / nhwc:.2f}x |")


if __name__ == "__main__":
    main()
