"""The recipe the benchmarks run for a model size and a method: recipes/opt-SIZE-METHOD.yaml
(recipes/tiny-METHOD.yaml for the tiny size), recipes/llama-SIZE-METHOD.yaml for a LLaMA size
(recipes/tiny-llama-METHOD.yaml for llama-tiny). Used by bench/quality.py, scale.py and throughput.py."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def size_recipe(size: str, method: str) -> Path:
    """The recipe file; ConfigError (one line) where there is none."""
    from sst_dist.errors import ConfigError

    if size in ("tiny", "llama-tiny"):
        name = f"tiny-{size.removesuffix('tiny')}{method}.yaml"
    else:
        name = f"{size}-{method}.yaml" if size.startswith("llama-") else f"opt-{size}-{method}.yaml"
    path = ROOT / "recipes" / name
    if not path.is_file():
        raise ConfigError(f"--size {size}: no recipe {path.relative_to(ROOT)} for method {method}; "
                          f"write one (e.g. from recipes/opt-125m-{method}.yaml)")
    return path
