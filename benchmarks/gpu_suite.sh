#!/usr/bin/env bash
# Every GPU check and figure of docs/BENCHMARKS.md, "GPU", in one go, sized for 10 minutes of
# device time on an H200 (most of it compiling):
#
#     benchmarks/gpu_suite.sh OUT_DIR [PYTHON] [PATH/TO/published/sgformer.py]
#
# CUDA tests; then sgformer_s against Swin-T and the accuracy peers (Swin-S, ConvNeXt-S),
# bf16, compiled (inductor's default mode for inference at batch 256, reduce-overhead, i.e.
# CUDA graphs, for training at batch 128) and eager; with the published file, eager sgformer_s
# against it. Each part's output goes to OUT_DIR/*.log; a failing part is reported and the
# rest still run.
set -u
out=${1:?output folder}
python=${2:-python}
published=${3:-}
[ -n "$published" ] && published=$(realpath "$published")
mkdir -p "$out"
out=$(realpath "$out")  # both paths hold after the cd below
cd "$(dirname "$0")/.."
failed=()

part() {  # part NAME COMMAND...: run, keep the log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    if ! PYTHONUNBUFFERED=1 "$@" >"$out/$name.log" 2>&1; then
        failed+=("$name")
    fi
    grep -v -i warn "$out/$name.log" | tail -n 20
}

models=(sgformer_s swin_tiny_patch4_window7_224 swin_small_patch4_window7_224 convnext_small)
bench=("$python" -m sgformer benchmark --models "${models[@]}" --device cuda --amp bf16)

part cuda_tests "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
part compiled_infer "${bench[@]}" --compile --mode infer -b 256 --warmup 3 --repeats 10 \
    --output "$out/compiled_infer"
part compiled_train "${bench[@]}" --compile reduce-overhead --channels-last --mode train \
    -b 128 --warmup 3 --repeats 10 --output "$out/compiled_train"
part eager "${bench[@]}" --mode infer train -b 256 --train-batch-size 128 --warmup 3 \
    --repeats 10 --output "$out/eager"
if [ -n "$published" ]; then
    part published "$python" benchmarks/compare_published.py --published-code "$published" \
        --device cuda --amp bf16 --mode infer train -b 256 --train-batch-size 128 --warmup 3 \
        --repeats 10
fi

if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (see $out/<name>.log)"
    exit 1
fi
