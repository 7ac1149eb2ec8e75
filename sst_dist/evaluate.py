"""The loss and the evaluation: next-token cross-entropy for training, its mean over held-out
blocks for the periodic evaluation and for --eval-only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sst_dist import checkpoint, rundir
from sst_dist.config import Recipe
from sst_dist.errors import ConfigError, DataError, RunError


def lm_loss(model, block: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a (b, seq_len + 1) block, computed in fp32: the training loss
    (mean) and the evaluation's (sum over labels)."""
    # no KV cache: it would copy every layer's keys and values (torch.cat) for nothing, and its
    # per-layer state makes torch.compile recompile each block (model.compile)
    logits = model(input_ids=block[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             block[:, 1:].reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(model, batches, device=None) -> float:
    """Mean next-token cross-entropy (nats) over every label of every batch; model(input_ids=x).logits."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            total += float(lm_loss(model, batch, reduction="sum"))
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("evaluate: no batches to evaluate")
    return total / count


def run_eval(model, data, recipe: Recipe, device) -> dict:
    """The periodic evaluation: the first eval.tokens held-out tokens of `data` (a TrainData)."""
    model.eval()
    batch = max(1, recipe.train.micro_batch or recipe.train.global_batch)
    loss = evaluate(model, data.eval_batches(recipe.eval.tokens, batch), device=device)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def check_held_out(data, recipe: Recipe, eval_only: bool) -> None:
    """Before the first step: the held-out split holds a block for the evaluations the run will make,
    else DataError in one line. Found at the first evaluation, it would cost every re-run the steps
    up to it (the shipped recipes: 1,000)."""
    if not (eval_only or recipe.eval.every_steps) or data.val.num_blocks:
        return
    from sst_dist.data.shards import read_manifest

    manifest = read_manifest(data.folder) or {}
    total = manifest.get("train_tokens", 0) + manifest.get("val_tokens", 0)
    who = "--eval-only" if eval_only else f"eval.every_steps={recipe.eval.every_steps}"
    raise DataError(f"{who}: the held-out split of {data.folder} ({manifest.get('val_tokens', 0):,} of the "
                    f"corpus's {total:,} tokens, data.val_fraction={recipe.data.val_fraction}) holds no block "
                    f"of model.seq_len + 1 = {recipe.model.seq_len + 1} tokens; raise data.val_fraction, "
                    "add data, lower model.seq_len" + ("" if eval_only else ", or set eval.every_steps=0"))


def evaluate_checkpoint(engine, data, recipe: Recipe, device, out: Path, checkpoint_dir, step: int,
                        ctx) -> dict:
    """The periodic evaluation, run once on a loaded checkpoint; appended to eval.jsonl."""
    if checkpoint_dir is None:
        raise ConfigError(f"--eval-only: no checkpoint under {checkpoint.checkpoint_root(out)}; "
                          "train first, or pass the --output-dir of a run")
    with engine.forward_context():
        result = {"step": step, "checkpoint": checkpoint_dir.name, **run_eval(engine.model, data, recipe, device)}
    failure, log = None, out / "eval.jsonl"
    if ctx.rank == 0:
        print(json.dumps(result), flush=True)  # first: a log that cannot be written loses nothing
        try:
            with open(log, "a") as f:
                f.write(json.dumps(result) + "\n")
        except OSError as err:
            failure = rundir.write_failure(err, log)
    if ctx.any(failure is not None):  # every rank stops, none waits for rank 0
        raise RunError(f"cannot append the evaluation to {log}: {failure or 'failed on rank 0'} (the "
                       "result is the line above)")
    return result
