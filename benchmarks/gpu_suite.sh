#!/usr/bin/env bash
# The GPU figures in one command on one GPU machine, in at most 8 minutes (each part has its own time limit):
# Predictor images/s for vit_b16 at T = 20, 150, 847 in float32 and bfloat16 with peak GPU memory; the forward's
# achieved FLOP/s against the GPU's matmul rate; bfloat16
# against float32 labels; the labelling pipeline against a bare Predictor loop over the same 64 images; the tests
# that run the model, on the GPU.
#
#   bash benchmarks/gpu_suite.sh 2>&1 | tee gpu_suite.log
#
# python3 must hold a CUDA torch. Packages it lacks (open_clip_torch, ray, duckdb, s3fs, moto, ...) can come as
# wheels in .whl/ (installed into /tmp/site first); a part whose packages are missing says so and is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
MODEL="${MODEL:-vit_b16}"  # MODEL=tiny: a quick check of the script itself, on any machine
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
export PYTHONUNBUFFERED=1
started=$SECONDS
has() { "$PY" -c "import $1" 2>/dev/null; }
part() { echo; echo "== $1 ($((SECONDS - started)) s into the suite)"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available() and torch.cuda.get_device_name())"
if ! has open_clip; then echo "open_clip_torch is missing: carry its wheel (and ftfy, wcwidth) in .whl/"; exit 1; fi

part "1. Predictor, $MODEL (random weights), one 640x480 image: images/s and peak GPU memory"
timeout 120 "$PY" benchmarks/model_forward.py --model "$MODEL" --classes 20 150 847 --precision float32 bfloat16 \
    --repeats 5

part "1b. forward efficiency at T = 150, bfloat16: achieved FLOP/s against the GPU's own bf16 matmul rate"
timeout 30 "$PY" benchmarks/forward_efficiency.py --model "$MODEL" --classes 150 --precision bfloat16 --repeats 10

part "2. bfloat16 against float32 at T = 150: time, probability difference, label agreement"
timeout 45 "$PY" benchmarks/precision.py --model "$MODEL" --classes 150

part "3. labelling pipeline against a bare Predictor loop, the same 64 images, T = 150 (ade150), bfloat16"
if has ray && has duckdb && has s3fs; then
    timeout 135 "$PY" benchmarks/labelling_throughput.py --arch "$MODEL" --images 64 --vocab-preset ade150 \
        --batch-size 8 --precision bfloat16
else
    echo "skipped: ray, duckdb or s3fs is missing (carry their wheels in .whl/)"
fi

part "4. the tests that run the model (Predictor, model, labelling stages and pipeline) on the GPU"
if has pytest && has ray && has moto && has duckdb && has polars; then
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider --timeout 120 tests/test_predictor.py tests/test_model.py \
        tests/test_labelling_stages.py tests/test_labelling.py 2>&1 | tail -15
else
    echo "skipped: pytest, ray, moto, duckdb or polars is missing (carry their wheels in .whl/)"
fi
echo
echo "suite done in $((SECONDS - started)) s"
