"""Run under `torchrun --nproc_per_node 2`: trains a tiny SST model a few steps under FSDP2, resamples,
and reads the result back *through the engine*. Writes one JSON report per rank.

    torchrun --nproc_per_node 2 tests/workers/fsdp_prune_check.py --out DIR [--skip-prune]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sst_dist.config import load_recipe  # noqa: E402
from sst_dist.engines import build_engine, distributed_context  # noqa: E402
from sst_dist.engines.fsdp import local_rows  # noqa: E402
from sst_dist.methods import build_method  # noqa: E402
from sst_dist.models import build_model  # noqa: E402
from sst_dist.sst import SSTController  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-prune", action="store_true", help="negative control: no state reset")
    args = parser.parse_args()
    torch.set_num_threads(1)

    recipe = load_recipe("recipes/tiny-sst.yaml", ["train.global_batch=4", "optim.warmup_steps=0"])
    ctx = distributed_context("fsdp")
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=128, seq_len=16)
    method = build_method(recipe, model)
    ids = {id(p) for p in method.lowrank_params}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in ids],
               "lr": 1e-2, "name": "full"},
              {"params": method.lowrank_params, "lr": 1e-2, "name": "lowrank"}]
    engine = build_engine("fsdp", model, groups, recipe, device=torch.device("cpu"),
                          dtype=torch.float32, micro_batch=2, accumulation=1, ctx=ctx)
    backend = engine.backend
    if args.skip_prune:
        backend.reset_state = lambda *a, **k: None
    controller = SSTController(method.layers, backend, seed=0)

    g = torch.Generator().manual_seed(100 + ctx.rank)
    for _ in range(3):
        x = torch.randint(0, 128, (2, 17), generator=g)
        logits = engine.model(input_ids=x[:, :-1]).logits
        engine.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, 128), x[:, 1:].reshape(-1)))
        engine.step()
        controller.post_step()

    probe = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before_logits = engine.model(input_ids=probe).logits
    layers = list(method.layers.values())
    old = [layer.active_indices.clone() for layer in layers]
    controller.resample(iteration=1)
    with torch.no_grad():
        after_logits = engine.model(input_ids=probe).logits

    report = {"rank": ctx.rank, "layers": [],
              "sharded": all(local_rows(p)[0].numel() < p.numel() for p in engine.params),
              "logits_max_diff": float((after_logits - before_logits).abs().max())}
    for layer, old_idx in zip(layers, old):
        changed = (layer.active_indices != old_idx).nonzero().flatten()
        kept = (layer.active_indices == old_idx).nonzero().flatten()
        U, Vh = backend.read(layer.U), backend.read(layer.Vh)
        entry = {"changed": changed.tolist(),
                 "master_holds_new_vectors": max(
                     float((backend.read(layer.u_active) - U[:, layer.active_indices]).abs().max()),
                     float((backend.read(layer.vh_active) - Vh[layer.active_indices]).abs().max())),
                 "full_changed_moment_abs": 0.0, "full_kept_moment_abs": 0.0, "local_changed_moment_abs": 0.0}
        # u_active (out, r): the slots are columns, across the sharded rows; vh_active (r, in):
        # the slots are rows, i.e. the sharded dim itself, so each rank holds some of them
        for param, dim in ((layer.u_active, 1), (layer.vh_active, 0)):
            for key in ("exp_avg", "exp_avg_sq"):
                state = backend.optimizer_state(param, key)
                entry["full_changed_moment_abs"] += float(state.index_select(dim, changed).abs().sum())
                entry["full_kept_moment_abs"] += float(state.index_select(dim, kept).abs().sum())
                entry["local_changed_moment_abs"] += local_changed_abs(engine, param, key, changed, dim)
        report["layers"].append(entry)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def local_changed_abs(engine, param, key, changed, dim):
    """This rank's own shard of the moment, as the optimizer stores it, at the changed slots."""
    moment = engine.optimizer.state[param][key]
    local, start = local_rows(moment)
    mask = torch.zeros(param.shape, dtype=torch.bool)
    mask.index_fill_(dim, changed, True)
    return float(local[mask[start:start + local.shape[0]]].abs().sum())


if __name__ == "__main__":
    main()
