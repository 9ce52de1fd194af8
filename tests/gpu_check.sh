#!/usr/bin/env bash
# The GPU proof in one prepared script (issue 16), for a machine with CUDA and a CUDA build of torch:
#   bash tests/gpu_check.sh            # writes gpu_check/ (or $OUT/gpu_check when $OUT is set)
# 1. build the extension (the CUDA module builds where torch is a CUDA build), 2. the CUDA tests,
# 3. the GPU bench section (samples/s at fp32/bf16, peak memory, kernel % of copy bandwidth, accuracy
# against fp64), 4. a 1-GPU torchrun smoke of two strategies (tiny model, one epoch), 5. fp16 (gradient
# scaler) and --deterministic runs of one epoch.
# Every step's output is kept; the script goes on after a failed step and exits non-zero at the end.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-.}/gpu_check"
mkdir -p "$OUT_DIR"
status=0
step() {  # step NAME COMMAND...: run, keep its log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    if "$@" > "$OUT_DIR/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT_DIR/$name.log)"; status=1; fi
    tail -n 25 "$OUT_DIR/$name.log"
}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))" | tee "$OUT_DIR/device.txt"
python3 -m pip install -q -r requirements.txt > "$OUT_DIR/pip.log" 2>&1 || true
step build python3 csrc/build.py
step cuda_tests python3 -m pytest -q -rs tests/test_gradagg.py tests/test_csrc_build.py tests/test_distributed.py
step bench_gpu python3 tests/bench.py --only 9
RUNS="$OUT_DIR/runs"
step torchrun_all_at_once torchrun --standalone --nproc_per_node 1 strategies/all_at_once.py -- --device cuda \
    --precision bf16 --model-size tiny --epochs 1 --out "$RUNS" --quiet
step torchrun_pcgrad torchrun --standalone --nproc_per_node 1 strategies/pcgrad.py -- --device cuda \
    --precision bf16 --model-size tiny --epochs 1 --out "$RUNS" --quiet
step fp16_gradnorm python3 strategies/gradnorm.py --device cuda --precision fp16 --model-size tiny --epochs 1 \
    --out "$RUNS" --quiet
step deterministic python3 strategies/stop_and_go.py --device cuda --deterministic --model-size tiny --epochs 1 \
    --out "$RUNS" --quiet
exit $status
