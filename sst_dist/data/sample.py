"""Cuts the small sample shipped in sst_dist/data/sample/ out of a corpus built by corpus.py.

Only permissively licensed packages go into the sample (no copyleft text inside this
repository), and from each the same evenly spread fraction of pages, so the sample reads like
the corpus at a smaller scale. Each package's copyright file is copied into sample/licenses/.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

from sst_dist.data.corpus import PACKAGES, PERMISSIVE
from sst_dist.errors import DataError

SAMPLE_NAME = "debian-docs.jsonl.gz"


def _pages(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.readlines()


def write_sample(corpus: str | Path, out: str | Path, max_mb: float = 4.0) -> Path:
    corpus, out = Path(corpus), Path(out)
    stats_path = corpus / "stats.json"
    if not stats_path.is_file():
        raise DataError(f"{stats_path}: missing; build the corpus first (python -m sst_dist.data corpus)")
    stats = json.loads(stats_path.read_text())
    chosen = [p for p, _ in PACKAGES if p in stats and p in PERMISSIVE and (corpus / f"{p}.jsonl.gz").is_file()]
    if not chosen:
        raise DataError(f"{corpus}: holds none of the permissively licensed packages")
    compressed = sum((corpus / f"{p}.jsonl.gz").stat().st_size for p in chosen)
    fraction = min(1.0, 0.95 * max_mb * 1e6 / compressed)
    out.mkdir(parents=True, exist_ok=True)
    target = out / SAMPLE_NAME
    pages = {p: _pages(corpus / f"{p}.jsonl.gz") for p in chosen}
    while True:
        kept: dict[str, list[str]] = {}
        with gzip.GzipFile(target, "wb", compresslevel=9, mtime=0) as f:  # mtime=0: reproducible
            for package in chosen:
                lines = pages[package]
                kept[package] = [ln for i, ln in enumerate(lines)
                                 if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
                for line in kept[package]:
                    f.write(line.encode())
        if target.stat().st_size <= max_mb * 1e6 or fraction < 1e-3:
            break
        fraction *= 0.9
    chosen = [p for p in chosen if kept[p]]  # a one-page package (a dictionary) may get none
    lic = out / "licenses"
    if lic.exists():
        shutil.rmtree(lic)
    lic.mkdir()
    for package in chosen:
        src = corpus / "licenses" / f"{package}.copyright"
        if src.is_file():
            shutil.copyfile(src, lic / f"{package}.copyright")
    _write_license(out, {p: stats[p] for p in chosen}, {p: len(kept[p]) for p in chosen},
                   {p: sum(len(json.loads(x)["text"].encode()) for x in kept[p]) for p in chosen})
    return target


def _write_license(out: Path, stats: dict, pages: dict, nbytes: dict) -> None:
    lines = [
        "# The shipped sample: licenses",
        "",
        f"`{SAMPLE_NAME}` holds prose pages taken from the documentation that these Debian",
        "(bookworm, main) packages ship, reduced to paragraphs of English prose by",
        "`python -m sst_dist.data corpus` and cut by `python -m sst_dist.data sample`.",
        "Each line is a JSON object: `text`, and `source` (`package:path` of the page).",
        "",
        "Every page keeps the license of the package it comes from; all are permissive.",
        "The package's full Debian copyright file is in `licenses/<package>.copyright`.",
        "`tokenizer-bpe8k.json` (a byte-level BPE trained on this sample) is derived data",
        "under the same terms.",
        "",
        "| package | license | pages | MB of text |",
        "| --- | --- | ---: | ---: |",
    ]
    for package, s in stats.items():
        lines.append(f"| {package} | {s['license']} | {pages[package]} | {nbytes[package] / 1e6:.2f} |")
    lines += ["", f"Total: {sum(nbytes.values()) / 1e6:.1f} MB of text in {sum(pages.values())} pages."]
    (out / "LICENSE.md").write_text("\n".join(lines) + "\n")
