"""A run's checkpoint -> a plain transformers OPTForCausalLM (or LlamaForCausalLM) folder, with the
tokenizer that made its data.

    python -m sst_dist.export --output-dir runs/tiny-sst --out exported/tiny-sst
    python -m sst_dist.export --output-dir RUN --out DIR --step 1000 --dtype bf16 --keep-singular 0.5

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
and no project code. Every engine's checkpoint is read on a CPU: the single process's `state.pt`,
DeepSpeed ZeRO partitions (consolidated by DeepSpeed's own zero_to_fp32, fp32 masters), FSDP2 DCP
folders (read by torch.distributed.checkpoint without a process group). Each method layer becomes
the nn.Linear (or embedding) it computes, by the method's own formulas: SST's U diag(s) Vh with
the trained active vectors merged in (sst.spectral_weight), LoRA / ReLoRA*'s W + scale·B·A
(lowrank.merged), GaLore's decay·W + scale·P·B (galore.merged_weight).

`--out` must be new or empty: `--force` replaces an earlier export there (the files its
sst_dist_export.json lists) and never another file.

`--keep-singular F` prunes at inference (docs/design.md §1, the paper's App. G): each SST layer keeps
its ceil(F·k) largest singular values (by |s|, per layer) before it is made dense.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sst_dist import checkpoint, methods  # noqa: F401 (methods: registers each method's layer classes)
from sst_dist.config import Recipe, _build, upgrade_saved, validate
from sst_dist.errors import ConfigError, DataError, RunError
from sst_dist.registry import METHODS, spec
from sst_dist.rundir import nearest_existing_folder, write_atomic, write_failure
from sst_dist.sst import kept_count  # noqa: F401 (export --keep-singular's count, re-exported)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXTRA_STATE = "_extra_state"


# ----------------------------------------------------------------------------- the run's checkpoint

def find_checkpoint(output_dir: str | Path, step: int | None = None) -> Path:
    """The latest complete checkpoint of a run (or that of `step`); RunError (one line) if none."""
    out = Path(output_dir)
    if not out.is_dir():
        raise RunError(f"--output-dir {out}: no such run folder")
    if step is None:
        found, warning = checkpoint.resolve(out)
        if not found:
            raise RunError(f"--output-dir {out}: no checkpoint under {checkpoint.checkpoint_root(out)}; "
                           "train first (checkpoints are written at the end of a run)")
        if warning:
            print(warning, file=sys.stderr)
        return found[0]
    path = checkpoint.checkpoint_root(out) / checkpoint.step_name(step)
    why = checkpoint.problem(path)
    if why is not None:
        have = [str(checkpoint.step_of(p)) for p in checkpoint.step_folders(out) if checkpoint.problem(p) is None]
        raise RunError(f"--step {step}: {path} is {'not there' if why == 'missing' else 'incomplete (' + why + ')'};"
                       f" complete checkpoints are at steps {', '.join(have) or 'none'}")
    return path


@dataclass
class RunCheckpoint:
    path: Path
    step: int
    recipe: Recipe
    engine: str
    vocab_size: int
    data_folder: str | None = None  # the prepared data's folder name, from the data position
    trainer_state: dict = field(default_factory=dict)


def read_checkpoint(output_dir: str | Path, step: int | None = None) -> RunCheckpoint:
    path = find_checkpoint(output_dir, step)
    state = checkpoint.read_trainer_state(path)
    settings = state.get("settings")
    if not settings:
        raise RunError(f"{path}: written before checkpoints recorded their settings; cannot tell its "
                       "model and engine")
    tree = upgrade_saved(settings["recipe"])
    if isinstance(tree.get("model"), dict):
        tree["model"]["init_from"] = None  # the weights it started from are in the checkpoint now
    try:
        recipe = validate(_build(Recipe, tree))
    except ConfigError as err:
        raise RunError(f"{path}: its recipe no longer loads ({err})") from None
    return RunCheckpoint(path, state["step"], recipe, settings["engine"], settings["vocab_size"],
                         (state.get("data") or {}).get("data"), state)


def engine_state_dict(ckpt: RunCheckpoint) -> dict:
    """The training model's full state dict on the CPU (fp32 masters where the engine keeps them),
    with its modules' extra state (GaLore's decay); RunError (one line) if the files do not read."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # a torch built without distributed: no DCP checkpoint to read either
        CheckpointException = Exception  # noqa: N806
    try:
        return _engine_state_dict(ckpt)
    except RunError:
        raise
    # a damaged file surfaces as anything from EOFError to RuntimeError; DCP's CheckpointException
    # derives from BaseException, so `except Exception` alone would let its pages of traceback out
    except (Exception, CheckpointException) as err:
        raise RunError(f"{ckpt.path}: its {ckpt.engine} engine state does not read ({_first_line(err)}); "
                       "export an older checkpoint with --step") from None


def _first_line(err: BaseException) -> str:
    failures = getattr(err, "failures", None)  # DCP: the first rank's own exception, not the report
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))[0]
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0].split('. ')[0][:200]}" if lines else type(err).__name__


def _engine_state_dict(ckpt: RunCheckpoint) -> dict:
    if ckpt.engine == "torch":
        return torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=True)["model"]
    if ckpt.engine == "deepspeed":
        return _deepspeed_state_dict(ckpt.path)
    if ckpt.engine == "fsdp":
        import warnings

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        # no process group: DCP reads every shard into full tensors on this one process (its
        # warning says so; that is the intent here). A metadata file that does not read is logged
        # by DCP to the root logger with its traceback before it raises: the raise is reported.
        def hide(record: logging.LogRecord) -> bool:
            return "torch/distributed/checkpoint" not in record.pathname.replace("\\", "/")

        quiet = logging.getLogger()
        quiet.addFilter(hide)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
                return _load_state_dict_from_keys(keys={"model"}, checkpoint_id=str(ckpt.path))["model"]
        finally:
            quiet.removeFilter(hide)
    raise RunError(f"{ckpt.path}: written by engine {ckpt.engine!r}, which this export does not read")


def _deepspeed_state_dict(path: Path) -> dict:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise RunError(f"{path}: a DeepSpeed checkpoint; reading its ZeRO partitions needs deepspeed "
                       "(pip install deepspeed)") from None

    engine_dir = path / "engine"
    files = sorted(engine_dir.glob("*model_states.pt"))
    if not files:
        raise RunError(f"{engine_dir}: no DeepSpeed model states file")
    # rank 0's module state: buffers, extra state and (ZeRO-1/2) every weight; ZeRO-3 placeholders
    # and all trainable weights are then replaced by the consolidated fp32 masters
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    merged = {key: value for key, value in module.items()}
    masters = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="engine")
    for key, value in masters.items():
        ref = module.get(key)  # buffers come back as float: integer ones get their dtype again
        merged[key] = value.to(ref.dtype) if torch.is_tensor(ref) and not ref.is_floating_point() else value
    return merged


# ----------------------------------------------------------------------------- method layers -> dense

@dataclass
class Pruning:
    """What --keep-singular did to each SST layer: k singular values, `kept` of them, shape (out, in)."""

    layers: dict[str, tuple[int, int, tuple[int, int]]] = field(default_factory=dict)

    def factored_params(self, dense_total: int) -> int:
        """Parameters of a factored export (U[:, :n], s[:n], Vh[:n] per SST layer, the rest dense)
        of a model with `dense_total` dense parameters."""
        return dense_total + sum(n * (out + inp + 1) - out * inp for _, n, (out, inp) in self.layers.values())


def dense_state_dict(state: dict, recipe: Recipe, keep_singular: float | None = None) -> tuple[dict, Pruning]:
    """A transformers state dict (float64) from a training model's: every method layer merged."""
    from sst_dist.models import tied_head

    state = {k: v for k, v in state.items()}
    pruning = Pruning()
    tied = tied_head(recipe.model.size)
    # a tied LM head (OPT) is the embedding: its entries (a GaLoreTiedHead's W, P, B too) go, and
    # the head is re-tied to the merged embedding below; an untied one (LLaMA) merges as any layer
    if tied:
        for key in [k for k in state if k.startswith("lm_head.")]:
            del state[key]
    prefixes = sorted({key.rsplit(".", 1)[0] for key in state if "." in key})
    layers = spec(recipe.method).layer_classes  # each merges its own entries (dense_from_state)
    dense = {}
    for prefix in prefixes:
        layer = next((cls for cls in layers if cls.owns_state(prefix, state)), None)
        if layer is not None:
            dense[f"{prefix}.weight"], pruned = layer.dense_from_state(prefix, state, recipe, keep_singular)
            if pruned is not None:
                pruning.layers[prefix] = pruned
    for key, value in state.items():
        if key.endswith(EXTRA_STATE):
            continue
        if not torch.is_tensor(value):
            raise RunError(f"checkpoint entry {key}: a {type(value).__name__}, not a tensor; not a model weight")
        dense[key] = value.double() if value.is_floating_point() else value
    if tied:
        dense["lm_head.weight"] = dense["model.decoder.embed_tokens.weight"]
    return dense, pruning


def build_hf_model(ckpt: RunCheckpoint, dense: dict, dtype: torch.dtype):
    from sst_dist.models import model_class, model_config

    size = ckpt.recipe.model.size
    config = model_config(size, vocab_size=ckpt.vocab_size, seq_len=ckpt.recipe.model.seq_len)
    model = model_class(size)(config).to(dtype)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if missing or unexpected:
        raise RunError(f"{ckpt.path}: does not map onto model.size {size} (missing "
                       f"{', '.join(missing[:4]) or 'none'}; unexpected {', '.join(unexpected[:4]) or 'none'})")
    model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer

def data_folder(ckpt: RunCheckpoint) -> Path | None:
    """The prepared data folder of the run (relative paths as the trainer saw them: from here)."""
    from sst_dist.data import prepared_dir

    candidates = [prepared_dir(ckpt.recipe.data)]
    if ckpt.data_folder:
        candidates.insert(0, Path(ckpt.recipe.data.cache_dir) / ckpt.data_folder)
    return next((c for c in candidates if (c / "tokenizer.json").is_file()), None)


def hf_tokenizer(ckpt: RunCheckpoint):
    """The tokenizer that made the run's data, as a transformers tokenizer: OPT's own when the data
    was tokenized with it and it loads here, else the data folder's tokenizer.json wrapped."""
    from transformers import PreTrainedTokenizerFast

    from sst_dist.data.tokenizer import OPT_NAME, load_tokenizer

    from sst_dist.data.shards import read_manifest

    folder = data_folder(ckpt)
    manifest = read_manifest(folder) if folder is not None else None  # DataError (one line) if damaged
    if manifest is not None:
        settings = manifest["settings"]
        name, tok_json, eos_id = settings["tokenizer"], (folder / "tokenizer.json").read_text(), settings["eos_id"]
    else:
        print(f"warning: the run's prepared data is not under {ckpt.recipe.data.cache_dir}/; taking its "
              f"tokenizer from data.tokenizer={ckpt.recipe.data.tokenizer}", file=sys.stderr)
        tok = load_tokenizer(ckpt.recipe.data.tokenizer, ckpt.recipe.data.source)
        name, tok_json, eos_id = tok.name, tok.json, tok.eos_id
    if name == "opt":
        try:
            from transformers import AutoTokenizer

            from sst_dist.hub import hub_reachable

            return AutoTokenizer.from_pretrained(OPT_NAME, local_files_only=not hub_reachable())
        except Exception:  # not cached and no hub: its tokenizer.json carries the same vocabulary
            pass
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok_json)
    eos = backend.id_to_token(eos_id)
    specials = {"eos_token": eos, "bos_token": eos}  # OPT's convention: </s> opens and ends a text
    for key, token in (("pad_token", "<pad>"), ("unk_token", "<unk>")):
        if backend.token_to_id(token) is not None:
            specials[key] = token
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


# ----------------------------------------------------------------------------- the command

@dataclass
class Exported:
    folder: Path
    checkpoint: Path
    step: int
    dense_params: int
    pruning: Pruning

    @property
    def factored_params(self) -> int:
        return self.pruning.factored_params(self.dense_params)


def check_prunable(ckpt: RunCheckpoint) -> None:
    if not METHODS[ckpt.recipe.method].prunable:
        raise ConfigError(f"{ckpt.path}: trained with method {ckpt.recipe.method}; only SST layers have "
                          "singular values to prune")


def check_fraction(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"--keep-singular: {value!r} must be a fraction in (0, 1]")


def hf_model(output_dir: str | Path, step: int | None = None, keep_singular: float | None = None,
             dtype: torch.dtype = torch.float32, ckpt: RunCheckpoint | None = None):
    """(the transformers model, RunCheckpoint, Pruning) of a run's checkpoint, in memory."""
    check_fraction(keep_singular)
    ckpt = ckpt or read_checkpoint(output_dir, step)
    if keep_singular is not None:
        check_prunable(ckpt)
    dense, pruning = dense_state_dict(engine_state_dict(ckpt), ckpt.recipe, keep_singular)
    return build_hf_model(ckpt, dense, dtype), ckpt, pruning


def export(output_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "fp32",
           keep_singular: float | None = None, force: bool = False) -> Exported:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    check_fraction(keep_singular)
    out = Path(out)
    earlier = check_out(out, force)
    ckpt = read_checkpoint(output_dir, step)
    if keep_singular is not None:
        check_prunable(ckpt)
    # written beside --out, then moved in: save_pretrained deletes every other model-*.safetensors
    # of the folder it writes, and a failure half way must leave --out as it was
    with _staging(out) as staging:  # made before the checkpoint is read (minutes at 30B)
        model, ckpt, pruning = hf_model(output_dir, step, keep_singular, DTYPES[dtype], ckpt)
        tokenizer = hf_tokenizer(ckpt)
        try:
            model.save_pretrained(staging)  # safetensors; the tied head is stored once
            tokenizer.save_pretrained(staging)
        except Exception as err:  # OSError, or safetensors' own error wrapping the OS one
            raise RunError(f"--out {out}: cannot write the export ({write_failure(err, out)}); nothing in "
                           f"{out} changed") from None
        record = {"written_by": "sst_dist.export", "checkpoint": str(ckpt.path), "step": ckpt.step,
                  "dtype": dtype, "keep_singular": keep_singular}
        _install(staging, out, earlier, record)
    dense_params = sum(p.numel() for p in model.parameters())
    return Exported(out, ckpt.path, ckpt.step, dense_params, pruning)


# ----------------------------------------------------------------------------- the --out folder
# An export never clobbers: it writes into an empty or new --out, and with --force replaces what
# an earlier export wrote there (listed in MARKER), never a file it did not write.

MARKER = "sst_dist_export.json"


def _earlier_export(out: Path) -> list[str] | None:
    """The names an earlier export wrote into `out` (from its MARKER), or None if it holds none."""
    try:
        record = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    names = record.get("files") if isinstance(record, dict) and record.get("written_by") == "sst_dist.export" else None
    if not isinstance(names, list):
        return None
    # plain names inside `out` only: a damaged or edited list never reaches another folder
    return [n for n in names if isinstance(n, str) and n not in ("", ".", "..", MARKER) and Path(n).name == n]


def check_out(out: Path, force: bool) -> list[str]:
    """Refuses an --out this export must not write, before anything is read; returns the names
    an earlier export wrote there (replaced by this one): [] for a new or empty folder."""
    if nearest_existing_folder(out, "--out") == out:
        if not os.access(out, os.W_OK | os.X_OK):
            raise RunError(f"--out {out}: is read-only")
        try:
            empty = not any(out.iterdir())
        except OSError as err:
            raise RunError(f"--out {out}: cannot list it ({err.strerror})") from None
        if not empty:
            earlier = _earlier_export(out)
            if earlier is None:
                raise RunError(f"--out {out}: not empty, and no export wrote it (no {MARKER}); choose a new "
                               "or empty folder (--force replaces only an earlier export)")
            if not force:
                raise RunError(f"--out {out}: holds an earlier export; add --force to replace it, or choose "
                               "a new folder")
            return earlier
    return []


@contextlib.contextmanager
def _staging(out: Path):
    """A fresh folder beside `out` (same filesystem: moved in by renames), removed on the way out,
    with the parents of `out` this export made if it failed."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.{os.getpid()}.partial"  # named by process: two exports never share one
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed export that had this pid
        staging.mkdir()
    except OSError as err:
        _remove_empty(made)
        raise RunError(f"--out {out}: cannot write in {out.parent} ({err.strerror})") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def _install(staging: Path, out: Path, earlier: list[str], record: dict) -> None:
    """Moves the staged export into `out`: the whole folder if `out` is new, else file by file,
    replacing only `earlier` (what an earlier export wrote). MARKER always lists every file of
    ours in `out`, so a kill half way leaves a folder that --force can still replace."""
    new = sorted(p.name for p in staging.iterdir())
    try:
        write_atomic(staging / MARKER, json.dumps({**record, "files": new}, indent=1))
        if not out.exists():
            os.rename(staging, out)
            return
        ours = set(earlier)
        clash = next((n for n in new if n not in ours and os.path.lexists(out / n)), None)
        if clash is not None:
            raise RunError(f"--out {out}: {clash} is there and no export wrote it; move it away or choose "
                           "another folder")
        write_atomic(out / MARKER, json.dumps({**record, "files": sorted(ours | set(new))}, indent=1))
        for name in sorted(ours - set(new)) + new:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif os.path.lexists(target) and name not in new:
                target.unlink()
        for name in new:
            os.replace(staging / name, out / name)
        os.replace(staging / MARKER, out / MARKER)
    except OSError as err:
        raise RunError(f"--out {out}: cannot move the export in ({write_failure(err, out)})") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sst_dist.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="the run folder (the trainer's --output-dir)")
    p.add_argument("--out", required=True, help="the folder to write the transformers model into")
    p.add_argument("--step", type=int, help="export this step's checkpoint (default: the latest)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="weights' dtype on disk")
    p.add_argument("--keep-singular", type=float, metavar="F",
                   help="SST only: keep the largest fraction F of each layer's singular values")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export in --out (only the files it wrote)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        done = export(args.output_dir, args.out, args.step, args.dtype, args.keep_singular, args.force)
    except (ConfigError, DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    line = f"exported {done.checkpoint} (step {done.step}) to {done.folder}: {done.dense_params:,} parameters"
    if done.pruning.layers and args.keep_singular is not None:
        line += f"; factored with --keep-singular {args.keep_singular:g}: {done.factored_params:,}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
