"""Run under `torchrun --nproc_per_node 2`: a tiny SST model under FSDP2, in float64, and what its
decoder blocks hold and gather. Writes one JSON report per rank:

    params        per SST layer, its parameters as the module holds them (name -> sharded or not)
    managed       per SST layer, which of its parameters FSDP2 holds (name -> a DTensor or not)
    fsdp_params   per SST layer, the tensors its block's FSDP parameter group holds (param names)
    gathered      per SST layer, in a forward: whether `factors` was the whole unsharded tensor
                  and U, Vh views of its storage
    logits_max_diff  the FSDP2 forward against the same model's forward in one process, unsharded

    torchrun --nproc_per_node 2 tests/workers/fsdp_factors_check.py --out DIR [--set KEY=VALUE ...]
"""

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from sst_dist.config import load_recipe  # noqa: E402
from sst_dist.engines import build_engine, distributed_context, leave_distributed  # noqa: E402
from sst_dist.methods import build_method  # noqa: E402
from sst_dist.models import build_model, decoder_blocks  # noqa: E402
from sst_dist.sst import SSTLinear  # noqa: E402

VOCAB = 128


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], help="recipe overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe("recipes/tiny-sst.yaml", ["train.global_batch=4", "optim.warmup_steps=0", *args.set])
    ctx = distributed_context("fsdp")
    device, dtype = torch.device("cpu"), torch.float64
    torch.manual_seed(0)  # every rank builds the same model
    model = build_model("tiny", vocab_size=VOCAB, seq_len=16).to(dtype)
    method = build_method(recipe, model)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = copy.deepcopy(model)(input_ids=x).logits  # one process, nothing sharded
    engine = build_engine("fsdp", model, method.param_groups(model), recipe, device=device, dtype=dtype,
                          micro_batch=2, accumulation=1, ctx=ctx)
    names = {id(m): n for n, m in engine.model.named_modules()}
    layers = [m for m in engine.model.modules() if isinstance(m, SSTLinear)]
    report = {"rank": ctx.rank, "layers": len(layers), "params": {}, "managed": {}, "fsdp_params": {},
              "gathered": {}}
    for layer in layers:
        report["params"][names[id(layer)]] = {n: isinstance(p, DTensor) and p.to_local().numel() < p.numel()
                                              for n, p in layer.named_parameters(recurse=False)}
        report["managed"][names[id(layer)]] = {n: isinstance(p, DTensor)
                                               for n, p in layer.named_parameters(recurse=False)}
    for block in decoder_blocks(engine.model):
        for fsdp_param in block._get_fsdp_state()._fsdp_param_group.fsdp_params:
            info = fsdp_param._module_info
            if isinstance(info.module, SSTLinear):
                report["fsdp_params"].setdefault(names[id(info.module)], []).append(info.param_name)

    def gathered(layer, _):
        factors = layer.factors
        storage = factors.untyped_storage().data_ptr()
        report["gathered"][names[id(layer)]] = (
            not isinstance(factors, DTensor) and tuple(factors.shape) == (layer.factors_numel,)
            and all(t.untyped_storage().data_ptr() == storage for t in (layer.U, layer.Vh)))

    for layer in layers:
        layer.register_forward_pre_hook(gathered)
    with torch.no_grad():
        logits = engine.model(input_ids=x).logits
    report["logits_max_diff"] = float((logits - reference).abs().max())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    leave_distributed()


if __name__ == "__main__":
    main()
