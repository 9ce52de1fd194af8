#!/usr/bin/env bash
# The GPU proof in one prepared script (issues 16 and 28), for a machine with CUDA and a CUDA build of torch:
#   bash tests/gpu_check.sh            # writes gpu_check/ (or $OUT/gpu_check when $OUT is set)
# It fails loudly: every step has a time limit and a check that can fail, the script goes on after a failed
# step (so that one run shows every problem) and exits non-zero at the end if any failed.
#  1. CUDA present and torch a CUDA build (else stop at once); the requirements installed WITHOUT torch (the
#     installed CUDA torch is pinned as a constraint: requirements.txt's CPU pin must not replace it)
#  2. the extension built, and common.gradagg's backend asserted to be "cuda"; the CUDA kernel tests and the
#     packed-LSTM branch on CUDA (tests/test_model.py)
#  3. --deterministic twice: metrics.jsonl identical (every number, timing fields aside)
#  4. kill and resume on the GPU: a --deterministic run killed after step 12 and resumed ends with the
#     uninterrupted run's numbers (identical)
#  5. CPU against GPU at zero dropout, 30 steps: every number of the summaries within rtol 2e-3 (TF32 is off by
#     default in torch; the difference is summation order in cuBLAS/cuDNN)
#  6. fp16 with its gradient scaler under pcgrad (per-task gradients scaled), one short run
#  7. one full-size pcgrad step: its time and peak memory (tests/bench/bench_gpu.py's section too)
#  8. several ranks: multi-rank NCCL needs 2 GPUs; on one GPU this is said and skipped (torchrun with one
#     process creates no process group, so it would prove nothing)
# Budget: under 10 minutes on one H100/H200 (each step's timeout below).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-.}/gpu_check"
RUNS="$OUT_DIR/runs"
mkdir -p "$OUT_DIR"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, remember a failure
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    if timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"
    else echo "   FAILED, exit $? after $((SECONDS - t0)) s (see $OUT_DIR/$name.log)"; status=1; fi
    tail -n 15 "$OUT_DIR/$name.log"
}
TINY=(--model-size tiny --batch-size 16 --eval-every 10 --log-every 1 --quiet)

# 1. the machine
if ! python3 - > "$OUT_DIR/device.txt" 2>&1 <<'EOF'
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.is_available() and torch.cuda.get_device_name(0))
sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)
EOF
then
    cat "$OUT_DIR/device.txt"
    echo "gpu_check: FAILED: no CUDA device or not a CUDA build of torch; nothing was installed or run"
    exit 1
fi
cat "$OUT_DIR/device.txt"
TORCH_VERSION=$(python3 -c "import torch; print(torch.__version__)")
grep -v -i -E '^torch([=<>~ ]|$)' requirements.txt > "$OUT_DIR/requirements-no-torch.txt"
echo "torch==$TORCH_VERSION" > "$OUT_DIR/constraints.txt"
step pip 300 python3 -m pip install -q -r "$OUT_DIR/requirements-no-torch.txt" -c "$OUT_DIR/constraints.txt"
step torch_kept 30 python3 -c "import torch, sys; sys.exit(0 if torch.__version__ == '$TORCH_VERSION' and torch.cuda.is_available() else 1)"

# 2. the extension's CUDA backend
step build 300 python3 csrc/build.py
step cuda_backend 60 python3 -c "
import sys; sys.path.insert(0, '.')
from common import gradagg
print('gradagg backend:', gradagg.BACKEND)
sys.exit(0 if gradagg.BACKEND == 'cuda' else 1)"
step cuda_tests 300 python3 -m pytest -q -rs tests/test_gradagg.py tests/test_csrc_build.py tests/test_model.py

# 3. --deterministic twice
for r in a b; do
    step "deterministic_$r" 120 python3 strategies/stop_and_go.py --device cuda --deterministic "${TINY[@]}" \
        --max-steps 40 --out "$RUNS/det_$r"
done
step deterministic_identical 30 python3 tests/gpu_compare.py metrics "$RUNS/det_a/stop_and_go/seed0/metrics.jsonl" \
    "$RUNS/det_b/stop_and_go/seed0/metrics.jsonl" --rtol 0

# 4. kill and resume on the GPU (against det_a, the uninterrupted run)
KILL_CMD="python3 strategies/stop_and_go.py --device cuda --deterministic ${TINY[*]} --max-steps 40 \
    --checkpoint-every 5 --crash-after-step 12 --out $RUNS/killed"
step killed 120 bash -c "$KILL_CMD; test \$? -eq 3"   # exit 3: the planned kill after step 12
step resumed 120 python3 strategies/stop_and_go.py --device cuda --deterministic "${TINY[@]}" --max-steps 40 \
    --checkpoint-every 5 --resume --out "$RUNS/killed"
step resume_identical 30 python3 tests/gpu_compare.py summary "$RUNS/det_a/stop_and_go/seed0/summary.json" \
    "$RUNS/killed/stop_and_go/seed0/summary.json" --rtol 0

# 5. CPU against GPU at zero dropout
for d in cpu cuda; do
    step "zero_dropout_$d" 180 python3 strategies/all_at_once.py --device "$d" --zero-dropout "${TINY[@]}" \
        --max-steps 30 --out "$RUNS/zd_$d"
done
step cpu_vs_gpu 30 python3 tests/gpu_compare.py summary "$RUNS/zd_cpu/all_at_once/seed0/summary.json" \
    "$RUNS/zd_cuda/all_at_once/seed0/summary.json" --rtol 2e-3

# 6. fp16 under pcgrad
step fp16_pcgrad 120 python3 strategies/pcgrad.py --device cuda --precision fp16 "${TINY[@]}" --max-steps 30 \
    --out "$RUNS/fp16"

# 7. one full-size pcgrad step, and the GPU bench section
step full_pcgrad_step 180 python3 - <<'EOF'
import sys, tempfile, time
sys.path.insert(0, ".")
import torch
from common.multitask import add_update_args, make_update
from common.train import DEFAULT_DATA, Run, build_parser
args = add_update_args(build_parser()).parse_args(["--data", str(DEFAULT_DATA), "--model-size", "full", "--device", "cuda",
                                                   "--batch-size", "16", "--out", tempfile.mkdtemp(), "--quiet",
                                                   "--aggregator", "pcgrad"])
run = Run(args, strategy="gpu_full_pcgrad")
update = make_update(run, args)
run.start(update=update)
batches = iter(run.batches())
update.step(next(batches))  # warm-up
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
update.step(next(batches))
torch.cuda.synchronize()
print(f"full-size pcgrad step, batch 16: {time.perf_counter() - t0:.3f} s, "
      f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
EOF
step bench_gpu 240 python3 tests/bench/bench.py --only 9 --quick

# 8. several ranks
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
    step torchrun_2_ranks 180 torchrun --standalone --nproc_per_node 2 strategies/pcgrad.py -- --device cuda \
        "${TINY[@]}" --max-steps 20 --out "$RUNS/torchrun"
else
    echo "== several ranks: one GPU here; multi-rank NCCL cannot be tested on one GPU (torchrun with one process"
    echo "   creates no process group). The gloo CPU tests (tests/test_distributed.py) cover the ranks' logic."
fi
[ $status -eq 0 ] && echo "gpu_check: every step passed" || echo "gpu_check: SOME STEPS FAILED"
exit $status
