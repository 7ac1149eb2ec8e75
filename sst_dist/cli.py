"""Turns command-line arguments into a Run and reports user errors as one line, not a traceback."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from sst_dist.config import load_recipe
from sst_dist.errors import ConfigError, DataError, RunError


def run_cli(args) -> int:
    started = False  # before: a mistake in the arguments, the same on every rank
    recipe = None
    try:
        overrides = list(args.set)
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        recipe = load_recipe(args.recipe, overrides)
        engine = args.engine or ("deepspeed" if args.ds_config else "torch")
        if args.ds_config and engine != "deepspeed":
            raise ConfigError("--ds-config goes with the deepspeed engine; drop --engine or the config")
        if args.ds_config and not Path(args.ds_config).is_file():
            raise ConfigError(f"--ds-config {args.ds_config}: no such file")
        if args.ds_config:
            from sst_dist.engines.deepspeed import read_ds_config

            read_ds_config(args.ds_config, recipe)  # checked now, not after the data is prepared
        from sst_dist.engines import check_precision

        check_precision(engine, recipe)
        if recipe.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
            # found now, not after the model is built (minutes at 30B)
            raise ConfigError(f"wandb.mode: {recipe.wandb.mode} needs the wandb package, which is not "
                              "installed; pip install wandb, or --set wandb.mode=disabled")
        from sst_dist.runtime import set_threads, watch_launcher
        from sst_dist.train import Run, main

        set_threads()
        watch_launcher()
        started = True
        main(Run(recipe, Path(args.output_dir), engine, args.ds_config, eval_only=args.eval_only))
    except (ConfigError, DataError, RunError) as err:
        # every rank finds an argument mistake: rank 0 says it, not each of them
        if started or os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from sst_dist.engines import collective_failure

        line = collective_failure(err, recipe.train.collective_timeout_s) if recipe else None
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # exiting through the interpreter would join gloo's threads, which abort() after a failure
        os._exit(1)
    return 0
