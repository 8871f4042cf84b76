#!/usr/bin/env bash
# The target GPU machines' software stack, checked on a machine without a GPU.
#
#   bash scripts/gpu_stack_check.sh [VENV]        (default VENV: /tmp/mimac-gpu-stack)
#
# The GPU machines run Python 3.12, torch 2.11.0+cu130, triton 3.6.0 and nvcc
# 13.0; CI runs Python 3.11, torch 2.13 (CPU) and the newest triton. This script
# makes a Python 3.12 venv with the GPU machines' torch (the CUDA build, from
# PyPI, ~3.5 GB with its CUDA wheels) and triton, then
#   1. builds both extensions: the CUDA one for sm_80 and sm_90 with the local
#      nvcc against torch's real CUDA headers (CI only sees them through
#      csrc/emulation's stand-ins), and loads it;
#   2. compiles every Triton kernel configuration for sm_90 and reports spills
#      (benchmarks/triton_resources.py);
#   3. runs the README's test command (Triton interpreted, CUDA emulated).
# So an API or header difference between the two stacks shows up here, not in
# the GPU machine's few minutes. Needs python3.12 ($PYTHON312), nvcc (found
# like any build: $CUDA_HOME, else the root nvcc reports) and the internet.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/mimac-gpu-stack}
PY312=${PYTHON312:-python3.12}

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY312" -m venv "$VENV"
fi
# triton 3.6's interpreter turns 1-element arrays into ints, which numpy 2.5
# refuses (seen: 2.5.5 fails, 2.2.6 works); the GPU machine compiles instead.
"$VENV/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.3"
"$VENV/bin/python" -m pip install -q -e ".[test,train]"
"$VENV/bin/python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

export MIMAC_KERNELS_CACHE="$VENV/kernels-cache" TORCH_CUDA_ARCH_LIST="8.0;9.0"
"$VENV/bin/python" -m mimac_kernels.build
# "skipped" is success for the build command; here the CUDA extension must load.
"$VENV/bin/python" -c "from mimac_kernels import extension; ops = extension.load('cuda'); \
print('cuda extension loads:', extension.library_path(extension.spec_for('cuda')), ops.forward)"
# Registers and spills of every Triton kernel configuration under this triton, for sm_90.
"$VENV/bin/python" -m benchmarks.triton_resources --out "$VENV/triton_resources.json" | tail -1
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q tests benchmarks --benchmark-disable \
  -p no:cacheprovider
