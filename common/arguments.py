"""The command line every strategy script shares: build_parser() (a script adds its own flags to it), the tasks
flag, and the arguments as a run records them."""
import argparse

from common.data import DEFAULT_DATA, TASKS
from common.model import MODEL_SIZES
from common.trunks import TRUNK_NAMES
from common.pretrain import PRETRAIN_TASKS
from common.versions import REPO, repo_relative


# per-task validation metrics a run can select on and rules can read (loss is scored as minus the loss)
METRIC_CHOICES = ("ap", "loss", "f1_macro", "f1_pos", "f1_pos_tuned", "accuracy")


def build_parser(description=None):
    """The arguments every strategy takes, under headings in --help. A script adds its own flags with
    parser.add_argument: they come first in --help, under "options"."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data and tasks")
    train = p.add_argument_group("training budget and optimizer")
    model = p.add_argument_group("model (common/model.py, trunks.py, text_encoder.py)")
    evaluation = p.add_argument_group("evaluation, model selection, early stopping")
    files = p.add_argument_group("run folder, checkpoints, logging")
    device = p.add_argument_group("devices, precision, torchrun, threads")
    test = p.add_argument_group()  # test-only fault injection and switches, hidden from --help
    data.add_argument("--data", default=str(DEFAULT_DATA),
                   help="folder with train.h5, val.h5, test.h5 (default: the synthetic set, made if missing)")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (the original used 1.5e-5 for a pretrained BERT-base)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--clip-grad", type=float, default=1.0, help="max global grad norm, 0 = off")
    train.add_argument("--seed", type=int, default=0)
    data.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    device.add_argument("--device", default="cpu")
    data.add_argument("--stage", choices=("finetune", "pretrain"), default="finetune",
                   help="pretrain: train the pretraining tasks (common/pretrain.py) with this strategy; "
                        "fine-tune from its best.pt with --init")
    data.add_argument("--pretrain-tasks", default=",".join(PRETRAIN_TASKS))
    files.add_argument("--out", default=str(REPO / "results"), help="results root; a run writes <out>/<strategy>/<run>/")
    files.add_argument("--run", default=None, help="run name (default seed<seed>)")
    files.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    model.add_argument("--model-size", default="small", choices=sorted(MODEL_SIZES))
    model.add_argument("--trunk", default="hca", choices=TRUNK_NAMES,
                   help="the shared model: hca (default), late_fusion, concat, mult (MulT-style), or one modality alone")
    model.add_argument("--text-encoder", default=None, metavar="FOLDER",
                   help="a local Hugging Face encoder folder (BERT, RoBERTa, DeBERTa, DistilBERT, MiniLM, ...); "
                        "the model's width follows it. Default: a random BERT of --model-size. Nothing is downloaded")
    model.add_argument("--bert-path", dest="text_encoder", help=argparse.SUPPRESS)  # deprecated name of --text-encoder
    model.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the text encoder's activations in the backward pass (less memory, same gradients)")
    model.add_argument("--init", default=None,
                   help="start from a checkpoint: ours (results/.../best.pt, a pretraining checkpoint, a run's "
                        "model.safetensors) or the original code's (its names are mapped); missing and unexpected "
                        "keys are reported. Read with the restricted unpickler: a file that would run code stops "
                        "the run (data_prep/trust_checkpoint.py converts a file you trust)")
    data.add_argument("--feature-norm", choices=("train", "none"), default="train",
                   help="standardise video/audio per dimension with the training split's mean and std "
                        "(none: raw features, e.g. to fine-tune the original code's checkpoints)")
    evaluation.add_argument("--metric", default="ap", choices=METRIC_CHOICES,
                   help="per-task validation metric that rules read (stop-and-go, curricula, sampling, ...); every "
                        "metrics dict carries it as 'score', higher is better (loss: minus the mean cross-entropy; "
                        "minus the loss when pretraining). Default ap: threshold-free, it does not stay flat on a "
                        "task that still predicts its majority class")
    evaluation.add_argument("--select-metric", default=None, choices=METRIC_CHOICES,
                   help="metric whose mean over tasks selects the best model, steps the LR schedule and drives "
                        "early stopping (default: --metric)")
    evaluation.add_argument("--early-stop-patience", type=int, default=0,
                   help="stop after N evaluations in a row without a new best selection score (0 = off: train "
                        "the whole budget, --epochs capped by --max-steps)")
    evaluation.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: --evals-per-epoch)")
    evaluation.add_argument("--evals-per-epoch", type=int, default=1,
                   help="where --eval-every is 0: validate this many times per epoch, evenly spaced")
    files.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="checkpoint at the first step after N minutes of wall time since the last checkpoint "
                        "(0 = off); a run also checkpoints after a validation that made a new best model and "
                        "on SIGINT/SIGTERM")
    files.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N steps (0 = off: the wall-time cadence decides)")
    files.add_argument("--log-every", type=int, default=20, help="write a train line to metrics.jsonl every N steps")
    train.add_argument("--max-steps", type=int, default=0,
                   help="cap on optimizer steps: the budget is min(epochs x steps per epoch, N) (0 = no cap)")
    train.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                   help="a NaN/Inf loss or gradient stops the run with a report, or skips the batch (counted)")
    data.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=True,
                   help="batches of clips of similar text length (less padding; --no-bucket for plain shuffling)")
    data.add_argument("--num-workers", type=int, default=0)
    device.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    files.add_argument("--quiet", action="store_true", help="no progress line")
    # fault injection for the resume tests: exit abruptly (no checkpoint, like a kill -9) after step N
    test.add_argument("--crash-after-step", type=int, default=0, help=argparse.SUPPRESS)
    device.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast of the forward (bf16, or fp16 with a gradient scaler); losses, per-task "
                        "gradients, the Gram matrix and the aggregators' solve stay fp32 or better")
    device.add_argument("--collective-timeout", type=float, default=600.0,
                   help="torchrun: seconds a collective waits for the other ranks before the run stops with a "
                        "report naming the rank that stopped first (a dead or hung rank)")
    device.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (torch.use_deterministic_algorithms with a warning naming any op "
                        "that has none, no cuDNN autotuning, the math attention backend instead of the fused "
                        "ones): meant for repeatable GPU runs, at some cost in speed (not yet measured on a GPU)")
    # test-only: the 1-process vs torchrun equality tests switch dropout off (each rank draws the dropout
    # masks of its own clips, so with dropout the two runs differ by construction)
    test.add_argument("--zero-dropout", action="store_true", help=argparse.SUPPRESS)
    # test-only: with --crash-after-step, only this rank exits (-1: every rank); --hang: it hangs instead (until
    # torchrun's SIGTERM), so that the others' collective times out
    test.add_argument("--crash-rank", type=int, default=-1, help=argparse.SUPPRESS)
    test.add_argument("--hang", action="store_true", help=argparse.SUPPRESS)
    evaluation.add_argument("--eval-batch-size", type=int, default=128,
                   help="clips per batch in evaluation (no gradients are kept there, so it can be larger)")
    device.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=False,
                   help="on CPU, flush denormal floats to zero (values below about 1e-38 become 0); "
                        "off by default: it did not change the step time measurably in `make bench`")
    return p


PATH_ARGS = ("data", "out", "init", "text_encoder")


def recorded_args(args):
    """The arguments as a run records them: paths inside the repository relative to it, so that a committed
    record holds no machine's absolute path."""
    return {k: repo_relative(v) if k in PATH_ARGS and isinstance(v, str) else v for k, v in vars(args).items()}


def parse_tasks(text, known=TASKS, flag="--tasks"):
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise SystemExit(f"{flag}: unknown task(s) {unknown}; choose from {','.join(known)}")
    return tasks
