"""Where a run computes and in what precision: the device (under torchrun each rank's: common/distributed.py),
deterministic kernels (--deterministic), autocast (--precision) with fp16's gradient scaler, and the checks that
refuse what this machine cannot do."""
import os
import sys

import torch

from common import distributed
from common.model import cpu_bf16_lstm_problem

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def deterministic_kernels():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    torch.use_deterministic_algorithms(True, warn_only=True)   # a warning names any op without one
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # the fused attention backends (flash, memory-efficient: the one masked attention takes) have
    # non-deterministic backward passes on CUDA and warn_only lets them through: the math backend only
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def setup(args):
    """(device, autocast dtype or None, gradient scaler or None) of a run's arguments."""
    _, device = distributed.setup(args.device, getattr(args, "collective_timeout", 600.0))
    if not distributed.is_main():  # rank 0 alone prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    if args.deterministic:
        deterministic_kernels()
    if args.precision == "fp16" and device.type == "cpu":
        raise SystemExit("--precision fp16 on CPU: oneDNN has no fp16 LSTM kernel; use bf16 or fp32 on CPU "
                         "(fp16 with its gradient scaler is for CUDA)")
    if args.precision == "bf16" and device.type == "cpu" and cpu_bf16_lstm_problem():
        raise SystemExit("--precision bf16 on this CPU: oneDNN's bf16 LSTM needs AVX512-BF16 or AMX, which "
                         f"this processor lacks ({cpu_bf16_lstm_problem()}); use fp32 here")
    # fp16 gradients overflow and underflow: a scaler multiplies the loss, skips a step whose
    # gradients overflowed and lowers the scale (not an error); bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    if device.type == "cpu":  # performance (issue 17): process-wide, see --flush-denormal
        torch.set_flush_denormal(args.flush_denormal)
    return device, AUTOCAST_DTYPES[args.precision], scaler
