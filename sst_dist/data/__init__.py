"""The data pipeline: sources -> token shards (prepare) -> blocks per rank (TrainData) and held-out blocks.

    folder = prepare(recipe.data)                       # once; idempotent and resumable
    data = open_data(recipe.data, seq_len=..., global_batch=..., seed=..., rank=r, world_size=w)
    batch = data.next_batch()                           # (global_batch // w, seq_len + 1)
    held_out = data.eval_batches(tokens, batch_size)    # sst_dist.evaluate.evaluate reads them

Command line: `python -m sst_dist.data {prepare,info,corpus,sample,tokenizer} --help`.
"""

from __future__ import annotations

from pathlib import Path

from sst_dist.data.shards import MANIFEST, candidate_folders, prepare

__all__ = ["TrainData", "open_data", "prepare", "prepared_dir", "epoch_order"]


def __getattr__(name):
    # torch is imported only by whoever reads blocks: the tokenizer worker processes that
    # prepare() spawns import this package too, and start faster without it.
    if name in ("TrainData", "epoch_order"):
        from sst_dist.data import blocks

        return getattr(blocks, name)
    raise AttributeError(f"module 'sst_dist.data' has no attribute {name!r}")


def prepared_dir(cfg) -> Path:
    """The folder `prepare(cfg)` writes (or wrote), found without loading a tokenizer from the hub."""
    folders = candidate_folders(cfg)
    for folder in folders:
        if (folder / MANIFEST).is_file():
            return folder
    return folders[0]


def open_data(cfg, *, seq_len: int, global_batch: int, seed: int, rank: int = 0,
              world_size: int = 1):
    """Opens the prepared shards of cfg (a DataConfig) for this rank as a TrainData; DataError
    with one line if they are not prepared or a shard is missing or corrupt."""
    from sst_dist.data.blocks import TrainData

    return TrainData(prepared_dir(cfg), seq_len=seq_len, global_batch=global_batch, seed=seed,
                     rank=rank, world_size=world_size)
