"""The memory estimator: exact parameter counts, ZeRO sharding, the command line."""

import csv
import re
import subprocess
import sys

import pytest

from conftest import ROOT, quiet_env
from sst_dist.memory import count_parameters, estimate, main

# OPT-125m (HF facebook/opt-125m): hidden, ffn, layers, vocab, learned positions (2048 + 2 offset)
H, F, L, V, P = 768, 3072, 12, 50272, 2050
R = 64
# (out, in) of the six targets of one decoder layer: q, k, v, out_proj, fc1, fc2
SHAPES = [(H, H)] * 4 + [(F, H), (H, F)]
EMBEDDINGS = V * H + P * H  # lm_head is embed_tokens (tie_word_embeddings): counted once
LAYER_NORMS = L * 2 * 2 * H + 2 * H  # two per layer, plus the final one; weight and bias each
BIASES = L * sum(out for out, _ in SHAPES)
DENSE = L * sum(out * inp for out, inp in SHAPES)
FULL_RANK_REST = EMBEDDINGS + LAYER_NORMS + BIASES  # what no method touches


def test_full_counts_match_opt_125m():
    c = count_parameters("125m", "full")
    assert c.total == EMBEDDINGS + LAYER_NORMS + BIASES + DENSE == 125_239_296  # HF's published count
    assert c.trainable == c.total and c.frozen == 0 and c.moments == c.total and c.projectors == 0


@pytest.mark.parametrize("method", ["lora", "relora"])
def test_lora_counts(method):
    factors = L * sum(R * inp + out * R for out, inp in SHAPES)  # A (r, in), B (out, r)
    c = count_parameters("opt-125m", method, R)
    assert c.frozen == DENSE  # W
    assert c.trainable == c.moments == FULL_RANK_REST + factors == 50_921_472
    assert c.total == c.trainable + c.frozen
    # ReLoRA* resets its factors' state: they count their steps per element (sst_dist.optim)
    assert c.ages == (factors if method == "relora" else 0)


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_sst_counts(path):
    k = [min(out, inp) for out, inp in SHAPES]
    # per targeted layer: s (k) + u_active (out, r) + vh_active (r, in) + bias (out) train;
    # U (out, k) and Vh (k, in) are frozen, packed in one parameter
    trainable = L * sum(kk + out * R + R * inp + out for (out, inp), kk in zip(SHAPES, k))
    frozen = L * sum(out * kk + kk * inp for (out, inp), kk in zip(SHAPES, k))
    c = count_parameters("125m", "sst", R, sst_path=path)
    assert c.trainable == c.moments == EMBEDDINGS + LAYER_NORMS + trainable
    # s, u_active and vh_active (not the bias) count their steps per element for exact resets
    assert c.ages == L * sum(kk + out * R + R * inp for (out, inp), kk in zip(SHAPES, k))
    assert c.frozen == frozen == 12 * (4 * 2 * H * H + 2 * (F * H + H * H))
    # the factored path keeps h = x Vhᵀ (width k) per targeted layer for backward
    assert c.extra_saved_width == (L * sum(k) if path == "factored" else 0)


def test_galore_counts_moments_in_the_projected_space():
    # 'std' projects the smaller side: square and tall (out >= in) weights get Q (r, in) and
    # moments (out, r); the wide fc2 gets P (out, r) and moments (r, in)
    moments = L * (4 * H * R + F * R + R * F)
    projectors = L * (4 * R * H + R * H + H * R)
    c = count_parameters("125m", "galore", R)
    assert c.trainable == c.total == 125_239_296
    assert c.moments == FULL_RANK_REST + moments
    assert c.projectors == projectors
    # sst+galore: GaLore on the tied token embedding / LM head (V x H: moments (V, r), projector
    # (r, H)); the positions stay full-rank
    s = count_parameters("125m", "sst+galore", R)
    sst = count_parameters("125m", "sst", R)
    assert s.trainable == sst.trainable
    assert s.moments == sst.moments - V * H + V * R
    assert s.projectors == R * H


def test_sst_galore_layer_form_counts_the_real_embedding():
    # what the trainer builds: GaLoreEmbedding (frozen W and Q, trainable B (V, r)) + its tied head
    c = count_parameters("125m", "sst+galore", R, galore_form="layer")
    sst = count_parameters("125m", "sst", R)
    assert c.trainable == c.moments == sst.trainable - V * H + V * R
    assert c.frozen == sst.frozen + V * H + R * H
    assert c.total == sst.total + V * R + R * H  # the head shares the embedding's tensors
    assert c.extra_saved_width == R  # the head keeps x·Qᵀ
    assert c.refresh_grads == ((V * H, 2),)  # one G (V, H), sent by the lookup and the tied head


def test_galore_layer_form_counts_the_real_layer():
    c = count_parameters("125m", "galore", R, galore_form="layer")
    B = L * (4 * H * R + F * R + R * F)  # B has the projected gradient's shape
    assert c.trainable == c.moments == FULL_RANK_REST + B
    assert c.frozen == DENSE + L * (4 * R * H + R * H + H * R)  # W and the projector
    assert c.refresh_grads == tuple((out * inp, 1) for out, inp in SHAPES) * L  # model order


def test_galore_refresh_holds_one_layer_or_a_group():
    """What a refresh holds (galore.GradientProbe): one micro-batch per step, the largest layer's
    G (fc1 / fc2), the tied embedding's twice (its head's G waits for its lookup's); several, a
    pass's running sums and the G arriving: every layer's (galore.refresh_layers null), or a
    group's (6 consecutive layers: a decoder block)."""
    from sst_dist.memory import estimate_engine, refresh_bytes

    c = count_parameters("125m", "galore", R, galore_form="layer")
    block = sum(out * inp for out, inp in SHAPES)
    assert refresh_bytes(c) == refresh_bytes(c, 1, 6) == 4 * F * H
    assert refresh_bytes(c, 4) == 4 * (DENSE + F * H)
    assert refresh_bytes(c, 4, 6) == 4 * (block + F * H)
    tied = count_parameters("125m", "sst+galore", R, galore_form="layer")
    assert refresh_bytes(tied) == 4 * 2 * V * H and refresh_bytes(tied, 4) == 4 * 3 * V * H
    assert refresh_bytes(count_parameters("125m", "sst", R, galore_form="layer"), 4) == 0
    # the estimates count it at their refresh phase, which is the peak of GaLore at 13B
    kw = dict(checkpointing=True, frozen_dtype="bfloat16")
    one, every = (estimate_engine("13b", "galore", R, "torch", 1, 1, 2048, grad_accum=a, **kw) for a in (1, 512))
    big = count_parameters("13b", "galore", R, galore_form="layer")
    assert every["total"] - one["total"] == refresh_bytes(big, 512) - refresh_bytes(big)
    grouped = estimate_engine("13b", "galore", R, "torch", 1, 1, 2048, grad_accum=512, refresh_layers=6, **kw)
    assert one["total"] < grouped["total"] < every["total"]
    for accum in (1, 512):  # DeepSpeed's: at 512 micro-batches every layer's sum tops the persistent tensors
        est = estimate("13b", "galore", R, 0, 1, 1, 2048, galore_form="layer", grad_accum=accum, checkpointing=True)
        persistent = est["weights"] + est["masters"] + est["optimizer"]
        assert (est["total"] >= persistent + refresh_bytes(big, 512)) == (accum == 512)


SST_FROZEN = L * sum(out * min(out, inp) + min(out, inp) * inp for out, inp in SHAPES)  # U, Vh
GALORE_B = L * (4 * H * R + F * R + R * F)  # B (r, in) left or (out, r) right, as the projected G
# (method, frozen elements, trainable elements) of OPT-125m, from the shapes: the frozen ones are
# SST's U and Vh, LoRA's W, GaLore's W and projector (the embedding's, under sst+galore)
FROZEN_AND_TRAINABLE = [
    ("full", 0, FULL_RANK_REST + DENSE),
    ("lora", DENSE, FULL_RANK_REST + L * sum(R * inp + out * R for out, inp in SHAPES)),
    ("relora", DENSE, FULL_RANK_REST + L * sum(R * inp + out * R for out, inp in SHAPES)),
    ("galore", DENSE + L * (4 * R * H + R * H + H * R), FULL_RANK_REST + GALORE_B),
    ("sst", SST_FROZEN, FULL_RANK_REST + L * sum(min(out, inp) + R * (out + inp) for out, inp in SHAPES)),
    ("sst+galore", SST_FROZEN + V * H + R * H,
     FULL_RANK_REST - V * H + V * R + L * sum(min(out, inp) + R * (out + inp) for out, inp in SHAPES)),
]


@pytest.mark.parametrize("method, frozen, trainable", FROZEN_AND_TRAINABLE)
@pytest.mark.parametrize("engine, gpus", [("torch", 1), ("fsdp", 2)])
def test_engine_estimate_stores_every_methods_frozen_tensors_in_the_frozen_dtype(method, frozen, trainable,
                                                                                 engine, gpus):
    """--frozen-dtype (model.frozen_dtype) is every method's: 4 bytes per frozen element in
    float32, 2 in bfloat16; what trains stays 4."""
    from sst_dist.memory import estimate_engine

    kw = dict(rank=R, engine=engine, gpus=gpus, micro_batch=1, seq=128)
    f32 = estimate_engine("125m", method, frozen_dtype="float32", **kw)
    b16 = estimate_engine("125m", method, frozen_dtype="bfloat16", **kw)
    buffers = count_parameters("125m", method, R, galore_form="layer", seq=128).buffer_bytes
    assert f32["weights"] - buffers == pytest.approx((4 * trainable + 4 * frozen) / gpus, abs=1)
    assert b16["weights"] - buffers == pytest.approx((4 * trainable + 2 * frozen) / gpus, abs=1)
    assert f32["optimizer"] == b16["optimizer"] and f32["gradients"] == b16["gradients"]


def _split(method, zero, gpus, **kw):
    return estimate("125m", method, R, zero, gpus, 1, 128, **kw)


@pytest.mark.parametrize("zero", [0, 3])
def test_the_materialized_sst_path_costs_one_unsharded_w_and_with_accumulation_one_fp32_g(zero):
    dense_w = L * sum(out * inp for out, inp in SHAPES)
    for accum, g_bytes in ((1, 0), (4, 4)):
        plain = estimate("125m", "sst", R, zero, 4, 1, 128, grad_accum=accum)
        kept = estimate("125m", "sst", R, zero, 4, 1, 128, sst_path="materialized", grad_accum=accum)
        assert kept["weights"] - plain["weights"] == kept["kept_weight"] == dense_w * 2
        assert kept["gradients"] - plain["gradients"] == dense_w * g_bytes
        same = ("masters", "optimizer", "buffers", "activations")
        assert [kept[k] for k in same] == [plain[k] for k in same]


@pytest.mark.parametrize("method", ["full", "sst"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stage_divides_the_right_categories(method, zero):
    c = count_parameters("125m", method, R, seq=128)
    g = 4
    e = _split(method, zero, g)

    def by(stage):
        return g if zero >= stage else 1

    assert e["weights"] == round(c.total * 2 / by(3) + c.buffer_bytes)  # frozen U, Vh sharded too
    assert e["masters"] == round(c.trainable * 4 / by(1))
    assert e["optimizer"] == round((c.moments * 8 + c.ages * 4) / by(1))  # two moments, and the ages
    # bf16 gradients from stage 2; the step's flattened bf16 and fp32 copies (per partition) from stage 1
    assert e["gradients"] == round(c.trainable * 2 / by(2) + c.trainable * (2 + 4) / by(1))
    assert e["activations"] == _split(method, zero, 1)["activations"]  # data parallel: per GPU
    assert e["buffers"] == (0 if zero == 0 else 500_000_000 * 2) + (4 * c.largest_module if zero == 3 else 0)


def test_frozen_parameters_cost_weights_only_and_fp32_has_no_masters():
    full, sst = _split("full", 2, 1), _split("sst", 2, 1)
    assert sst["weights"] > full["weights"]  # U and Vh are kept in full
    assert sst["optimizer"] < full["optimizer"] / 2  # but train only the active vectors and s
    fp32 = _split("full", 2, 1, precision="fp32")
    c = count_parameters("125m", "full", seq=128)
    assert fp32["masters"] == 0 and fp32["weights"] == c.total * 4
    assert fp32["gradients"] == c.trainable * (4 + 4)  # the gradients and the step's flattened copy


def test_offload_moves_masters_and_moments_to_the_cpu():
    on_gpu, off = _split("full", 3, 8), _split("full", 3, 8, offload=True)
    assert off["masters"] == off["optimizer"] == 0
    assert off["cpu"] > 0 and off["total"] < on_gpu["total"]


def test_total_is_the_peak_of_the_phases():
    e = _split("full", 2, 1)
    persistent = e["weights"] + e["masters"] + e["optimizer"]
    everything = persistent + e["activations"] + e["gradients"] + e["buffers"]
    assert persistent + e["activations"] <= e["total"] < everything


def test_cli_prints_a_table_with_a_total_column(capsys):
    assert main(["--model", "opt-125m", "--methods", "full,lora,sst", "--zero", "2", "--gpus", "8",
                 "--micro-batch", "2", "--seq", "512"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split()[-1] == "total"
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
            ("full", "lora", "sst")}
    assert set(rows) == {"full", "lora", "sst"}
    assert all(float(r[-1]) > 0 for r in rows.values())


@pytest.mark.parametrize("argv, allowed", [
    (["--model", "opt-7b"], "opt-125m, opt-350m, opt-1.3b"),
    (["--methods", "full,dora"], "full, lora, relora, sst, galore, sst+galore"),
    (["--zero", "4"], "0, 1, 2, 3"),
])
def test_bad_values_give_one_line_and_exit_2(capsys, argv, allowed):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and allowed in err[0] and "Traceback" not in captured.err


def test_the_module_runs_as_a_command():
    ok = subprocess.run([sys.executable, "-m", "sst_dist.memory", "--model", "125m", "--methods", "full,sst"],
                        cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert any(line.split()[-1:] == ["total"] for line in ok.stdout.splitlines())


def saved_activation_bytes(model, vocab: int, seq: int, batch: int, autocast: bool = False) -> int:
    """Bytes of the tensors autograd saves for one forward of `model` and its loss (parameters
    aside), plus the two fp32 gradients of the loss's backward (8 bytes a logit): the activation
    peak the estimator's formulas describe."""
    import contextlib

    import torch
    import torch.nn.functional as F

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, vocab, (batch, seq + 1))
    cast = torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        logits = model(input_ids=ids[:, :-1]).logits
        F.cross_entropy(logits.float().reshape(-1, vocab), ids[:, 1:].reshape(-1))
    return sum(saved.values()) + 8 * batch * seq * vocab


@pytest.mark.parametrize("method, path", [("full", "dense"), ("lora", "dense"), ("sst", "factored")])
def test_activation_formula_matches_what_autograd_keeps(method, path):
    """The estimate against the tensors autograd actually saves, on a tiny bf16 OPT on CPU."""
    import torch

    from sst_dist.config import load_recipe
    from sst_dist.memory import activation_bytes
    from sst_dist.methods import build_method
    from sst_dist.models import build_model

    b, s, vocab = 2, 64, 512
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=vocab, seq_len=s)
    recipe = load_recipe(None, [f"method={method}", "rank=8", "model.size=tiny", f"sst.path={path}"])
    build_method(recipe, model)
    model = model.to(torch.bfloat16)
    width = count_parameters("tiny", method, 8, sst_path=path, seq=s, vocab_size=vocab).extra_saved_width
    formula = activation_bytes("tiny", b, s, extra_saved_width=width, vocab_size=vocab)
    # autograd keeps the fp32 log-probabilities (4 bytes a logit); the formula's peak adds the two
    # gradients of the loss's backward
    kept = saved_activation_bytes(model, vocab, s, b)
    assert formula == pytest.approx(kept, rel=0.01)


@pytest.mark.parametrize("argv, says", [
    (["--engine", "fsdp", "--ds-config", "ds_configs/zero3.json"], "which --engine fsdp does not use"),
    (["--ds-config", "no-such.json"], "no such file"),
    (["--methods", "full,dora"], "--methods: dora"),
])
def test_the_benchmark_refuses_bad_flags_in_one_line(capsys, argv, says):
    from bench.memory import main as bench_main

    assert bench_main(["--device", "cpu", "--sizes", "tiny", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("engine", [
    [],  # DeepSpeed ZeRO-2 on gloo
    # FSDP2 on one process, every method's frozen tensors stored in bf16 on the meta build
    ["--engine", "fsdp", "--set", "model.frozen_dtype=bfloat16", "--set", "train.dtype=bfloat16",
     "--set", "model.build=meta"],
], ids=["deepspeed", "fsdp-frozen-bf16"])
def test_the_benchmark_runs_end_to_end_on_cpu(tmp_path, engine):
    """bench/memory.py's whole flow (subprocess per method, the engine on one process, CSV) on CPU."""
    proc = subprocess.run([sys.executable, "-m", "bench.memory", "--device", "cpu", "--sizes", "tiny",
                           "--methods", "full,sst,galore", "--galore-ranks", "", "--micro-batches", "1",
                           "--seq", "32", "--warmup", "1", "--steps", "1", "--out", str(tmp_path), *engine],
                          cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ("FSDP2, 1 process" in proc.stdout) == bool(engine)
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "memory.csv"))}
    assert rows["full"]["status"] == rows["sst"]["status"] == "ok"
    assert float(rows["sst"]["tokens_per_s"]) > 0 and float(rows["sst"]["est_total_gib"]) > 0
    assert rows["galore"]["status"] == "ok"


@pytest.mark.slow
def test_the_step_profile_reports_every_phase_on_cpu():
    """bench/step_profile.py's flow on CPU: a phase table per method, SST's own phase (after_step)
    in it, the GaLore refresh's probe at a refresh step, and the per-phase operator listing."""
    proc = subprocess.run([sys.executable, "-m", "bench.step_profile", "--device", "cpu", "--size", "tiny",
                           "--methods", "full,sst,galore@galore.update_proj_gap=2", "--warmup", "1",
                           "--steps", "2", "--kernels", "3", "--accumulation", "2"],
                          cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    cell = re.compile(r"[\d.]+ \(\s*[\d.]+\)|(?<=\s)-(?=\s|$)|(?<=\s)[\d.]+(?=\s|$)")
    table = {line.split()[0]: cell.findall(line[len(line.split()[0]):]) for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in ("probe", "forward", "after_step", "tokens/s")}
    assert len(table["forward"]) == 3  # one "ms (peak GiB)" cell per method
    assert table["after_step"][1] != "-" and table["probe"][:2] == ["-", "-"] and table["probe"][2] != "-"
    assert all(float(v) > 0 for v in table["tokens/s"])
    assert "sst: operators of one step by phase" in proc.stdout and "  after_step:" in proc.stdout
    assert "micro-batch 2 x seq 64 x 2 per step" in proc.stdout


@pytest.mark.parametrize("method, path", [("full", "dense"), ("sst", "dense"), ("sst", "factored")])
def test_autocast_activation_formula_matches_what_autograd_keeps(method, path):
    """The torch engine's estimate (fp32 weights, bf16 autocast) against the tensors autograd
    saves on a tiny OPT on CPU, SST's U and Vh stored in bf16 as model.frozen_dtype makes them."""
    import torch

    from sst_dist.config import load_recipe
    from sst_dist.memory import autocast_activation_bytes
    from sst_dist.methods import build_method
    from sst_dist.models import build_model

    b, s, vocab = 2, 64, 512
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=vocab, seq_len=s)
    recipe = load_recipe(None, [f"method={method}", "rank=8", "model.size=tiny", f"sst.path={path}",
                                "model.frozen_dtype=bfloat16"])
    build_method(recipe, model)

    def kept(batch):
        return saved_activation_bytes(model, vocab, s, batch, autocast=True)

    width = count_parameters("tiny", method, 8, sst_path=path, seq=s, vocab_size=vocab).extra_saved_width

    def formula(batch):
        return autocast_activation_bytes("tiny", batch, s, extra_saved_width=width, vocab_size=vocab)

    # per token: autocast's bf16 copies of the weights, whatever the batch, drop out of the
    # difference (estimate_engine counts them apart)
    assert formula(2 * b) - formula(b) == pytest.approx(kept(2 * b) - kept(b), rel=0.01)
    formula = formula(b)
    # checkpointing keeps each block's fp32 input and one block's activations, far less
    assert autocast_activation_bytes("tiny", b, s, vocab_size=vocab, checkpointing=True) < formula


def test_engine_estimate_counts_what_the_meta_build_allocates():
    from sst_dist.memory import estimate_engine

    kw = dict(rank=64, micro_batch=1, seq=2048)
    c = count_parameters("1.3b", "sst", 64, galore_form="layer", seq=2048)
    f32 = estimate_engine("1.3b", "sst", engine="torch", gpus=1, **kw)
    b16 = estimate_engine("1.3b", "sst", engine="torch", gpus=1, frozen_dtype="bfloat16", **kw)
    assert f32["weights"] - b16["weights"] == 2 * c.frozen  # U and Vh alone change storage
    assert f32["weights"] == pytest.approx(4 * c.total + c.buffer_bytes, abs=1)  # no dense W beside them
    assert f32["optimizer"] == (2 * c.moments + c.ages) * 4
    two = estimate_engine("1.3b", "sst", engine="fsdp", gpus=2, frozen_dtype="bfloat16", **kw)
    assert two["weights"] == pytest.approx((b16["weights"] - c.buffer_bytes) / 2 + c.buffer_bytes, abs=1)
    ckpt = estimate_engine("1.3b", "sst", engine="torch", gpus=1, checkpointing=True, **kw)
    assert ckpt["activations"] < f32["activations"] / 2 and ckpt["total"] < f32["total"]
    with pytest.raises(ValueError, match="--gpus"):
        estimate_engine("1.3b", "sst", engine="torch", gpus=2, **kw)


# Peaks measured by bench/scale.py on one H200 (torch engine, micro-batch 1 x 2048, activation
# checkpointing, docs/benchmarks/2026-12-03-h200.md): the estimate must stay within the 10 % the
# scale runs are sized by.
H200_PEAKS_GIB = [
    # method, size, sst.path, frozen dtype, measured torch.cuda.max_memory_allocated
    ("full", "6.7b", "dense", "float32", 100.082),
    ("sst", "13b", "factored", "bfloat16", 45.045),
    ("sst", "30b", "factored", "bfloat16", 97.825),
    ("galore", "13b", "factored", "bfloat16", 31.680),  # the streamed refresh: one layer's G
    ("galore", "30b", "factored", "bfloat16", 67.589),
    ("lora", "30b", "factored", "bfloat16", 68.643),
    ("sst+galore", "30b", "factored", "bfloat16", 95.021),
]


@pytest.mark.parametrize("method,size,path,frozen,measured", H200_PEAKS_GIB)
def test_engine_estimate_matches_the_h200_measurements(method, size, path, frozen, measured):
    from sst_dist.memory import GIB, estimate_engine

    est = estimate_engine(size, method, 64, "torch", 1, 1, 2048, frozen_dtype=frozen, checkpointing=True,
                          sst_path=path)
    assert abs(est["total"] / GIB - measured) / measured < 0.10
