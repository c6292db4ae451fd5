"""Stage two on caches larger than RAM: lazy reads give the in-memory values bit for bit, so a seeded
run gets identical metrics; auto picks lazy under a memory budget; older (chunked) caches still load
and can be rewritten; every writer stores features contiguously."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from synthetic import provenance, separable_cache

import pipeline.cache
from cli import main
from pipeline.cache import CacheWriter, FeatureCache, VideoRecord, write_cache
from pipeline.checkpoint import load_checkpoint
from pipeline.config import TemporalConfig
from pipeline.engine import FeatureBank, LazyBank
from pipeline.runtime import available_memory
from pipeline.sampling import sample
from pipeline.sources import open_splits, plan_load
from pipeline.train import evaluate_checkpoint, train_temporal

CPU = torch.device("cpu")


def cfg(cache, out, **kw) -> TemporalConfig:
    base = dict(hidden=16, epochs=3, batch_size=8, lr=3e-3, dropout=0.3, seq_len=6, warmup_epochs=0.5, device="cpu")
    return TemporalConfig(cache=str(cache), out=str(out), **{**base, **kw})


def old_layout_copy(src, dst, chunk_rows: int = 7):
    """The layout caches had before: ``features``/``frame_indices`` resizable and chunked."""
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        g.attrs.update(f.attrs)
        for split in f:
            for name, ds in f[split].items():
                if name in ("features", "frame_indices"):
                    g.create_dataset(f"{split}/{name}", data=ds[()], maxshape=(None, *ds.shape[1:]),
                                     chunks=(chunk_rows, *ds.shape[1:]))
                else:
                    g.create_dataset(f"{split}/{name}", data=ds[()], dtype=ds.dtype)
    return dst


def same_file(a, b) -> None:
    with h5py.File(a) as f, h5py.File(b) as g:
        assert dict(f.attrs) == dict(g.attrs)
        assert sorted(f) == sorted(g)
        for split in f:
            assert sorted(f[split]) == sorted(g[split])
            for name in f[split]:
                x, y = f[split][name], g[split][name]
                assert x.dtype == y.dtype and np.array_equal(x[()], y[()]), (split, name)


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_lazy_gather_equals_memory_bit_for_bit(tmp_path, dtype, layout):
    path = separable_cache(tmp_path / "c.h5", length=(2, 30), dtype=dtype)  # some videos shorter than a clip
    if layout == "chunked":
        path = old_layout_copy(path, tmp_path / "old.h5")
    with FeatureCache(path) as cache:
        assert cache.layout("train") == layout
        data = cache.load_split("train")
        mem = FeatureBank.from_arrays(data.features, data.offsets, data.labels, CPU)
        lazy = LazyBank(cache.open_lazy("train"), CPU)
    rng = np.random.default_rng(0)
    n = len(mem)
    assert np.array_equal(lazy.lengths, mem.lengths) and torch.equal(lazy.labels, mem.labels)
    requests = []
    for kind in ("segment", "random", "uniform"):
        videos = rng.integers(0, n, 40)  # repeats too
        pos, _ = sample(kind, mem.lengths[videos], 6, rng)
        requests.append((videos, pos))
    videos = np.arange(n)
    requests.append((videos, (rng.random((n, 9)) * mem.lengths[:, None]).astype(np.int64)))  # any rows at all
    for videos, pos in requests:
        a, b = mem.gather(videos, pos), lazy.gather(videos, pos)
        assert b.dtype == torch.float32 and b.shape == a.shape == (*pos.shape, 32)
        assert torch.equal(a, b)
    for a, b in zip(mem.gather_batches(requests), lazy.gather_batches(requests), strict=True):
        assert torch.equal(a, b)
    lazy.close()


def test_lazy_and_memory_training_give_identical_results(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 5})
    a = train_temporal(cfg(cache, tmp_path / "mem", load="memory", eval_clips=2), progress=False)
    b = train_temporal(cfg(cache, tmp_path / "lazy", load="lazy", eval_clips=2), progress=False)
    assert "train memory" in a.load and "test memory" in a.load
    assert "train lazy" in b.load and "test lazy" in b.load
    for x, y in zip(a.history, b.history, strict=True):
        assert {k: v for k, v in x.items() if "second" not in k} == {k: v for k, v in y.items() if "second" not in k}
    sa, sb = (load_checkpoint(tmp_path / r / "last.pt")["model_state"] for r in ("mem", "lazy"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_auto_chooses_lazy_under_a_small_memory_budget(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 4})
    with FeatureCache(cache) as c:
        train_b, test_b = c.feature_bytes("train"), c.feature_bytes("test")
    assert test_b < train_b
    base = ["train-temporal", "--cache", str(cache), "--epochs", "1", "--hidden", "8", "--seq-len", "4",
            "--no-progress", "--device", "cpu"]
    # room for the test split only: it is held, the larger train split is read lazily
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "a"), "--memory-budget", str((test_b + 1) / 1e9)])
    assert r.exit_code == 0, r.output
    assert "train lazy" in r.stdout and "test memory" in r.stdout
    assert "--load auto, memory budget" in r.stderr and "--memory-budget" in r.stderr
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "b")])  # default budget: half of the RAM
    assert r.exit_code == 0 and "train memory" in r.stdout and "test memory" in r.stdout
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "c"), "--load", "lazy"])
    assert r.exit_code == 0 and "train lazy" in r.stdout and "test lazy" in r.stdout
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "d"), "--memory-budget", "0"])
    assert r.exit_code == 2 and "--memory-budget" in r.stderr


def test_plan_load():
    sizes = {"train": 900, "val": 100, "extra": 300}
    assert plan_load(sizes, "auto", 1000) == {"train": "lazy", "val": "memory", "extra": "memory"}
    assert plan_load(sizes, "auto", 350) == {"train": "lazy", "val": "memory", "extra": "lazy"}
    assert plan_load(sizes, "auto", None) == dict.fromkeys(sizes, "memory")  # memory unknown: as before
    assert plan_load(sizes, "memory", 1) == dict.fromkeys(sizes, "memory")
    assert plan_load(sizes, "lazy", 10**12) == dict.fromkeys(sizes, "lazy")
    avail = available_memory()
    assert avail is None or avail > 0


def test_evaluate_lazily_equals_in_memory(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "test": 5})
    train_temporal(cfg(cache, tmp_path / "run", epochs=2), progress=False)
    ckpt = tmp_path / "run" / "best.pt"
    a = evaluate_checkpoint(ckpt, cache, "test", device="cpu", load="memory", eval_clips=3)
    b = evaluate_checkpoint(ckpt, cache, "test", device="cpu", load="lazy", eval_clips=3)
    assert np.array_equal(a.probs, b.probs) and a.metrics == b.metrics and a.videos == b.videos
    assert "test lazy" in b.load
    r = CliRunner().invoke(main, ["evaluate", str(ckpt), "--cache", str(cache), "--split", "test", "--load", "lazy"])
    assert r.exit_code == 0 and "cache: test lazy" in r.stdout


def test_old_chunked_cache_still_loads_and_rewrite_cache_makes_it_contiguous(tmp_path, caplog):
    new = separable_cache(tmp_path / "new.h5", classes=3, per_class={"train": 8, "test": 4})
    old = old_layout_copy(new, tmp_path / "old.h5")
    with FeatureCache(old) as c, FeatureCache(new) as d:
        assert c.layout("train") == "chunked" and d.layout("train") == "contiguous"
        assert np.array_equal(c.load_split("train").features, d.load_split("train").features)
    a = train_temporal(cfg(new, tmp_path / "a", epochs=2, load="memory"), progress=False)
    b = train_temporal(cfg(old, tmp_path / "b", epochs=2, load="lazy"), progress=False)  # chunk-wise reads
    assert "rewrite-cache" in caplog.text and "chunked" in caplog.text
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]

    run = CliRunner().invoke
    r = run(main, ["rewrite-cache", str(old), "--output", str(tmp_path / "copy.h5")])
    assert r.exit_code == 0 and "was: test chunked, train chunked" in r.stdout
    r = run(main, ["rewrite-cache", str(old)])  # in place, atomically
    assert r.exit_code == 0 and "every split contiguous" in r.stdout
    assert not list(tmp_path.glob("*.tmp"))
    for path in (old, tmp_path / "copy.h5"):
        with FeatureCache(path) as c:
            assert all(c.layout(s) == "contiguous" for s in c.splits)
        same_file(path, old_layout_copy(new, tmp_path / "ref.h5"))
    r = run(main, ["rewrite-cache", str(old)])
    assert r.exit_code == 0 and "nothing to do" in r.stdout
    # While extract-features holds the cache (and writes its temporary file), rewrite-cache waits its
    # turn; the temporary file a killed writer left goes with the next command that holds the cache.
    from pipeline.files import exclusive

    tmp = Path(f"{old}.tmp")
    tmp.write_bytes(b"being written")
    with exclusive(old, "--output"):
        r = run(main, ["rewrite-cache", str(old), "--force"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and f"cache {old} is in use by another process" in r.stderr
    assert tmp.read_bytes() == b"being written"
    r = run(main, ["rewrite-cache", str(old)])
    assert r.exit_code == 0 and "nothing to do" in r.stdout and not tmp.exists()
    tmp.mkdir()  # not a file of ours: named, not removed
    r = run(main, ["rewrite-cache", str(old), "--force"])
    assert r.exit_code == 1 and f"{tmp} is a folder, in the way of the temporary file" in r.stderr and tmp.is_dir()
    tmp.rmdir()
    r = run(main, ["rewrite-cache", str(tmp_path / "nope.h5")])
    assert r.exit_code == 1 and "feature cache not found" in r.stderr
    r = run(main, ["rewrite-cache", str(tmp_path)])  # a folder is named as one, as the other commands do
    assert r.exit_code == 1 and f"{tmp_path} is a folder; give the feature cache file (.h5)" in r.stderr
    before = new.read_bytes()
    r = run(main, ["rewrite-cache", str(old), "-o", str(new)])  # an existing file is not replaced by default
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and f"--output {new} exists" in r.stderr
    assert new.read_bytes() == before
    ckpt = tmp_path / "best.pt"
    torch.save({"x": torch.zeros(1)}, ckpt)
    r = run(main, ["rewrite-cache", str(old), "-o", str(ckpt), "--force"])  # nor, even with --force, a non-HDF5 one
    assert r.exit_code == 1 and f"--output {ckpt} exists and is not an HDF5 file, which --force does not replace; " \
                                "give a new file name" in r.stderr
    r = run(main, ["rewrite-cache", str(old), "-o", str(tmp_path), "--force"])
    assert r.exit_code == 1 and f"--output {tmp_path} exists and is a folder, which --force does not" in r.stderr
    r = run(main, ["rewrite-cache", str(old), "-o", str(tmp_path / "copy.h5"), "--force"])  # its own earlier output
    assert r.exit_code == 0, r.stderr


def _records(split: str, n: int, dim: int = 8, seed: int = 0) -> list[VideoRecord]:
    rng = np.random.default_rng(seed)
    return [VideoRecord(f"{split}/c{i % 2}/v{i}", i % 2, rng.normal(size=(t, dim)).astype(np.float16),
                        np.arange(t) * 2, 25.0) for i, t in enumerate(rng.integers(0, 9, n))]  # empty videos too


def _contiguous_with(path, expected: dict[str, list[VideoRecord]]) -> None:
    with h5py.File(path) as f:
        for split, recs in expected.items():
            ds = f[split]["features"]
            assert ds.chunks is None and f[split]["frame_indices"].chunks is None
    with FeatureCache(path) as c:
        for split, recs in expected.items():
            d = c.load_split(split)
            assert d.videos == [r.rel for r in recs]
            for i, r in enumerate(recs):
                assert np.array_equal(d.video(i), r.features)
                assert np.array_equal(d.frame_indices[d.offsets[i]:d.offsets[i + 1]], r.frame_indices)
            lazy = c.open_lazy(split)
            rows = np.arange(len(d.features))
            assert np.array_equal(lazy.read_rows(rows), d.features)
            lazy.close()


def test_every_writer_stores_features_contiguously(tmp_path, monkeypatch):
    prov = provenance(["c0", "c1"], 8)
    recs = {"train": _records("train", 30), "test": _records("test", 7, seed=1), "empty": []}
    write_cache(tmp_path / "list.h5", prov, recs)
    _contiguous_with(tmp_path / "list.h5", recs)
    monkeypatch.setattr(pipeline.cache, "SPOOL_BYTES", 500)  # the iterator spools to a file
    write_cache(tmp_path / "iter.h5", prov, {s: iter(r) for s, r in recs.items()})
    _contiguous_with(tmp_path / "iter.h5", recs)

    # extraction's writer: parts, then the cache; then a rerun adds videos to the existing cache
    path = tmp_path / "ex.h5"
    w = CacheWriter(path, prov)
    for r in recs["train"][:20]:
        w.add("train", r)
    w.finalize({"train": [r.rel for r in recs["train"][:20]]}, {})
    _contiguous_with(path, {"train": recs["train"][:20]})
    w = CacheWriter(path, prov)
    for r in recs["train"][20:]:
        w.add("train", r)
    for r in recs["test"]:
        w.add("test", r)
    w.finalize({"train": [r.rel for r in recs["train"]], "test": [r.rel for r in recs["test"]]}, {})
    _contiguous_with(path, {"train": recs["train"], "test": recs["test"]})


def test_lazy_reads_find_nan(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    with h5py.File(cache, "r+") as f:  # NaN as a diverged extraction writes it: under its checksum
        f["train/features"][5, 3] = np.nan
        a, b = f["train/offsets"][0:2]
        assert a <= 5 < b
        f["train/checksums"][0] = pipeline.cache.video_checksum(f["train/features"][a:b], f["train/frame_indices"][a:b])
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                  "--load", "lazy", "--no-progress", "--hidden", "8"])
    assert r.exit_code == 1 and "NaN/Inf in the features of train/c0/v0 (split 'train')" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_lazy_reads_check_each_video_against_its_checksum(tmp_path, layout):
    """A changed bit (still a finite number) was refused by --load memory and trained on by --load
    lazy, so --load auto caught damage or not by the free memory. A lazy read now checks a video
    the first time it touches it, whichever row it asks for."""
    from test_robustness import _flip_feature_bit

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3}, length=(6, 9))
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                  "--load", "lazy", "--no-progress", "--hidden", "8", "--epochs", "1"])
    assert r.exit_code == 0, r.stderr
    rel = _flip_feature_bit(cache, "train", 4)  # its row 0, value 3
    if layout == "chunked":
        cache = old_layout_copy(cache, tmp_path / "old.h5", chunk_rows=5)
    with FeatureCache(cache) as c, c.open_lazy("train") as lazy:
        a, b = int(lazy.offsets[4]), int(lazy.offsets[5])
        assert lazy.read_rows(np.arange(0, a)).shape == (a, lazy.feature_dim)  # the videos before it are intact
        with pytest.raises(pipeline.cache.CacheError, match=f"{rel} \\(split 'train'\\) do not match their checksum"):
            lazy.read_rows(np.array([b - 1]))  # its last row: unchanged itself, but the video is damaged
        with c.open_lazy("test") as other:
            other.read_rows(np.arange(other.shape[0]))  # the other split is intact
    old = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}  # a run on the intact cache
    assert "best.pt" in old and "test.json" in old
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                  "--load", "lazy", "--no-progress", "--hidden", "8", "--epochs", "1", "--overwrite"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr
    assert f"the features of {rel} (split 'train') do not match their checksum" in r.stderr
    # found before the run started, as --load memory finds it: --overwrite has not cleared the old run
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == old
    # a cache written before the checksums is read unchecked, as in memory
    with h5py.File(cache, "r+") as f:
        del f["train/checksums"]
    with FeatureCache(cache) as c, c.open_lazy("train") as lazy:
        assert lazy.read_rows(np.array([b - 1])).shape == (1, lazy.feature_dim)


def test_rewrite_cache_refuses_a_damaged_cache(tmp_path):
    """A rewrite reads every row: it copied a damaged cache and said "wrote"."""
    from test_robustness import _flip_feature_bit

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3}, length=(6, 9))
    with FeatureCache(cache) as c:
        for block in (1, 300, 64 << 20):  # a video per read, a few, all: whole videos each time
            c.verify("train", block_bytes=block)
    rel = _flip_feature_bit(cache, "train", 11)
    with FeatureCache(cache) as c:
        for block in (1, 300, 64 << 20):
            with pytest.raises(pipeline.cache.CacheError, match=f"{rel} \\(split 'train'\\) do not match"):
                c.verify("train", block_bytes=block)
    before = cache.read_bytes()
    for args in (["--force"], ["-o", str(tmp_path / "copy.h5")]):
        r = CliRunner().invoke(main, ["rewrite-cache", str(cache), *args])
        assert r.exit_code == 1 and "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr
        assert f"the features of {rel} (split 'train') do not match their checksum" in r.stderr
    assert cache.read_bytes() == before and not (tmp_path / "copy.h5").exists()
    with h5py.File(cache, "r+") as f:  # offsets that do not cut the rows into videos
        f["test/offsets"][-1] += 1
    r = CliRunner().invoke(main, ["rewrite-cache", str(cache), "-o", str(tmp_path / "copy.h5")])
    assert r.exit_code == 1 and "split 'test' is inconsistent" in r.stderr and not (tmp_path / "copy.h5").exists()


class CountingReader:
    """A reader whose rows are their own numbers; counts reads, can hold them back."""

    def __init__(self, n: int) -> None:
        self.offsets = np.arange(n + 1) * 4
        self.labels = np.zeros(n, dtype=np.int64)
        self.reads = 0
        self.lock = threading.Lock()

    def read_rows(self, rows):
        with self.lock:
            self.reads += 1
        return np.repeat(rows[:, None].astype(np.float32), 3, 1)


def test_prefetch_reads_ahead_a_bounded_number_of_batches():
    reader = CountingReader(20)
    bank = LazyBank(reader, CPU, prefetch=2)
    requests = [(np.array([v]), np.array([[0, 3]])) for v in range(20)]
    it = bank.gather_batches(requests)
    first = next(it)
    time.sleep(0.2)
    assert reader.reads <= 3  # the one delivered and at most two ahead
    rest = list(it)
    assert [int(x[0, 0, 0]) for x in [first, *rest]] == [4 * v for v in range(20)]  # in order
    it = bank.gather_batches(requests)
    next(it)
    it.close()  # the consumer stops early: nothing more is read
    n = reader.reads
    time.sleep(0.1)
    assert reader.reads == n <= 20 + 3


def test_open_splits_for_any_caller(tmp_path):
    """What the sweep does: open the splits once, with a mode, and read clips through the seam."""
    cache = separable_cache(tmp_path / "c.h5", classes=2, per_class={"train": 4, "test": 2})
    with FeatureCache(cache) as c:
        opened = open_splits(c, ["train", "test", "train"], CPU, load="lazy")
    with opened:
        assert list(opened) == ["train", "test"] and opened.modes() == {"train": "lazy", "test": "lazy"}
        src = opened["train"].source
        x = src.gather(np.array([0, 1]), np.zeros((2, 3), dtype=np.int64))
        assert x.shape == (2, 3, 32) and opened["train"].data.feature_dim == 32


def test_part_torn_inside_its_features_is_redone(tmp_path):
    """Parts are written without fsync: a power cut can leave one whose zip structure is intact but
    whose feature bytes are not. done() must not count it (the CRC shows it), and drops it."""
    prov = provenance(["c0", "c1"], 8)
    recs = _records("train", 3)
    w = CacheWriter(tmp_path / "c.h5", prov)
    for r in recs:
        w.add("train", r)
    torn = sorted((tmp_path / "c.h5.partial" / "train").glob("*.npz"))[0]
    with np.load(torn) as z:
        rel, feats = str(z["rel"]), z["features"].tobytes()
    data = bytearray(torn.read_bytes())
    mid = bytes(data).index(feats) + len(feats) // 2  # stored uncompressed: the bytes sit in the file as they are
    data[mid:mid + 8] = bytes(255 - b for b in data[mid:mid + 8])
    torn.write_bytes(bytes(data))
    assert set(CacheWriter(tmp_path / "c.h5", prov).done("train")) == {r.rel for r in recs} - {rel}
    assert not torn.exists()


def test_a_cache_whose_datasets_disagree_is_refused_in_one_line(tmp_path):
    """Edited or damaged caches: sizes, offsets or labels that disagree are named when the split is
    opened, before any training reads past the end of a dataset or indexes a missing class."""
    import shutil

    from pipeline.errors import CacheError

    good = separable_cache(tmp_path / "good.h5", classes=3, per_class={"train": 4, "test": 2})

    def narrow(g):
        feats = g["features"][()][:, :4]
        del g["features"]
        g["features"] = feats

    def long_offsets(g):
        g["offsets"][-1] = g["offsets"][-1] + 5

    def bad_label(g):
        g["labels"][0] = 99

    def no_fps(g):
        del g["fps"]

    edits = {"narrow": (narrow, r"features of shape \(\d+, 4\), not \(frames, \d+\)"),
             "long_offsets": (long_offsets, "offsets do not cut its"),
             "bad_label": (bad_label, r"labels outside 0\.\.2"), "no_fps": (no_fps, "no fps")}
    for name, (edit, msg) in edits.items():
        bad = tmp_path / f"{name}.h5"
        shutil.copy(good, bad)
        with h5py.File(bad, "r+") as f:
            edit(f["test"])
        with FeatureCache(bad) as c:
            c.load_split("train")  # the other split is fine
            for read in (c.load_split, c.open_lazy, c.num_videos):
                with pytest.raises(CacheError, match=rf"split 'test' is inconsistent \({msg}.*\); re-extract"):
                    read("test")
