"""Run under `torchrun --nproc_per_node 2`: trains a tiny SST model under FSDP2 and reads each
resample / re-SVD back *through the engine*. Writes one JSON report per rank, with an entry per event:

    resample   a resample, as the trainer runs it
    skipped    a later resample with the state reset disabled: the negative control, which the
               test's check must flag
    resvd      a re-SVD (every slot is new, so every active moment must be zero)

    torchrun --nproc_per_node 2 tests/workers/fsdp_prune_check.py --out DIR
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sst_dist.config import load_recipe  # noqa: E402
from sst_dist.engines import build_engine, distributed_context, leave_distributed  # noqa: E402
from sst_dist.engines.fsdp import local_rows  # noqa: E402
from sst_dist.methods import build_method  # noqa: E402
from sst_dist.models import build_model  # noqa: E402
from sst_dist.optim import RESET_KEYS  # noqa: E402
from sst_dist.sst_controller import SSTController  # noqa: E402

VOCAB = 128


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", help="cuda: one GPU per rank, bf16 compute")
    args = parser.parse_args()
    torch.set_num_threads(1)

    recipe = load_recipe("recipes/tiny-sst.yaml", ["train.global_batch=4", "optim.warmup_steps=0"])
    ctx = distributed_context("fsdp")
    device, dtype = torch.device("cpu"), torch.float32
    if args.device == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        device, dtype = torch.device("cuda", ctx.local_rank), torch.bfloat16
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=VOCAB, seq_len=16).to(device)
    method = build_method(recipe, model)
    groups = method.param_groups(model)
    for group in groups:
        group["lr"] = 1e-2
    engine = build_engine("fsdp", model, groups, recipe, device=device, dtype=dtype, micro_batch=2,
                          accumulation=1, ctx=ctx)
    backend = engine.backend
    controller = SSTController(method.layers, backend, seed=0)
    batches = torch.Generator().manual_seed(100 + ctx.rank)
    probe = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(7)).to(device)

    def train(steps):
        for _ in range(steps):
            x = torch.randint(0, VOCAB, (2, 17), generator=batches).to(device)
            logits = engine.model(input_ids=x[:, :-1]).logits.float()
            engine.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)))
            engine.step()
            controller.post_step()

    def checked(event, all_new=False):
        """Runs `event` and reports what the engine holds afterwards; `all_new`: every slot was
        redrawn (a re-SVD), whether or not its index changed."""
        with torch.no_grad():
            before = engine.model(input_ids=probe).logits
        layers = list(method.layers.values())
        old = [None if all_new else layer.active_indices.clone() for layer in layers]
        event()
        with torch.no_grad():
            after = engine.model(input_ids=probe).logits
        report = {"logits_max_diff": float((after - before).abs().max()), "layers": []}
        for layer, old_idx in zip(layers, old):
            report["layers"].append(layer_report(engine, layer, old_idx))
        return report

    train(3)
    reports = {"rank": ctx.rank,
               "sharded": all(local_rows(p)[0].numel() < p.numel() for p in engine.params)}
    reports["resample"] = checked(lambda: controller.resample(iteration=1))
    train(3)
    reset_state = backend.reset_state
    backend.reset_state = lambda *a, **k: None
    reports["skipped"] = checked(lambda: controller.resample(iteration=2))
    backend.reset_state = reset_state
    train(2)
    reports["resvd"] = checked(lambda: controller.resvd(iteration=3), all_new=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{ctx.rank}.json").write_text(json.dumps(reports))
    dist.barrier()
    leave_distributed()


def layer_report(engine, layer, old_idx):
    backend = engine.backend
    slots, now = torch.arange(layer.rank), layer.active_indices.cpu()
    changed = slots if old_idx is None else (now != old_idx.cpu()).nonzero().flatten()
    kept = slots[:0] if old_idx is None else (now == old_idx.cpu()).nonzero().flatten()
    U, Vh = layer.split_factors(backend.read(layer.factors).cpu())
    _, u_master, vh_master = layer.split(backend.read(layer.spectral).cpu())
    entry = {"changed": changed.tolist(),
             "master_holds_new_vectors": max(float((u_master - U[:, now]).abs().max()),
                                             float((vh_master - Vh[now]).abs().max())),
             "full_changed_moment_abs": 0.0, "full_kept_moment_abs": 0.0, "local_changed_moment_abs": 0.0}
    # u_active (out, r): the slots are columns; vh_active (r, in): rows. Both live in the packed
    # `spectral`, which FSDP shards flat, so a slot's elements spread over the ranks
    for key in RESET_KEYS:  # moments and per-element ages
        _, u_state, vh_state = layer.split(backend.optimizer_state(layer.spectral, key).cpu())
        for state, dim in ((u_state, 1), (vh_state, 0)):
            entry["full_changed_moment_abs"] += float(state.index_select(dim, changed).abs().sum())
            entry["full_kept_moment_abs"] += float(state.index_select(dim, kept).abs().sum())
        entry["local_changed_moment_abs"] += local_changed_abs(engine, layer.spectral, key,
                                                               layer.slot_elements(changed))
    return entry


def local_changed_abs(engine, param, key, elements):
    """This rank's own shard of the moment, as the optimizer stores it, at the changed slots'
    elements of the packed parameter."""
    moment = engine.optimizer.state[param][key]
    local, start = local_rows(moment)
    mask = torch.zeros(param.numel(), dtype=torch.bool, device=local.device)
    mask[elements.to(local.device)] = True
    return float(local[mask[start:start + local.shape[0]]].abs().sum())


if __name__ == "__main__":
    main()
