"""The LLaMA family beside OPT: sizes named `llama-*` build transformers' LlamaForCausalLM at
GaLore's published shapes, every method adapts its q k v o gate up down projections (SST + GaLore
also its embedding and untied head), and the tiny recipes train under the torch engine."""

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import losses, pretrain
from sst_dist.build import Materializer, build_on_meta, is_meta
from sst_dist.config import load_recipe
from sst_dist.engines.torch import TorchBackend
from sst_dist.errors import ConfigError
from sst_dist.galore import GaLoreEmbedding, GaLoreLinear
from sst_dist.methods import ProbePass, build_method
from sst_dist.models import (build_model, decoder_blocks, enable_activation_checkpointing,
                             model_vocab, target_shapes)
from sst_dist.registry import LLAMA_TARGETS, METHODS

VOCAB, SEQ = 97, 16


def recipe_of(method):
    return f"recipes/tiny-llama-{method}.yaml"


def built(method, *overrides, meta=False, dtype=torch.float32):
    recipe = load_recipe(recipe_of(method), [f"model.seq_len={SEQ}", *overrides])
    torch.manual_seed(recipe.seed)
    if meta:
        model = build_on_meta(recipe.model.size, vocab_size=VOCAB, seq_len=SEQ)
    else:
        model = build_model(recipe.model.size, vocab_size=VOCAB, seq_len=SEQ).to(dtype)
    meth = build_method(recipe, model)
    if meta:
        Materializer(model, seed=recipe.seed, device="cpu", **meth.materializer_kwargs())(model)
    return recipe, model, meth


# ----------------------------------------------------------------------------- the family

@pytest.mark.parametrize("size, hidden, inter, heads, layers", [  # GaLore's configs/llama_*.json
    ("llama-60m", 512, 1376, 8, 8), ("llama-130m", 768, 2048, 12, 12), ("llama-350m", 1024, 2736, 16, 24),
    ("llama-1b", 2048, 5461, 32, 24), ("llama-7b", 4096, 11008, 32, 32)])
def test_published_shapes(size, hidden, inter, heads, layers):
    with torch.device("meta"):
        model = build_model(size, vocab_size=32000, seq_len=256)
    c = model.config
    assert isinstance(model, LlamaForCausalLM) and not c.tie_word_embeddings
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (hidden, inter, heads,
                                                                                                  layers)
    assert c.num_key_value_heads == heads and c.rms_norm_eps == 1e-6 and c.hidden_act == "silu"
    # embedding and head; per layer q k v o, gate up down and two RMSNorms; the final RMSNorm
    params = 2 * 32000 * hidden + layers * (4 * hidden**2 + 3 * hidden * inter + 2 * hidden) + hidden
    assert sum(p.numel() for p in model.parameters()) == params
    assert size != "llama-7b" or params == 6_738_415_616  # LLaMA-7B's published count
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert len(decoder_blocks(model)) == layers  # FSDP2's units
    shapes = target_shapes(size)
    assert set(shapes) == set(LLAMA_TARGETS) and shapes["down_proj"] == (hidden, inter)
    assert shapes["gate_proj"] == tuple(model.model.layers[0].mlp.gate_proj.weight.shape)


def test_the_vocabulary_is_the_tokenizers():
    assert model_vocab("llama-60m", 8192) == 8192 and model_vocab("llama-tiny", 97) == 97
    assert model_vocab("125m", 8192) == 50272 and model_vocab("tiny", 97) == 97  # OPT as before


def test_recipes_take_the_familys_targets_and_bad_values_are_one_line():
    assert load_recipe(recipe_of("sst")).targets == list(LLAMA_TARGETS)
    assert load_recipe("recipes/tiny-sst.yaml").targets[-1] == "fc2"
    cases = [(["model.size=llama-70m"], "model.size: 'llama-70m' is not one of"),
             (["targets=q_proj,fc1"], "targets: 'fc1' is not one of q_proj, k_proj, v_proj, o_proj"),
             (["targets=[]"], "targets: empty; choose from q_proj, k_proj, v_proj, o_proj, gate_proj"),
             (["rank=65"], "rank: 65 exceeds min(out, in) = 64 of model 'llama-tiny'")]
    for sets, message in cases:
        with pytest.raises(ConfigError) as err:
            load_recipe(recipe_of("sst"), sets)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_adapts_the_projections_and_its_groups_cover_the_model(method):
    _, model, meth = built(method)
    ids = [id(p) for g in meth.param_groups(model) for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    if method == "full":
        return
    adapted = {name.rsplit(".", 1)[-1] for name in meth.layers if ".layers." in name}
    assert adapted == set(LLAMA_TARGETS)
    assert sum(".layers." in name for name in meth.layers) == 2 * len(LLAMA_TARGETS)
    if method == "sst+galore":  # GaLore on the embedding and the head, each its own W, P, B
        assert isinstance(meth.layers["model.embed_tokens"], GaLoreEmbedding)
        assert isinstance(meth.layers["lm_head"], GaLoreLinear) and model.lm_head is meth.layers["lm_head"]


# ----------------------------------------------------------------------------- meta build, checkpointing

def layout(model):
    return {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()} | \
        {n: (tuple(b.shape), b.dtype) for n, b in model.named_buffers()}


@pytest.mark.parametrize("method", METHODS)
def test_meta_build_has_the_dense_builds_tensors(method):
    _, meta, _ = built(method, "sst.init=haar", meta=True)
    _, dense, _ = built(method, "sst.init=haar")
    assert not is_meta(meta) and layout(meta) == layout(dense)
    # the rotary frequencies are computed, not drawn: the same on both; RMSNorm scales start at one
    torch.testing.assert_close(meta.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert all(bool((m.weight == 1).all()) for n, m in meta.named_modules() if n.endswith("norm"))
    x = torch.randint(0, VOCAB, (2, SEQ))
    assert torch.isfinite(meta(input_ids=x).logits).all()


@pytest.mark.parametrize("method", ["sst", "sst+galore", "lora"])
def test_checkpointing_gives_the_same_gradients(method):
    def grads(checkpointing):
        recipe, model, meth = built(method, dtype=torch.float64)
        if checkpointing:
            enable_activation_checkpointing(model)
        meth.attach(TorchBackend(None), recipe)
        model.train()
        block = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))

        def loss():
            logits = model(input_ids=block[:, :-1]).logits
            return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), block[:, 1:].reshape(-1))

        meth.before_step(0, ProbePass(1, lambda probe: probe.backward(loss())))
        meth.before_micro_batch(last=True)
        loss().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any("layers.1.mlp.down_proj" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("method", METHODS)
def test_tiny_llama_recipes_train(tmp_path, method):
    pretrain(tmp_path, recipe_of(method), "--max-steps", "20")
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 21))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.5, (first, last)


def test_meta_build_trains_with_checkpointing(tmp_path):
    pretrain(tmp_path, recipe_of("sst+galore"), "--max-steps", "12", "--set", "model.build=meta",
             "--set", "model.gradient_checkpointing=true")
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 13)) and curve[12] < curve[1] - 0.5, curve


# ----------------------------------------------------------------------------- the estimator

@pytest.mark.parametrize("method", METHODS)
def test_the_estimator_counts_the_real_model(method):
    """count_parameters (a meta build) against the parameters of a real llama-tiny with the method."""
    from sst_dist.memory import count_parameters

    _, model, meth = built(method)
    c = count_parameters("llama-tiny", method, 16, galore_form="layer", seq=SEQ, vocab_size=VOCAB)
    params = list(model.parameters())
    assert c.total == sum(p.numel() for p in params)
    assert c.trainable == sum(p.numel() for p in params if p.requires_grad)
    assert c.frozen == sum(p.numel() for p in params if not p.requires_grad)
    assert c.block == sum(p.numel() for p in model.model.layers[0].parameters())


def test_the_estimator_counts_llama_60m():
    from sst_dist.memory import count_parameters, estimate_engine, main

    h, f, layers, vocab = 512, 1376, 8, 32000
    full = count_parameters("LLaMA-60M", "full")
    assert full.total == full.trainable == 2 * vocab * h + layers * (4 * h * h + 3 * h * f + 2 * h) + h
    lora = count_parameters("llama-60m", "lora", 64)
    dense = layers * (4 * h * h + 3 * h * f)
    assert lora.frozen == dense  # every projection's W, the untied head stays trainable
    assert lora.trainable == full.total - dense + layers * 64 * (4 * 2 * h + 3 * (h + f))
    est = estimate_engine("llama-60m", "sst", 64, "torch", 1, 4, 256)
    assert est["total"] > est["weights"] > 0
    assert main(["--model", "llama-60m", "--engine", "fsdp", "--gpus", "2", "--methods", "full,sst"]) == 0


@pytest.mark.parametrize("method, path", [("full", "dense"), ("lora", "dense"), ("sst", "factored")])
def test_activation_formulas_match_what_autograd_keeps(method, path):
    """DeepSpeed's bf16 weights (activation_bytes) and the torch engine's autocast
    (autocast_activation_bytes) against the tensors autograd saves on llama-tiny on CPU."""
    from test_memory import saved_activation_bytes

    from sst_dist.memory import activation_bytes, autocast_activation_bytes, count_parameters

    b, s, vocab = 2, 64, 512
    torch.manual_seed(0)
    model = build_model("llama-tiny", vocab_size=vocab, seq_len=s)
    build_method(load_recipe(recipe_of(method), ["rank=8", f"sst.path={path}"]), model)
    width = count_parameters("llama-tiny", method, 8, sst_path=path, seq=s, vocab_size=vocab).extra_saved_width

    def autocast(batch):
        return autocast_activation_bytes("llama-tiny", batch, s, extra_saved_width=width, vocab_size=vocab)

    def kept(batch):
        return saved_activation_bytes(model, vocab, s, batch, autocast=True)

    # per token: autocast's bf16 weight copies and the rotary cos/sin, whatever the batch, drop out.
    # SST's functions keep q/k/v's input once in fp32 (4h) where nn.Linear keeps three bf16 casts
    # (6h): the estimate is 2h per layer high for SST (1.6 % here)
    rel = 0.02 if method == "sst" else 0.01
    assert autocast(2 * b) - autocast(b) == pytest.approx(kept(2 * b) - kept(b), rel=rel)
    model = model.to(torch.bfloat16)
    formula = activation_bytes("llama-tiny", b, s, extra_saved_width=width, vocab_size=vocab)
    assert formula == pytest.approx(saved_activation_bytes(model, vocab, s, b), rel=0.01)
    assert activation_bytes("llama-tiny", b, s, vocab_size=vocab, checkpointing=True) < formula


# ----------------------------------------------------------------------------- the published recipes

@pytest.mark.parametrize("size, steps, galore_rank", [("60m", 10_000, 128), ("130m", 20_000, 256),
                                                      ("350m", 60_000, 256), ("1b", 100_000, 512)])
def test_recipes_at_galores_published_settings(size, steps, galore_rank):
    lora = ("lora",) if size in ("60m", "130m") else ()
    for method in ("full", "sst", "galore", *lora):
        r = load_recipe(f"recipes/llama-{size}-{method}.yaml")
        assert (r.method, r.model.size, r.model.seq_len, r.data.source) == (method, f"llama-{size}", 256, "c4")
        assert (r.train.global_batch, r.train.max_steps, r.optim.warmup_steps) == (512, steps, steps // 10)
        assert (r.optim.schedule, r.optim.min_lr_ratio) == ("cosine", 0.1)  # GaLore's decay
        assert r.targets == list(LLAMA_TARGETS)
    galore = load_recipe(f"recipes/llama-{size}-galore.yaml")
    assert (galore.rank, galore.galore.lr, galore.galore.scale, galore.galore.update_proj_gap) == (galore_rank, 0.01,
                                                                                                   0.25, 200)
    sst = load_recipe(f"recipes/llama-{size}-sst.yaml")
    assert (sst.optim.lowrank_lr, sst.sst.steps_per_iteration) == (1e-3, 200)
    if lora:  # GaLore's LoRA baseline at GaLore's rank
        assert load_recipe(f"recipes/llama-{size}-lora.yaml").rank == galore_rank
