"""Turns command-line arguments into a Run and reports user errors as one line, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

from sst_dist.config import ConfigError, load_recipe


def run_cli(args) -> int:
    from sst_dist.data import DataError
    from sst_dist.rundir import RunError

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
        from sst_dist.train import Run, main, set_threads

        set_threads()
        main(Run(recipe, Path(args.output_dir), engine, args.ds_config, eval_only=args.eval_only))
    except (ConfigError, DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
