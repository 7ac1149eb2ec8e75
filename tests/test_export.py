"""sst_dist.export, bench/prune.py, model.init_from and sst_dist.plot, end to end on the tiny recipes.

A run's exported folder must compute what the trainer computes: its loss on the run's held-out
blocks, evaluated by plain transformers (the model's own `labels=` loss), equals the trainer's
evaluation of the checkpoint in fp32. Single-process runs of all six methods are compared with
`--eval-only`; the 2-rank runs (one method per engine: ZeRO-2, ZeRO-3, FSDP2) with the trainer's
evaluation at their last step, the state the checkpoint holds, so that each costs one launch.
"""

import importlib
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, pretrain, quiet_env, read_metrics

METHODS = ("full", "lora", "relora", "sst", "galore", "sst+galore")
# the LLaMA family's tiny recipes (recipes/tiny-llama-*.yaml): its untied head merges as a layer
LLAMA = tuple(f"llama-{method}" for method in METHODS)
STEPS = 25  # SST crosses 4 resamples and a re-SVD, GaLore 3 refreshes, ReLoRA* 4 resets
# eval at the last step only (the multi-process runs compare with it); 32 held-out blocks
COMMON = ("--max-steps", str(STEPS), "--set", f"eval.every_steps={STEPS}", "--set", "eval.tokens=4096")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOL = 1e-5


def recipe_of(method):
    return f"recipes/tiny-{method}.yaml"


def method_overrides(method):
    # weight decay makes GaLore's W carry a decay factor (module extra state) the merge must apply
    return ("--set", "optim.weight_decay=0.1") if "galore" in method else ()


def held_out(run):
    """The run's recipe (from its checkpoint) and its eval blocks, as the trainer's run_eval reads them."""
    from sst_dist.data import open_data
    from sst_dist.export import read_checkpoint

    recipe = read_checkpoint(run).recipe
    recipe.data.cache_dir = str(ROOT / recipe.data.cache_dir)
    data = open_data(recipe.data, seq_len=recipe.model.seq_len, global_batch=recipe.train.global_batch,
                     seed=recipe.seed)
    return recipe, data


def hf_loss(model, batches) -> float:
    """Mean next-token cross-entropy over every label of (b, seq_len + 1) blocks, from the logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in batches:
            logits = model(input_ids=block[:, :-1]).logits
            total += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), block[:, 1:].flatten(),
                                                             reduction="sum"))
            count += block[:, 1:].numel()
    return total / count


def exported_eval_loss(run, folder) -> float:
    from transformers import AutoModelForCausalLM

    recipe, data = held_out(run)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return hf_loss(model, data.eval_batches(recipe.eval.tokens, recipe.train.micro_batch))


def eval_only(run, method) -> float:
    pretrain(run, recipe_of(method), *COMMON, *method_overrides(method), "--eval-only")
    return json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["eval_loss"]


def last_eval(run) -> float:
    rows = [m for m in read_metrics(run) if "eval_loss" in m]
    assert rows and rows[-1]["step"] == STEPS, rows
    return rows[-1]["eval_loss"]


def export_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "sst_dist.export", *map(str, args)], cwd=ROOT, env=quiet_env(),
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """method -> (run folder, exported folder, --eval-only loss): one single-process run each."""
    cache = {}

    def get(method):
        if method not in cache:
            from sst_dist.export import export

            base = tmp_path_factory.mktemp(method.replace("+", "-"))
            run = base / "run"
            pretrain(run, recipe_of(method), *COMMON, *method_overrides(method))
            export(run, base / "hf")
            cache[method] = (run, base / "hf", eval_only(run, method))
        return cache[method]

    return get


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("method", METHODS + LLAMA)
def test_export_computes_the_trainers_held_out_loss(runs, method):
    run, folder, trainer_loss = runs(method)
    loss = exported_eval_loss(run, folder)
    print(f"{method}: exported {loss:.8f}, --eval-only {trainer_loss:.8f}")
    assert abs(loss - trainer_loss) <= TOL, (loss, trainer_loss)
    assert math.isfinite(loss) and loss < 8.5  # trained: the untrained tiny model is at ln(8192) = 9.0


@pytest.mark.parametrize("method, model_class", [("sst", "OPTForCausalLM"), ("llama-sst+galore", "LlamaForCausalLM")])
def test_the_folder_loads_without_the_project(runs, tmp_path, method, model_class):
    """A fresh interpreter that cannot import sst_dist (installed or not) loads model and tokenizer
    and gets the loss."""
    run, folder, trainer_loss = runs(method)
    recipe, data = held_out(run)
    torch.save(torch.cat(list(data.eval_batches(recipe.eval.tokens, recipe.train.micro_batch))), tmp_path / "x.pt")
    script = (
        "import sys\n"
        "sys.modules['sst_dist'] = None  # any import of the project raises, whether it is installed or not\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        "with torch.no_grad(): logits = m(input_ids=x[:, :-1]).logits\n"
        "loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())\n"
        "print(float(loss), type(m).__name__)\n"
        "assert sys.modules['sst_dist'] is None and not any(m.startswith('sst_dist.') for m in sys.modules)\n")
    env = {k: v for k, v in quiet_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss, name = proc.stdout.split()[:2]
    assert name == model_class
    assert abs(float(loss) - trainer_loss) <= TOL
    assert any(p.suffix == ".safetensors" for p in folder.iterdir())


def test_the_tokenizer_round_trips_and_matches_the_data(runs):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    run, folder, _ = runs("full")
    _, data = held_out(run)
    text = "Sparse spectral training keeps U, s and Vh; the export merges them.\n  Done: 3.14 ü"
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(text)["input_ids"]
    assert ids == Tokenizer.from_file(str(data.tokenizer_path)).encode(text).ids  # what made the shards
    assert tok.decode(ids) == text
    assert tok.eos_token_id == data.eos_id and tok.pad_token_id == 1


def test_export_of_a_chosen_step_and_bf16(tmp_path):
    from safetensors import safe_open

    run = tmp_path / "run"
    pretrain(run, recipe_of("sst"), "--max-steps", "6", "--set", "checkpoint.every_steps=3", "--set",
             "checkpoint.keep=3")
    proc = export_cli("--output-dir", run, "--out", tmp_path / "s3", "--step", 3, "--dtype", "bf16")
    assert "step 3" in proc.stdout
    with safe_open(tmp_path / "s3" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    export_cli("--output-dir", run, "--out", tmp_path / "s6")
    with safe_open(tmp_path / "s3" / "model.safetensors", "pt") as a, \
            safe_open(tmp_path / "s6" / "model.safetensors", "pt") as b:
        key = "model.decoder.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(a.get_tensor(key).float(), b.get_tensor(key))  # really another step


def test_single_process_export_and_prune_import_no_deepspeed_datasets_or_wandb(runs, tmp_path):
    """A GPU image may lack deepspeed, datasets and wandb: a single-process run's export and the
    pruning bench must not need them."""
    run, _, _ = runs("sst")
    script = (
        "import sys\n"
        "from sst_dist import export\n"
        f"assert export.main(['--output-dir', {str(run)!r}, '--out', {str(tmp_path / 'hf')!r}]) == 0\n"
        "from bench import prune\n"
        f"assert prune.main(['--output-dir', {str(run)!r}, '--out', {str(tmp_path / 'p')!r}, '--fractions', "
        "'0.5', '--eval-tokens', '512']) == 0\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'datasets', 'wandb'}))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=quiet_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]


def test_one_line_errors(runs, tmp_path):
    run, _, _ = runs("full")
    sst_run, _, _ = runs("sst")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("--output-dir", tmp_path / "nope", "--out", tmp_path / "o"), "no such run folder"),
        (("--output-dir", empty, "--out", tmp_path / "o"), "no checkpoint"),
        (("--output-dir", run, "--out", tmp_path / "o", "--step", 7), f"complete checkpoints are at steps {STEPS}"),
        (("--output-dir", sst_run, "--out", tmp_path / "o", "--keep-singular", 0), "must be a fraction in (0, 1]"),
        (("--output-dir", sst_run, "--out", tmp_path / "o", "--keep-singular", 1.5), "must be a fraction"),
        (("--output-dir", sst_run, "--out", tmp_path / "o", "--keep-singular", "nan"), "must be a fraction"),
        (("--output-dir", run, "--out", tmp_path / "o", "--keep-singular", 0.5), "only SST layers"),
    ]
    for args, expected in cases:
        proc = export_cli(*args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, proc.stderr)
    assert not (tmp_path / "o").exists()


def export_error_line(proc) -> str:
    """The export stopped with exit code 2 and one `error:` line, no traceback (transformers' bar
    for the file it was writing may stand before it)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Writing model shards")]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_never_clobbers(runs, tmp_path):
    """A non-empty --out is refused; --force replaces what an earlier export wrote there and
    nothing else (save_pretrained alone would delete any other model-*.safetensors)."""
    from safetensors import safe_open

    from sst_dist.export import MARKER

    run, _, _ = runs("full")
    out = tmp_path / "hf"
    export_cli("--output-dir", run, "--out", out)
    first = folder_state(out)
    written = json.loads((out / MARKER).read_text())["files"]
    assert set(written) | {MARKER} == set(first) and "model.safetensors" in written

    line = export_error_line(export_cli("--output-dir", run, "--out", out, "--dtype", "bf16", check=False))
    assert f"--out {out}: holds an earlier export; add --force" in line
    assert folder_state(out) == first

    # the user's files stay; a file the earlier export listed and this one does not write goes
    (out / "notes.md").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"someone else's shard")
    (out / "stale.bin").write_bytes(b"an earlier export's")
    record = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**record, "files": record["files"] + ["stale.bin", "../escape"]}))
    (tmp_path / "escape").write_text("outside --out")
    export_cli("--output-dir", run, "--out", out, "--dtype", "bf16", "--force")
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"someone else's shard"
    assert not (out / "stale.bin").exists() and (tmp_path / "escape").read_text() == "outside --out"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out / MARKER).read_text())["files"] == written

    # --force never replaces what no export wrote: a folder without the marker, or a name it lacks
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    line = export_error_line(export_cli("--output-dir", run, "--out", other, "--force", check=False))
    assert f"--out {other}: not empty, and no export wrote it (no {MARKER})" in line
    record = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**record, "files": [n for n in record["files"] if n != "config.json"]}))
    before = folder_state(out)
    line = export_error_line(export_cli("--output-dir", run, "--out", out, "--force", check=False))
    assert f"--out {out}: config.json is there and no export wrote it" in line
    assert folder_state(out) == before and (other / "config.json").read_text() == "{}"
    assert not list(tmp_path.glob(".*.partial"))  # the staging folders are gone


def _limit_file_size():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # SIGXFSZ is ignored by Python: EFBIG


@pytest.mark.parametrize("problem", ["damaged state.pt", "a file", "under a file", "read-only", "disk full"])
def test_export_failures_are_one_line(runs, tmp_path, problem):
    import shutil

    from test_resume import _drop_file_permissions

    run, _, _ = runs("full")
    out, prefix, limit = tmp_path / "hf", [], None
    if problem == "damaged state.pt":
        run = shutil.copytree(run, tmp_path / "run")
        state = next((run / "checkpoints").glob("step_*")) / "state.pt"
        data = bytearray(state.read_bytes())
        data[-200:] = bytes(b ^ 0xFF for b in data[-200:])  # same size: the checkpoint looks complete
        state.write_bytes(data)
        expected = "engine state does not read (RuntimeError: PytorchStreamReader failed"
    elif problem == "a file":
        out.write_text("x")
        expected = f"--out {out} is a file, not a folder"
    elif problem == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "hf"
        expected = f"--out {out} is inside {tmp_path / 'file'}, which is a file"
    elif problem == "read-only":
        prefix = _drop_file_permissions()
        if prefix is None:
            pytest.skip("root without setpriv: permissions are not enforced")
        out.mkdir()
        out.chmod(0o555)
        expected = f"--out {out}: is read-only"
    else:
        limit = _limit_file_size
        out = tmp_path / "new" / "hf"
        expected = f"--out {out}: cannot write the export (File too large); nothing in {out} changed"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([*prefix, sys.executable, "-m", "sst_dist.export", "--output-dir", str(run), "--out",
                           str(out)], cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    if problem == "read-only":
        out.chmod(0o755)
    assert expected in export_error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder, no parents left


def fsdp_run(run, tmp_path):
    """A copy of a single-process run whose checkpoint is an FSDP2 one: its model in a DCP folder."""
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    copy = shutil.copytree(run, tmp_path / "fsdp-run")
    folder = next((copy / "checkpoints").glob("step_*"))
    model = torch.load(folder / "state.pt", weights_only=True)["model"]
    (folder / "state.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: DCP says so
        dcp.save({"model": model}, checkpoint_id=str(folder))
    state = json.loads((folder / "trainer.json").read_text())
    state["settings"]["engine"] = "fsdp"
    state["files"] = {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "trainer.json"}
    (folder / "trainer.json").write_text(json.dumps(state))
    return copy, folder


def test_export_of_a_damaged_dcp_checkpoint_is_one_line(runs, tmp_path):
    run, folder, _ = runs("full")
    copy, ckpt = fsdp_run(run, tmp_path)
    export_cli("--output-dir", copy, "--out", tmp_path / "good")  # the DCP folder itself reads
    assert folder_state(tmp_path / "good")["model.safetensors"] == folder_state(folder)["model.safetensors"]
    metadata = ckpt / ".metadata"
    data = bytearray(metadata.read_bytes())
    data[len(data) // 2:] = bytes(b ^ 0x5A for b in data[len(data) // 2:])  # same size
    metadata.write_bytes(data)
    proc = export_cli("--output-dir", copy, "--out", tmp_path / "hf", check=False)
    assert f"{ckpt}: its fsdp engine state does not read (" in export_error_line(proc)
    assert not (tmp_path / "hf").exists()


def test_dcps_checkpoint_exception_is_caught(monkeypatch, tmp_path):
    """DCP's CheckpointException derives from BaseException: `except Exception` misses it."""
    import torch.distributed.checkpoint.state_dict_loader as loader
    from torch.distributed.checkpoint.api import CheckpointException

    from sst_dist.config import Recipe
    from sst_dist.errors import RunError
    from sst_dist.export import RunCheckpoint, engine_state_dict

    def fail(**_):
        raise CheckpointException("pages of report", {0: (ValueError("bad shard"), None)})

    monkeypatch.setattr(loader, "_load_state_dict_from_keys", fail)
    with pytest.raises(RunError) as err:
        engine_state_dict(RunCheckpoint(tmp_path, 3, Recipe(), "fsdp", 8192))
    assert str(err.value) == (f"{tmp_path}: its fsdp engine state does not read (ValueError: bad shard); "
                              "export an older checkpoint with --step")


# ----------------------------------------------------------------------------- pruning

def test_keep_singular_one_is_the_plain_export_and_smaller_keeps_ceil(runs):
    from sst_dist.export import dense_state_dict, engine_state_dict, kept_count, read_checkpoint

    run, _, _ = runs("sst")
    ckpt = read_checkpoint(run)
    state = engine_state_dict(ckpt)
    plain, _ = dense_state_dict(state, ckpt.recipe)
    whole, pruning = dense_state_dict(state, ckpt.recipe, 1.0)
    assert plain.keys() == whole.keys() and all(torch.equal(plain[k], whole[k]) for k in plain)
    assert {n for _, n, _ in pruning.layers.values()} == {64}
    # ceil(F·k), F·k rounded to 6 decimals first: 0.3·64 = 19.2 keeps 20; 0.1·30 keeps 3, not 4
    assert (kept_count(0.3, 64), kept_count(0.5, 64), kept_count(0.1, 30), kept_count(0.001, 64)) == (20, 32, 3, 1)
    pruned, pruning = dense_state_dict(state, ckpt.recipe, 0.3)
    assert len(pruning.layers) == 12 and {n for _, n, _ in pruning.layers.values()} == {20}
    for prefix, (k, n, (out, inp)) in pruning.layers.items():
        W = pruned[f"{prefix}.weight"]
        assert W.shape == (out, inp) and torch.linalg.matrix_rank(W).item() == n
        assert not torch.allclose(W, plain[f"{prefix}.weight"])
        # the largest singular values are kept: with U and Vh near-orthonormal (re-orthogonalised at
        # step 20), the change is the norm of the k - n smallest ones, far below that of the largest
        s = state[f"{prefix}.spectral"][:k].double().sort().values
        change = torch.linalg.matrix_norm(W - plain[f"{prefix}.weight"])
        assert abs(change - s[:k - n].norm()) <= 0.01 * s[:k - n].norm() < 0.01 * s[n:].norm()
    dense = sum(v.numel() for k, v in plain.items() if k != "lm_head.weight")
    expected = dense + sum(n * (out + inp + 1) - out * inp for _, n, (out, inp) in pruning.layers.values())
    assert pruning.factored_params(dense) == expected < dense


def test_an_older_layout_checkpoint_exports_the_same_weights(runs):
    """A checkpoint from when SST's U and Vh were two entries (prefix.U, prefix.Vh) merges to the
    same dense weights as the one parameter that holds both now, pruned or not."""
    from sst_dist.export import dense_state_dict, engine_state_dict, read_checkpoint
    from sst_dist.models import target_shapes

    run, _, _ = runs("sst")
    ckpt = read_checkpoint(run)
    state = engine_state_dict(ckpt)
    older = {}
    for key, value in state.items():
        if key.endswith(".factors"):
            prefix = key[:-len(".factors")]
            out, inp = target_shapes(ckpt.recipe.model.size)[prefix.rsplit(".", 1)[-1]]
            k = min(out, inp)
            older[f"{prefix}.U"], older[f"{prefix}.Vh"] = value[:out * k].view(out, k), value[out * k:].view(k, inp)
        else:
            older[key] = value
    assert len(older) == len(state) + 12
    for keep in (None, 0.3):
        new, _ = dense_state_dict(state, ckpt.recipe, keep)
        old, _ = dense_state_dict(older, ckpt.recipe, keep)
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def load_prune_bench():
    return importlib.import_module("bench.prune")


def test_prune_bench_table_and_plot(runs, tmp_path):
    import csv

    run, _, trainer_loss = runs("sst")
    proc = subprocess.run([sys.executable, "-m", "bench.prune", "--output-dir", str(run), "--out", str(tmp_path),
                           "--fractions", "1,0.5,0.25", "--device", "cpu"], cwd=ROOT, env=quiet_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "prune.csv")))
    assert [float(r["fraction"]) for r in rows] == [1.0, 0.5, 0.25]
    assert abs(float(rows[0]["eval_loss"]) - trainer_loss) <= TOL  # F = 1: the run's own model
    assert [int(r["kept"]) for r in rows] == [12 * 64, 12 * 32, 12 * 16]
    losses = [float(r["eval_loss"]) for r in rows]
    assert losses[0] < losses[2]  # pruning a quarter of the spectrum costs something
    factored = [int(r["factored_params"]) for r in rows]
    assert factored[0] > factored[1] > factored[2] and len({r["dense_params"] for r in rows}) == 1
    assert (tmp_path / "prune.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "prune.md").read_text() in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.prune", "--output-dir", str(runs("full")[0]), "--out",
                          str(tmp_path / "x")], cwd=ROOT, env=quiet_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "only SST" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- continued pretraining

@pytest.mark.parametrize("method", METHODS + ("llama-sst", "llama-sst+galore"))
def test_init_from_an_export_reproduces_its_loss_at_step_0(runs, tmp_path, method):
    """Every method starts from the loaded weights unchanged (SST: the SVD of each loaded weight),
    so its first training loss is the exported model's loss on that batch."""
    from transformers import AutoModelForCausalLM

    from sst_dist.evaluate import lm_loss

    source, folder, _ = runs("llama-full" if method.startswith("llama-") else "full")
    pretrain(tmp_path, recipe_of(method), "--max-steps", "1", "--set", f"model.init_from={folder}")
    first = read_metrics(tmp_path)[0]["loss"]
    recipe, data = held_out(source)
    batch = data.next_batch()  # the first batch of a fresh run with the recipe's seed
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        chunks = batch.split(recipe.train.micro_batch)
        expected = sum(float(lm_loss(model, c)) for c in chunks) / len(chunks)
    assert abs(first - expected) <= TOL, (first, expected)
    assert abs(first - 9.0) > 0.5  # not a fresh model (ln 8192 = 9.01)


def test_init_from_errors_are_one_line(runs, tmp_path):
    from sst_dist.config import load_recipe
    from sst_dist.errors import ConfigError

    _, folder, _ = runs("full")
    (tmp_path / "noconfig").mkdir()
    cases = [(str(tmp_path / "nope"), "no such folder"), (str(tmp_path / "noconfig"), "no config.json"),
             ("./relative-missing", "no such folder")]
    for path, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            load_recipe(recipe_of("sst"), [f"model.init_from={path}"])
    with pytest.raises(ConfigError, match=r"does not have the shape of model.size '125m'.*set model.size: tiny"):
        load_recipe(recipe_of("sst"), [f"model.init_from={folder}", "model.size=125m"])
    load_recipe(recipe_of("sst"), ["model.init_from=facebook/opt-125m"])  # a hub name: checked when loaded
    with pytest.raises(ConfigError, match="model.build=dense"):
        load_recipe(recipe_of("sst"), [f"model.init_from={folder}", "model.build=meta"])
    # a folder of the other family, either way round
    with pytest.raises(ConfigError, match=r"holds a 'opt' model, not LLAMA \(model.size 'llama-tiny'\); set a model.size"):
        load_recipe(recipe_of("llama-sst"), [f"model.init_from={folder}"])
    llama_folder = runs("llama-full")[1]
    with pytest.raises(ConfigError, match=r"holds a 'llama' model, not OPT .*\(llama-\*\)"):
        load_recipe(recipe_of("sst"), [f"model.init_from={llama_folder}"])
    with pytest.raises(ConfigError, match=r"shape of model.size 'llama-60m': hidden_size 64 .*set model.size: llama-tiny"):
        load_recipe(recipe_of("llama-sst"), [f"model.init_from={llama_folder}", "model.size=llama-60m"])
    proc = pretrain(tmp_path / "run", recipe_of("sst"), "--set", f"model.init_from={folder}", "--set",
                    "model.seq_len=64", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "embed_positions" in lines[-1] and "model.seq_len" in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- plots

def test_plot_draws_several_runs(runs, tmp_path):
    a, b = runs("sst")[0], runs("full")[0]
    cmd = [sys.executable, "-m", "sst_dist.plot", str(a), str(b), "--out", str(tmp_path / "c.png")]
    proc = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = (tmp_path / "c.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20000
    proc = subprocess.run(cmd[:3] + [str(tmp_path)] + cmd[5:], cwd=ROOT, env=quiet_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "no metrics.jsonl rows" in proc.stderr


# ----------------------------------------------------------------------------- sharded checkpoints

@pytest.mark.slow
@pytest.mark.parametrize("method, engine", [("relora", "zero2"), ("sst+galore", "zero3"), ("sst", "fsdp")])
def test_export_of_a_sharded_checkpoint(tmp_path, method, engine):
    """ZeRO-2 (ReLoRA*: its frozen W is not in the optimizer partitions), ZeRO-3 (SST's U, Vh and
    GaLore's W, P partitioned, GaLore's decay in module extra state), FSDP2 (DCP, DTensor shards)."""
    from sst_dist.export import export

    run = tmp_path / "run"
    if engine == "fsdp":
        pretrain(run, recipe_of(method), *COMMON, "--engine", "fsdp", launcher="torchrun", nproc=2)
    else:
        pretrain(run, recipe_of(method), *COMMON, *method_overrides(method), "--ds-config",
                 f"ds_configs/{engine}.json", launcher="deepspeed", nproc=2)
    export(run, tmp_path / "hf")
    loss, trainer_loss = exported_eval_loss(run, tmp_path / "hf"), last_eval(run)
    print(f"{method} {engine}: exported {loss:.8f}, trainer {trainer_loss:.8f}")
    assert abs(loss - trainer_loss) <= TOL, (loss, trainer_loss)
