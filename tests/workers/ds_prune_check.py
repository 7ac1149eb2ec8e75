"""Run under `deepspeed --num_gpus 2`: trains a tiny SST model a few steps under ZeRO-N, resamples,
and reads the result back *through the engine*. Writes one JSON report per rank.

    deepspeed --num_gpus 2 tests/workers/ds_prune_check.py --stage 3 --out DIR [--skip-prune]
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
from sst_dist.methods import build_method  # noqa: E402
from sst_dist.models import build_model  # noqa: E402
from sst_dist.optim import RESET_KEYS  # noqa: E402
from sst_dist.sst_controller import SSTController  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-prune", action="store_true", help="negative control: no state reset")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    recipe = load_recipe("recipes/tiny-sst.yaml", ["train.global_batch=4", "optim.warmup_steps=0"])
    ctx = distributed_context("deepspeed")
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=128, seq_len=16)
    method = build_method(recipe, model)
    groups = method.param_groups(model)
    for group in groups:
        group["lr"] = 1e-2
    engine = build_engine("deepspeed", model, groups, recipe, device=torch.device("cpu"),
                          dtype=torch.float32, micro_batch=2, accumulation=1,
                          ds_config=f"ds_configs/zero{args.stage}.json", ctx=ctx)
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
    before_logits = engine.model(input_ids=probe).logits.detach()
    layers = list(method.layers.values())
    old = [layer.active_indices.clone() for layer in layers]
    controller.resample(iteration=1)
    after_logits = engine.model(input_ids=probe).logits.detach()

    # read_many (one collective per bucket) gives read()'s values, trainable and frozen alike
    params = [p for _, p in engine.model.module.named_parameters()]
    many = backend.read_many(params)
    read_many_max_diff = max(float((a - backend.read(p)).abs().max()) for a, p in zip(many, params))
    report = {"rank": ctx.rank, "stage": args.stage, "layers": [], "read_many_max_diff": read_many_max_diff,
              "logits_max_diff": float((after_logits - before_logits).abs().max())}
    for layer, old_idx in zip(layers, old):
        changed = (layer.active_indices != old_idx).nonzero().flatten()
        kept = (layer.active_indices == old_idx).nonzero().flatten()
        U, _ = layer.split_factors(backend.read(layer.factors))
        u_master = layer.split(backend.read(layer.spectral))[1]
        entry = {"changed": changed.tolist(),
                 "master_holds_new_vectors": float((u_master - U[:, layer.active_indices]).abs().max()),
                 "full_changed_moment_abs": 0.0, "full_kept_moment_abs": 0.0, "local_changed_moment_abs": 0.0}
        for key in RESET_KEYS:  # moments and per-element ages
            state = layer.split(backend.optimizer_state(layer.spectral, key))[1]  # u_active's
            entry["full_changed_moment_abs"] += float(state[:, changed].abs().sum())
            entry["full_kept_moment_abs"] += float(state[:, kept].abs().sum())
            entry["local_changed_moment_abs"] += local_changed_abs(layer.spectral, key, layer.slot_elements(changed))
        report["layers"].append(entry)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    leave_distributed()


def local_changed_abs(param, key, elements):
    """This rank's own shard of the moments, located as the engine stores it, at the changed
    slots' elements of the packed parameter."""
    from deepspeed.utils import safe_get_local_optimizer_state

    mask = torch.zeros(param.ds_shape if hasattr(param, "ds_id") else param.shape, dtype=torch.bool).flatten()
    mask[elements] = True
    if hasattr(param, "ds_id"):
        local = safe_get_local_optimizer_state(param, key)
        start = param._z3_optimizer._get_param_partition_rank(param) * local.numel()
        part = mask[start:start + local.numel()]
        return float(local[: part.numel()][part].abs().sum())
    mapping = param._hp_mapping
    if mapping is None:
        return 0.0
    address = mapping.lp_fragment_address
    part = mask[address.start:address.start + address.numel]
    return float(mapping.get_hp_fragment(key).view(-1)[part].abs().sum())


if __name__ == "__main__":
    main()
