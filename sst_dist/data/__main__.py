"""python -m sst_dist.data COMMAND ...

  prepare    tokenize the recipe's data source into shards (resumable)
  info       show what a recipe's prepared folder holds
  corpus     build the offline prose corpus from Debian documentation packages (>= 100 MB)
  sample     cut the shipped sample (sst_dist/data/sample/) out of a built corpus
  tokenizer  train the bundled byte-level BPE on the shipped sample
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sst_dist.errors import ConfigError, DataError


def _data_config(args):
    """The recipe's data section, with the command line's shorthands applied as --set would."""
    from sst_dist.config import load_recipe

    overrides = list(args.set or [])
    for key in ("source", "path", "tokenizer", "cache_dir", "num_proc", "max_docs", "val_fraction"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"data.{key}={value}")
    try:
        return load_recipe(args.recipe, overrides).data
    except ConfigError as err:
        raise DataError(str(err)) from None


def _add_recipe_args(p):
    p.add_argument("--recipe", help="a recipe YAML; its data section is used")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, repeatable")
    p.add_argument("--source", choices=["sample", "local", "openwebtext", "c4"])
    p.add_argument("--path", help="source=local: a folder of .txt/.jsonl/.parquet files; source=c4: a copy of C4's en")
    p.add_argument("--tokenizer", help="auto | opt | bundled | a tokenizer.json or folder")
    p.add_argument("--cache-dir", dest="cache_dir")
    p.add_argument("--num-proc", dest="num_proc", type=int)
    p.add_argument("--max-docs", dest="max_docs", type=int)
    p.add_argument("--val-fraction", dest="val_fraction", type=float)


def cmd_prepare(args) -> None:
    from sst_dist.data import prepare

    folder = prepare(_data_config(args), progress=not args.quiet)
    cmd_info_folder(folder)


def cmd_info(args) -> None:
    from sst_dist.data import prepared_dir

    cmd_info_folder(prepared_dir(_data_config(args)))


def cmd_info_folder(folder: Path) -> None:
    from sst_dist.data.shards import read_manifest

    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder}: not prepared")
    s = manifest["settings"]
    state = "complete" if manifest["complete"] else "incomplete (run prepare again to resume)"
    train = sum(p["train"]["tokens"] for p in manifest["parts"])
    val = sum(p["val"]["tokens"] for p in manifest["parts"])
    docs = sum(p["docs"] for p in manifest["parts"])
    print(f"{folder}: {state}; {docs} documents, {train:,} train + {val:,} held-out tokens "
          f"({s['dtype']}), {len(manifest['parts'])} parts; tokenizer {s['tokenizer']} "
          f"vocab {s['vocab_size']} eos {s['eos_id']}")


def cmd_corpus(args) -> None:
    from sst_dist.data.corpus import build_corpus

    out = build_corpus(args.out, min_mb=args.min_mb, all_packages=args.all, num_proc=args.num_proc)
    print(f"corpus: {out} (see {out / 'README.md'})")


def cmd_sample(args) -> None:
    from sst_dist.data.sample import write_sample

    path = write_sample(args.corpus, args.out, max_mb=args.max_mb)
    print(f"sample: {path} ({path.stat().st_size / 1e6:.2f} MB)")


def cmd_tokenizer(args) -> None:
    from sst_dist.data.shards import _texts_jsonl, sample_files
    from sst_dist.data.tokenizer import train_bpe

    texts = (t for f in sample_files() for t in _texts_jsonl(f))
    out = train_bpe(texts, vocab_size=args.vocab, out=args.out)
    print(f"tokenizer: {out} ({out.stat().st_size / 1e3:.0f} kB, vocab {args.vocab})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sst_dist.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a recipe's data source into shards")
    _add_recipe_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("info", help="summarise a recipe's prepared folder")
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("corpus", help="build the offline prose corpus from Debian -doc packages")
    p.add_argument("--out", default="data/corpus", help="output folder (default data/corpus)")
    p.add_argument("--min-mb", dest="min_mb", type=float, default=120.0,
                   help="stop adding packages past this many MB of text (default 120)")
    p.add_argument("--all", action="store_true", help="take every listed package")
    p.add_argument("--num-proc", dest="num_proc", type=int, default=0, help="0 = all cores")
    p.set_defaults(fn=cmd_corpus)
    p = sub.add_parser("sample", help="cut the shipped sample out of a built corpus")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--out", default=str(Path(__file__).parent / "sample"))
    p.add_argument("--max-mb", dest="max_mb", type=float, default=4.0, help="compressed size cap")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("tokenizer", help="train the bundled byte-level BPE on the sample")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--out", default=str(Path(__file__).parent / "sample" / "tokenizer-bpe8k.json"))
    p.set_defaults(fn=cmd_tokenizer)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
