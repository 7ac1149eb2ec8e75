"""Pretrain an OPT model with SST or a baseline, from a recipe.

    python launch/pretrain.py --recipe recipes/tiny-sst.yaml --output-dir runs/tiny-sst
    deepspeed --num_gpus 2 launch/pretrain.py --recipe R --ds-config ds_configs/zero2.json --output-dir D
    torchrun --nproc_per_node 2 launch/pretrain.py --recipe R --engine fsdp --output-dir D
    python launch/deepspeed_run.py --num_gpus 2 launch/pretrain.py ...  (kill / Ctrl-C: every rank checkpoints)

Re-running the same command with the same --output-dir resumes from the latest checkpoint;
adding --eval-only evaluates that checkpoint on the held-out split instead of training.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sst_dist.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="a YAML recipe, e.g. recipes/tiny-sst.yaml")
    parser.add_argument("--output-dir", required=True, help="metrics.jsonl, checkpoints and logs go here")
    parser.add_argument("--max-steps", type=int, help="shorthand for --set train.max_steps=N")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--ds-config", help="a DeepSpeed JSON config (selects the deepspeed engine)")
    parser.add_argument("--engine", choices=("torch", "deepspeed", "fsdp"),
                        help="default: deepspeed with --ds-config, else torch (single process)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the latest checkpoint in --output-dir on the held-out split "
                             "(eval.tokens) and append the result to eval.jsonl; no training")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_cli(parse_args()))
