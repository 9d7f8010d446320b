#!/usr/bin/env bash
# One GPU call (at most 8 minutes): AMP (bf16) vs fp32 agreement of the CPFS loss and of each
# harness's first steps, step throughput, the fraction of step time waiting for data, and
# decode_device=cuda (nvJPEG batch decode + window resampling on the GPU, as the harnesses'
# `--set decode_device=cuda` runs it) against the CPU path: images/s and agreement in grey levels.
# Generated data only. Without CUDA: prints what it would run and exits 0.
# Usage: benchmarks/gpu_check.sh [--write-rates] [--steps 20] [--workers 8] [--budget-s 420]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec timeout 480 "$PYTHON" -m benchmarks.gpu_check "$@"
