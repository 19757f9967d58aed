#!/usr/bin/env bash
# Every GPU check and figure of docs/BENCHMARKS.md, "GPU", in one go (about 15 minutes on an
# H200, most of it compiling):
#
#     benchmarks/gpu_suite.sh PATH/TO/published/sgformer.py OUT_DIR [PYTHON]
#
# CUDA tests, then eager bf16 S/M/B against the published code and peers (inference batch
# 256, training batch 128), channels-last, compiled (default mode, and reduce-overhead for
# training), the CUDA-graph check and the profiles. Each part's output goes to OUT_DIR/*.log;
# a failing part is reported and the rest still run.
set -u
published=$(realpath "${1:?path of the published sgformer.py}")
out=${2:?output folder}
python=${3:-python}
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

compare=(benchmarks/compare_published.py --published-code "$published" --device cuda --amp bf16)
peers=(swin_tiny_patch4_window7_224 pvt_v2_b2 convnext_tiny)

part cuda_tests "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
part eager_infer "$python" "${compare[@]}" --variants sgformer_s sgformer_m sgformer_b \
    --mode infer -b 256 --warmup 5 --repeats 15 --output "$out/eager_infer"
part eager_train "$python" "${compare[@]}" --variants sgformer_s sgformer_m sgformer_b \
    --mode train -b 128 --warmup 5 --repeats 15
part channels_last "$python" "${compare[@]}" --channels-last --mode infer train -b 256 \
    --train-batch-size 128 --warmup 5 --repeats 15
part compiled_infer "$python" "${compare[@]}" --compile --mode infer -b 256 --warmup 3 \
    --repeats 15
part compiled_train "$python" -m sgformer benchmark --models sgformer_s "${peers[@]}" \
    --device cuda --amp bf16 --compile reduce-overhead --channels-last --mode train -b 128 \
    --warmup 3 --repeats 10
part graph_ceiling "$python" benchmarks/cuda_graph_ceiling.py --models sgformer_s "${peers[@]}" \
    --published-code "$published" -b 256 --amp bf16
part profile "$python" benchmarks/profile_model.py --model sgformer_s --device cuda --amp bf16 \
    -b 256 --train-batch-size 128 --output "$out/profile"

if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (see $out/<name>.log)"
    exit 1
fi
