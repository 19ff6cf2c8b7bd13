#!/usr/bin/env bash
# Prepare the wheels bench/gpu_suite.py needs on a lent GPU machine (Python 3.12, torch/transformers/timm/
# pyarrow/fsspec/scikit-image preinstalled, no network), then run it there with the device tool:
#
#   bench/device_wheels.sh                       # here: downloads ~11 MB of wheels into .whl/ (git-ignored)
#   # device run, carry [".whl"], timeout_s 560:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/gpu_suite.py --budget-s 450
#
# ray (79 MB for cp312) does not fit the device tool's 64 MiB carry limit, so the suite's pipeline section
# reports "skipped: ray missing" there; every model section (agreement, official vs production, compile,
# training) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 pycocotools==2.0.11 webdataset==1.0.2 braceexpand==0.1.7 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh .whl
