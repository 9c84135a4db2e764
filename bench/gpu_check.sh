#!/usr/bin/env bash
# GPU readiness check of the paper preset (bench/gpu_check.py): ToCo training throughput (fp32 eager, bf16 + SDPA,
# bf16 + torch.compile; batch 4 and the largest that fits), 300 real training steps on generated VOC-size images,
# CAM dump throughput and DeepLabV2-ResNet-101 training throughput, into one JSON results file.
#
#   bash bench/gpu_check.sh                              # GPU machine, < 8 minutes; bench/gpu_check_results.json
#   bash bench/gpu_check.sh --out /tmp/gpu_check.json    # results elsewhere
#   bash bench/gpu_check.sh --device cpu --quick         # toy sizes on a CPU (tests/bench/test_gpu_check.py)
#
# Needs python3 with torch, timm, numpy, pillow and pyarrow (and pyyaml/tqdm, which timm brings); no dvc, dvclive,
# prefect or pydensecrf. The interpreter: $PYTHON if set, else the project's .venv if it runs, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c \
    "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('timm')))" 2>/dev/null; then
  py=.venv/bin/python
else
  py="$(command -v python3 || command -v python || true)"
fi
if [[ -z "$py" ]]; then
  echo "gpu_check: no python3 on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_check.py "$@"
