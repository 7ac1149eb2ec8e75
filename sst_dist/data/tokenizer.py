"""Tokenizers: OPT's through `AutoTokenizer`, the bundled byte-level BPE, or a local file.

Everything is reduced to a `tokenizers.Tokenizer` (the Rust object behind every fast HF
tokenizer): its JSON is what worker processes load, what the prepared folder keeps next to the
shards, and what the folder's name is checked against.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from sst_dist.errors import DataError
from sst_dist.hub import hub_reachable

OPT_NAME = "facebook/opt-125m"
SAMPLE_DIR = Path(__file__).parent / "sample"
BUNDLED_PATH = SAMPLE_DIR / "tokenizer-bpe8k.json"
# OPT's ids for its special tokens, so that pad=1 and bos=eos=2 in the model config hold for
# either tokenizer.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")


@dataclass
class Tok:
    name: str  # short, for folder names: "bundled-bpe8k", "opt", "local-<hash>"
    json: str  # the tokenizers.Tokenizer serialisation
    vocab_size: int
    eos_id: int

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.json.encode()).hexdigest()[:16]

    def load(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.json)


def _from_tokenizer(name: str, tk, eos_id: int | None = None) -> Tok:
    if eos_id is None:
        for token in _EOS_CANDIDATES:
            eos_id = tk.token_to_id(token)
            if eos_id is not None:
                break
    if eos_id is None:
        raise DataError(f"data.tokenizer: {name} has no end-of-text token (one of {', '.join(_EOS_CANDIDATES)})")
    return Tok(name, tk.to_str(), tk.get_vocab_size(with_added_tokens=True), int(eos_id))


def load_opt() -> Tok:
    """OPT's GPT-2 BPE from the hub, or from the local HF cache when the hub is unreachable."""
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        online = hub_reachable()
        tok = AutoTokenizer.from_pretrained(OPT_NAME, local_files_only=not online)
    except Exception as err:  # OSError, ValueError, requests errors...: all mean "not here"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"data.tokenizer=opt: cannot load {OPT_NAME} ({reason[:160]})") from None
    return _from_tokenizer("opt", tok.backend_tokenizer, tok.eos_token_id)


def load_bundled() -> Tok:
    if not BUNDLED_PATH.is_file():
        raise DataError(f"{BUNDLED_PATH}: missing; rebuild it with `python -m sst_dist.data tokenizer`")
    from tokenizers import Tokenizer

    try:
        tk = Tokenizer.from_file(str(BUNDLED_PATH))
    except Exception:
        raise DataError(f"{BUNDLED_PATH}: not a valid tokenizer file") from None
    return _from_tokenizer(f"bundled-bpe{tk.get_vocab_size() // 1024}k", tk)


def load_local(path: str) -> Tok:
    p = Path(path).expanduser()
    tag = "local-" + hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]
    if p.is_dir() and (p / "tokenizer.json").is_file():
        p = p / "tokenizer.json"
    if p.is_file():
        from tokenizers import Tokenizer

        try:
            return _from_tokenizer(tag, Tokenizer.from_file(str(p)))
        except DataError:
            raise
        except Exception:
            raise DataError(f"data.tokenizer: {p} is not a tokenizers JSON file") from None
    if p.is_dir():  # a saved HF tokenizer without tokenizer.json (e.g. vocab.json + merges.txt)
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            return _from_tokenizer(tag, tok.backend_tokenizer, tok.eos_token_id)
        except Exception:
            raise DataError(f"data.tokenizer: {p} holds no tokenizer that AutoTokenizer can load") from None
    raise DataError(f"data.tokenizer: {path!r} is not auto, opt, bundled, or an existing file/folder")


def load_tokenizer(spec: str, source: str) -> Tok:
    """Resolves the recipe's `data.tokenizer` for `data.source`."""
    if spec == "bundled" or (spec == "auto" and source == "sample"):
        return load_bundled()
    if spec == "opt":
        return load_opt()
    if spec == "auto":
        try:
            return load_opt()
        except DataError as err:
            print(f"warning: {err}; using the bundled BPE tokenizer instead", file=sys.stderr)
            return load_bundled()
    return load_local(spec)


def train_bpe(texts, vocab_size: int = 8192, out: str | Path = BUNDLED_PATH) -> Path:
    """Trains a byte-level BPE (GPT-2 style pre-tokenizer) on an iterator of strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no <unk>
        min_frequency=2,
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tk.save(str(out))
    return out
