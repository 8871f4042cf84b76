#!/usr/bin/env bash
# Download the peer baselines (Inf-CL, Cut Cross-Entropy) as wheels for the target
# GPU hosts (Python 3.12, no internet there) into benchmarks/wheels/, which git
# ignores: copy it along with the checkout and gpu_check.sh installs them.
#
#   bash benchmarks/fetch_peer_wheels.sh
#
# Both are pure Python; their needs (torch, triton, numpy) are on those machines.
# Checked 2026-11-23: inf_cl 1.2.1 and cut-cross-entropy 25.1.1 import under
# Python 3.12.1, torch 2.11.0+cu130, triton 3.6.0 (scripts/gpu_stack_check.sh's venv).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform any --platform manylinux_2_28_x86_64 -d wheels \
  "inf_cl==${INF_CL_VERSION:-1.2.1}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}"
ls -l wheels/*.whl
