"""The data pipeline: packing, world-size-free sampling, resume, tokenizer, failures, eval."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time

import numpy as np
import pytest
import torch

import sst_dist.data.shards as prep
from sst_dist.config import DataConfig
from sst_dist.data import TrainData, open_data, prepare, prepared_dir
from sst_dist.data.tokenizer import load_bundled, load_tokenizer
from sst_dist.errors import DataError
from sst_dist.evaluate import evaluate

WORDS = ("the of and a to in is it that for on with as by alpha beta gamma delta sample "
         "shard block token rank epoch").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + "." for _ in range(n)]


def write_local(folder, docs, per_file=10):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(docs), per_file):
        with open(folder / f"part{k // per_file:03d}.jsonl", "w") as f:
            for doc in docs[k:k + per_file]:
                f.write(json.dumps({"text": doc}) + "\n")
    return folder


def local_cfg(tmp_path, docs, **kw):
    src = write_local(tmp_path / "src", docs)
    return DataConfig(source="local", path=str(src), tokenizer="bundled",
                      cache_dir=str(tmp_path / "cache"), num_proc=1, **kw)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def sample_folder(tmp_path_factory):
    cfg = DataConfig(source="sample", cache_dir=str(tmp_path_factory.mktemp("cache")), num_proc=2)
    t0 = time.time()
    folder = prepare(cfg, progress=False)
    return cfg, folder, time.time() - t0


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """About 60 blocks of 33 tokens in 3 shards: epochs end after a handful of steps."""
    tmp = tmp_path_factory.mktemp("small")
    cfg = local_cfg(tmp, make_docs(90), val_fraction=0.1)
    old = prep.DOCS_PER_PART
    prep.DOCS_PER_PART = 40
    try:
        prepare(cfg, progress=False)
    finally:
        prep.DOCS_PER_PART = old
    return cfg


def test_tokenizer_round_trip():
    tok = load_bundled()
    assert tok.vocab_size == 8192 and tok.eos_id == 2
    tk = tok.load()
    for text in ["Sparse Spectral Training keeps W = U diag(s) Vh.", "naïve café, 東京, emoji 🙂\n\ttabs",
                 ""]:
        ids = tk.encode(text, add_special_tokens=False).ids
        assert max(ids, default=0) < tok.vocab_size
        assert tk.decode(ids) == text
    prose = "The quick brown fox jumps over the lazy dog because the documentation said so."
    assert len(tk.encode(prose).ids) < len(prose) / 3  # a trained BPE, not bytes
    assert load_tokenizer("auto", "sample").name == tok.name


def test_sample_prepares_fast_and_once(sample_folder):
    cfg, folder, seconds = sample_folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["train_tokens"] > 1_000_000 and manifest["val_tokens"] > 0
    assert seconds < 30
    t0 = time.time()
    assert prepare(cfg, progress=False) == folder  # idempotent: the complete manifest is kept
    assert time.time() - t0 < 2
    data = open_data(cfg, seq_len=64, global_batch=4, seed=0)
    batch = data.next_batch()
    assert batch.shape == (4, 65) and batch.dtype == torch.long
    assert int(batch.max()) < data.vocab_size and data.eos_id == 2
    text = data.tokenizer_path.read_text()
    assert json.loads(text)["model"]["type"] == "BPE"


def test_packing_and_shard_boundaries(tmp_path, monkeypatch):
    docs = make_docs(50, seed=1)
    cfg = local_cfg(tmp_path, docs, val_fraction=0.2)
    monkeypatch.setattr(prep, "DOCS_PER_PART", 16)
    folder = prepare(cfg, progress=False)
    tk = load_bundled().load()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [p["docs"] for p in manifest["parts"]] == [16, 16, 16, 2]
    train_shards, val_docs = [], 0
    for k, part in enumerate(manifest["parts"]):
        expect = {"train": [], "val": []}
        for i in range(16 * k, 16 * k + part["docs"]):
            split = "val" if prep.is_val(i, 0.2) else "train"
            expect[split] += tk.encode(docs[i], add_special_tokens=False).ids + [2]  # doc EOS
            val_docs += split == "val"
        for split in ("train", "val"):
            got = np.fromfile(folder / part[split]["file"], dtype=np.uint16)
            assert got.tolist() == expect[split]
        train_shards.append(np.array(expect["train"]))
    assert val_docs == 10  # exactly val_fraction of the documents

    L = 16
    data = TrainData(folder, seq_len=L, global_batch=2, seed=0)
    assert data.num_blocks == sum((len(s) - 1) // L for s in train_shards)
    # every block is a contiguous slice of one shard, consecutive blocks overlap by one token
    blocks = data.train.gather(np.arange(data.num_blocks), data.vocab_size).numpy()
    b = 0
    for shard in train_shards:
        for j in range((len(shard) - 1) // L):
            assert blocks[b].tolist() == shard[j * L: j * L + L + 1].tolist()
            b += 1
    assert b == data.num_blocks


def test_global_batch_is_world_size_free(small_folder):
    cfg = small_folder
    gb = 8
    ref = open_data(cfg, seq_len=32, global_batch=gb, seed=7)
    per_epoch = ref.num_blocks // gb
    assert ref.num_blocks % gb  # some blocks are left over at each epoch's end
    steps = 2 * per_epoch + 3  # crosses two epoch boundaries
    ref_batches, ref_ids = [], []
    for _ in range(steps):
        ref_batches.append(ref.next_batch())
        ref_ids.append(ref.last_block_ids.copy())
    for ws in (2, 4):
        ranks = [open_data(cfg, seq_len=32, global_batch=gb, seed=7, rank=r, world_size=ws) for r in range(ws)]
        for t in range(steps):
            parts = [d.next_batch() for d in ranks]
            ids = [d.last_block_ids for d in ranks]
            assert all(p.shape == (gb // ws, 33) for p in parts)
            assert torch.equal(torch.cat(parts), ref_batches[t])
            flat = np.concatenate(ids)
            assert len(set(flat.tolist())) == gb  # disjoint
            assert flat.tolist() == ref_ids[t].tolist()  # and they cover the global batch
    # an epoch visits each block at most once; the next epoch is another order
    seen = np.concatenate(ref_ids[:per_epoch])
    assert len(set(seen.tolist())) == per_epoch * gb
    assert np.concatenate(ref_ids[per_epoch:2 * per_epoch]).tolist() != seen.tolist()
    other = open_data(cfg, seq_len=32, global_batch=gb, seed=8)
    other.next_batch()
    assert other.last_block_ids.tolist() != ref_ids[0].tolist()


def test_resume_continues_exactly(small_folder):
    cfg = small_folder
    run = open_data(cfg, seq_len=32, global_batch=4, seed=3)
    straight = [run.next_batch() for _ in range(30)]
    first = open_data(cfg, seq_len=32, global_batch=4, seed=3)
    for _ in range(11):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    # resume on 2 ranks from a single-process checkpoint
    resumed = [open_data(cfg, seq_len=32, global_batch=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for d in resumed:
        d.load_state_dict(state)
    for t in range(11, 30):
        assert torch.equal(torch.cat([d.next_batch() for d in resumed]), straight[t])
    wrong = open_data(cfg, seq_len=16, global_batch=4, seed=3)
    with pytest.raises(DataError) as err:
        wrong.load_state_dict(state)
    assert "seq_len" in one_line(err)


def test_errors_are_one_clear_line(tmp_path, small_folder):
    cfg = small_folder
    with pytest.raises(DataError) as err:
        open_data(cfg, seq_len=32, global_batch=6, seed=0, world_size=4)
    assert "global_batch" in one_line(err)
    with pytest.raises(DataError) as err:
        open_data(DataConfig(source="sample", cache_dir=str(tmp_path / "none")), seq_len=8, global_batch=2, seed=0)
    assert "manifest.json" in one_line(err) and "prepare" in str(err.value)
    with pytest.raises(DataError) as err:
        prepare(DataConfig(source="local", path=str(tmp_path / "nowhere"), tokenizer="bundled",
                           cache_dir=str(tmp_path / "cache")), progress=False)
    assert "nowhere" in one_line(err)
    with pytest.raises(DataError) as err:
        load_tokenizer(str(tmp_path / "tok.json"), "local")
    assert "tok.json" in one_line(err)


def _corrupt_copy(tmp_path, small_folder):
    cache = tmp_path / "cache"
    src = open_data(small_folder, seq_len=8, global_batch=2, seed=0).folder
    shutil.copytree(src, cache / src.name)
    cfg = DataConfig(**{**small_folder.__dict__, "cache_dir": str(cache)})
    open_data(cfg, seq_len=8, global_batch=2, seed=0)  # verifies and stamps the good copy
    return cfg, cache / src.name


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "manifest"])
def test_missing_or_corrupt_shard(tmp_path, small_folder, damage):
    cfg, folder = _corrupt_copy(tmp_path, small_folder)
    shard = folder / "train_00001.bin"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-6])
    elif damage == "flipped":  # same size, new bytes: only the checksum can tell
        raw = bytearray(shard.read_bytes())
        raw[10] ^= 0x5A
        shard.write_bytes(bytes(raw))
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:
        shard = folder / "manifest.json"
        shard.write_text("{not json")
    with pytest.raises(DataError) as err:
        open_data(cfg, seq_len=8, global_batch=2, seed=0)
    assert str(shard) in one_line(err)


def test_prepare_resumes_after_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "DOCS_PER_PART", 8)
    docs = make_docs(40, seed=2)
    clean = local_cfg(tmp_path / "a", docs)
    want = prepare(clean, progress=False)
    broken = local_cfg(tmp_path / "b", docs)
    bad = tmp_path / "b" / "src" / "part002.jsonl"  # documents 20..29
    good_text = bad.read_text()
    bad.write_text(good_text.split("\n", 3)[0] + "\n{oops\n")
    with pytest.raises(DataError) as err:
        prepare(broken, progress=False)
    assert "part002.jsonl:2" in one_line(err)
    folder = prepared_dir(broken)
    partial = json.loads((folder / "manifest.json").read_text())
    assert not partial["complete"] and [p["docs"] for p in partial["parts"]] == [8, 8]
    with pytest.raises(DataError):  # an incomplete folder does not train
        open_data(broken, seq_len=8, global_batch=2, seed=0)
    bad.write_text(good_text)
    assert prepare(broken, progress=False) == folder
    for name in sorted(p.name for p in want.glob("*.bin")):
        assert (want / name).read_bytes() == (folder / name).read_bytes()
    assert not list(folder.glob("*.partial"))


def test_many_processes_write_the_same_shards(tmp_path):
    docs = make_docs(300, seed=4)
    one = prepare(local_cfg(tmp_path / "one", docs), progress=False)
    cfg = local_cfg(tmp_path / "two", docs)
    cfg.num_proc = 2
    old = prep.CHUNK_CHARS
    prep.CHUNK_CHARS = 2000  # many tasks, so that both workers and the ordering are exercised
    try:
        two = prepare(cfg, progress=False)
    finally:
        prep.CHUNK_CHARS = old
    for name in ("train_00000.bin", "val_00000.bin"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_eval_batches_and_evaluate(sample_folder):
    from sst_dist.models import build_model

    cfg, _, _ = sample_folder
    L = 32
    datas = [open_data(cfg, seq_len=L, global_batch=4, seed=s, rank=r, world_size=2)
             for s, r in ((0, 0), (5, 1))]
    datas[1].next_batch()  # training position does not move the held-out set
    a = list(datas[0].eval_batches(tokens=200, batch_size=3))
    b = list(datas[1].eval_batches(tokens=200, batch_size=3))
    assert [x.shape[0] for x in a] == [3, 3, 1] and math.ceil(200 / L) == 7
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, datas[0].eval_batches(200, 3)))

    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=datas[0].vocab_size, seq_len=L)
    model.train()
    loss = evaluate(model, a)
    assert isinstance(loss, float) and model.training
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.cat(a)[:, :-1]).logits
        manual = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                   torch.cat(a)[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(manual, rel=1e-5)
    assert abs(loss - math.log(datas[0].vocab_size)) < 1.0  # an untrained model is near uniform


def test_hub_sources_fail_fast_offline(tmp_path, monkeypatch, capsys):
    import sst_dist.data.tokenizer as toks

    # As on a machine without the hub: the probe fails, and the repo is in no local cache.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(toks, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(prep, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(toks, "OPT_NAME", "sst-dist-tests/no-such-tokenizer")
    t0 = time.time()
    with pytest.raises(DataError) as err:
        load_tokenizer("opt", "openwebtext")
    assert "no-such-tokenizer" in one_line(err)
    tok = load_tokenizer("auto", "openwebtext")  # falls back with a one-line warning
    assert tok.name == load_bundled().name
    assert capsys.readouterr().err.count("\n") == 1
    cfg = DataConfig(source="openwebtext", tokenizer="bundled", cache_dir=str(tmp_path / "c"), num_proc=1)
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    assert "Skylion007/openwebtext" in one_line(err) and "data.source=local" in str(err.value)
    assert time.time() - t0 < 20


def test_local_tokenizer_folder(tmp_path):
    from transformers import PreTrainedTokenizerFast

    saved = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=load_bundled().load(), eos_token="</s>",
                            pad_token="<pad>").save_pretrained(saved)
    tok = load_tokenizer(str(saved), "local")
    assert tok.name.startswith("local-") and tok.eos_id == 2 and tok.vocab_size == 8192
    cfg = local_cfg(tmp_path, make_docs(20))
    cfg.tokenizer = str(saved / "tokenizer.json")
    folder = prepare(cfg, progress=False)
    assert folder.name.startswith("local-src-")
    assert folder.name.endswith("-" + load_tokenizer(cfg.tokenizer, "local").name)
    data = open_data(cfg, seq_len=8, global_batch=2, seed=0)
    assert data.vocab_size == 8192 and data.next_batch().shape == (2, 9)


def test_command_line_errors_in_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "sst_dist.data", "info", "--cache-dir", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not prepared" in proc.stderr


def test_a_changed_local_source_is_not_reused(tmp_path):
    """A prepared folder remembers its local files (names, sizes, times): new, edited or removed
    files stop the run with one line saying how to prepare again; a deleted source does not."""
    cfg = local_cfg(tmp_path, make_docs(30))
    folder = prepare(cfg, progress=False)
    assert prepare(cfg, progress=False) == folder  # unchanged: reused
    src = tmp_path / "src"
    edited = src / "part001.jsonl"
    edited.write_text(edited.read_text() + json.dumps({"text": "one more document."}) + "\n")
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    assert "changed since" in one_line(err) and f"delete {folder}" in str(err.value)
    for path in src.iterdir():
        path.unlink()
    src.rmdir()
    assert prepare(cfg, progress=False) == folder  # the shards are all training needs
    write_local(src, make_docs(30))
    os.utime(src / "part000.jsonl", ns=(0, 0))  # same names and sizes, another time
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    assert "other names or times" in one_line(err)

    shutil.rmtree(folder)
    assert prepare(cfg, progress=False) == folder  # prepared again from the new files


# ----------------------------------------------------------------------------- bad local files

def bad_files(src):
    """Files that must not become training tokens, and the one line each gives (after its path)."""
    import gzip

    rng = np.random.default_rng(7)
    blob = bytes(rng.integers(0, 256, 20_000, dtype=np.uint8))
    (src / "blob.txt").write_bytes(blob)
    latin = "Le café est fermé le dimanche, et la crème aussi.".encode("latin-1")
    (src / "latin.txt").write_bytes(latin)
    good = json.dumps({"text": "a good line"}).encode() + b"\n"
    bad = b'{"text": "na\xefve"}\n'  # Latin-1 in a UTF-8 file
    (src / "mixed.jsonl").write_bytes(good * 2 + bad)
    text = gzip.compress(" ".join(make_docs(400)).encode())
    (src / "cut.txt.gz").write_bytes(text[:len(text) // 2])
    (src / "plain.txt.gz").write_bytes(b"plain text, never compressed")
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError as err:
        blob_at = err.start
    mixed_at = 2 * len(good) + bad.index(0xEF)
    return {
        "blob.txt": f"byte {blob_at:,} (0x{blob[blob_at]:02x}) is not UTF-8",
        "latin.txt": f"byte {latin.index(b'caf') + 3} (0xe9) is not UTF-8",
        "mixed.jsonl": f"byte {mixed_at} (0xef) is not UTF-8",
        "cut.txt.gz": "truncated (the gzip stream ends early)",
        "plain.txt.gz": "not a gzip file, though named .gz",
    }


@pytest.mark.parametrize("name", ["blob.txt", "latin.txt", "mixed.jsonl", "cut.txt.gz", "plain.txt.gz"])
def test_a_bad_local_file_stops_prepare_naming_it(tmp_path, name):
    """Local files were decoded with errors="replace": a binary blob became training tokens.
    Now the first bad file stops `prepare` with one line naming it (and the byte), nothing of it
    tokenized."""
    cfg = local_cfg(tmp_path, make_docs(30))
    src = tmp_path / "src"
    expected = bad_files(src)
    for other in set(expected) - {name}:
        (src / other).unlink()
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    assert one_line(err).startswith(f"{src / name}: {expected[name]}"), str(err.value)
    assert "data.on_bad_file=skip" in str(err.value)


def test_on_bad_file_skip_leaves_each_bad_file_out_with_a_warning(tmp_path, capsys):
    docs = make_docs(30)
    want = prepare(local_cfg(tmp_path / "clean", docs), progress=False)
    cfg = local_cfg(tmp_path / "dirty", docs, on_bad_file="skip")
    src = tmp_path / "dirty" / "src"
    expected = bad_files(src)
    folder = prepare(cfg, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == len(expected)
    for name, problem in expected.items():
        assert any(line.startswith(f"warning: {src / name}: {problem}") and line.endswith(
            "; left out (data.on_bad_file=skip)") for line in warnings), (name, warnings)
    # exactly the good files' tokens: mixed.jsonl's two good lines went with its bad one
    for shard in sorted(p.name for p in want.glob("*.bin")):
        assert (want / shard).read_bytes() == (folder / shard).read_bytes(), shard


def test_on_bad_file_is_checked(tmp_path):
    from sst_dist.config import load_recipe
    from sst_dist.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_recipe("recipes/tiny-sst.yaml", ["data.on_bad_file=ignore"])
    assert str(err.value) == "data.on_bad_file: 'ignore' is not one of stop, skip"


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["settings"].pop("vocab_size"), "settings.vocab_size is missing"),
    (lambda m: m.pop("complete"), "complete is missing"),
    (lambda m: m["parts"][0]["train"].pop("crc32"), "parts[0].train.crc32 is missing"),
    (lambda m: m["settings"].update(dtype="int8"), 'settings.dtype is "int8", not uint16 or uint32'),
])
def test_a_manifest_missing_fields_is_one_line(tmp_path, small_folder, edit, problem):
    cfg, folder = _corrupt_copy(tmp_path, small_folder)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    for read in (lambda: open_data(cfg, seq_len=8, global_batch=2, seed=0), lambda: prepare(cfg, progress=False)):
        with pytest.raises(DataError) as err:
            read()
        assert one_line(err) == f"{path}: {problem}; delete {folder} and prepare again"


def test_a_second_prepare_of_one_folder_waits_for_the_first(tmp_path):
    """Two benches started together on one cache: the second waits for the first's lock, then finds
    the folder complete, where it had cleared away the other's .partial shards."""
    import fcntl
    import threading

    cfg = local_cfg(tmp_path, make_docs(60, seed=4))
    folder = prepare(cfg, progress=False)
    reference = {p.name: p.read_bytes() for p in folder.glob("*.bin")}
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    with open(folder / ".prepare.lock", "a") as held:  # the first process, mid-way
        fcntl.flock(held, fcntl.LOCK_EX)
        second = threading.Thread(target=prepare, args=(cfg,), kwargs={"progress": False})
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not (folder / "manifest.json").exists()
        (folder / "train_00000.bin.partial").write_bytes(b"the first's part")  # left alone while waiting
        assert (folder / "train_00000.bin.partial").exists()
    second.join(timeout=60)
    assert not second.is_alive()
    assert prep.read_manifest(folder)["complete"]
    assert {p.name: p.read_bytes() for p in folder.glob("*.bin")} == reference
    assert not list(folder.glob("*.partial"))


def test_a_write_error_not_from_a_full_disk_does_not_blame_the_space(tmp_path):
    err = OSError(errno.ENOENT, "No such file or directory")
    msg = str(prep.cannot_write(tmp_path / "train_00000.bin.partial", err))
    assert "free some space" not in msg and str(tmp_path) in msg and "\n" not in msg
    assert "free some space" in str(prep.cannot_write(tmp_path / "x", OSError(errno.ENOSPC, "No space left")))


def test_a_write_error_during_prepare_is_one_line_and_leaves_no_partial_shard(tmp_path):
    """RLIMIT_FSIZE makes a write past 700 kB fail (EFBIG) as a full disk would (ENOSPC): after
    tokenizer.json (550 kB), in the first shard."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    src = write_local(tmp_path / "src", make_docs(20_000, seed=3), per_file=5_000)
    cache = tmp_path / "cache"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (700_000, 700_000))  # Python ignores SIGXFSZ

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "sst_dist.data", "prepare", "--source", "local", "--path",
                           str(src), "--tokenizer", "bundled", "--cache-dir", str(cache), "--num-proc", "1",
                           "--quiet"], cwd=root, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    folder = next(cache.iterdir())
    assert lines[0].startswith(f"error: {folder / 'train_00000.bin.partial'}: cannot write (File too large)")
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.bin"))


# ----------------------------------------------------------------------------- C4

def write_c4(folder, train, val, per_file=7):
    """Files as allenai/c4's en folder names and holds them: JSON lines with text, timestamp and url."""
    import gzip

    (folder / "en").mkdir(parents=True, exist_ok=True)
    for split, docs in (("train", train), ("validation", val)):
        count = math.ceil(len(docs) / per_file)
        for k in range(count):
            with gzip.open(folder / "en" / f"c4-{split}.{k:05d}-of-{count:05d}.json.gz", "wt") as f:
                for i, doc in enumerate(docs[k * per_file:(k + 1) * per_file]):
                    f.write(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z",
                                        "url": f"https://example.org/{split}/{k}/{i}"}) + "\n")
    return folder


def test_c4_holds_out_its_validation_split(tmp_path, monkeypatch):
    train, val = make_docs(40, seed=2), make_docs(3, seed=3)
    src = write_c4(tmp_path / "c4", train, val)
    monkeypatch.setattr(prep, "hub_reachable", lambda timeout=3.0: False)  # a local copy needs no hub
    cfg = DataConfig(source="c4", path=str(src), tokenizer="bundled", cache_dir=str(tmp_path / "cache"),
                     num_proc=1, val_fraction=0.1)
    folder = prepare(cfg, progress=False)
    assert folder.name.startswith("c4-en-c4-") and folder == prepared_dir(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["hf_dataset"] == "allenai/c4/en" and manifest["docs"] == 43
    tk = load_bundled().load()

    def tokens(docs):
        return [t for doc in docs for t in tk.encode(doc, add_special_tokens=False).ids + [2]]

    # slots 9, 19, 29 (is_val at 0.1) take the validation split in order; past its end (slot 39),
    # a training document is held out instead; the rest is C4's training split in order
    slots = [i for i in range(43) if prep.is_val(i, 0.1)]
    assert slots == [9, 19, 29, 39]
    got = {split: np.fromfile(folder / manifest["parts"][0][split]["file"], dtype=np.uint16).tolist()
           for split in ("train", "val")}
    assert got["val"] == tokens(val + [train[36]])
    assert got["train"] == tokens(train[:36] + train[37:])
    # open_data reads it as any prepared source
    data = open_data(cfg, seq_len=16, global_batch=2, seed=0)
    assert data.next_batch().shape == (2, 17)


def test_c4_errors_are_one_line(tmp_path, monkeypatch):
    from sst_dist.config import load_recipe
    from sst_dist.errors import ConfigError

    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = DataConfig(source="c4", path=str(empty), tokenizer="bundled", cache_dir=str(tmp_path / "c"), num_proc=1)
    with pytest.raises(DataError) as err:
        prepare(cfg, progress=False)
    assert "no C4 train files (c4-train.*.json.gz" in one_line(err)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(prep, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError) as err:
        prepare(DataConfig(source="c4", tokenizer="bundled", cache_dir=str(tmp_path / "c"), num_proc=1),
                progress=False)
    assert one_line(err).startswith("data.source=c4 (allenai/c4 en): the Hugging Face hub is not reachable")
    assert "set data.path (C4's en folder of json.gz files) to a downloaded copy" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_recipe("recipes/tiny-llama-sst.yaml", ["data.source=c5"])
    assert "data.source: 'c5' is not one of sample, local, openwebtext, c4" in one_line(err)
