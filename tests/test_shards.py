"""The shard contract: round trip, validation, refusal of unsafe members, crash-safe writing."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import tarfile
import warnings

import numpy as np
import pytest
import soundfile
import torch

import shards
from shards.__main__ import main as shards_main
from tests.conftest import make_sample


@pytest.fixture
def spec(tiny_cfg) -> shards.ShardSpec:
    return tiny_cfg.shard_spec()


def write_meta(directory, spec):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / shards.META_FILE).write_text(json.dumps({"schema_version": shards.SCHEMA_VERSION, "spec": spec.to_dict()}))


def test_spec_shapes_follow_the_config(tiny_cfg):
    spec = tiny_cfg.shard_spec()
    assert spec.num_frames == round(10.24 * tiny_cfg.fps)
    assert spec.latent_shape == (8, 256, 16)
    assert spec.num_samples == 163840
    paper = tiny_cfg.replace(fps=4.0, embed_dim=768).shard_spec()
    assert paper.num_frames == 41 and paper.embed_dim == 768
    assert shards.ShardSpec.from_dict(spec.to_dict()) == spec


def test_round_trip_through_a_shard(tmp_path, spec):
    write_meta(tmp_path, spec)
    writer = shards.ShardWriter(tmp_path, "train", rank=0, max_samples=2)
    originals = {}
    for i, k in enumerate([0, 1, 3]):  # 0 nouns is legal
        meta, arrays, waveform = make_sample(spec, f"clip.{i}/x", num_nouns=k, seed=i)
        writer.write(shards.encode_sample(spec, meta, arrays, waveform))
        originals[meta["id"]] = (meta, arrays, waveform)
    writer.close()
    assert [p.name for p in shards.list_shards(tmp_path)] == ["train-000-000000.tar", "train-000-000001.tar"]

    decoded = list(shards.iterate_samples(shards.list_shards(tmp_path), spec))
    assert [s["json"]["id"] for s in decoded] == list(originals)
    for sample in decoded:
        meta, arrays, waveform = originals[sample["json"]["id"]]
        assert sample["__key__"] == shards.sample_key(meta["id"]) and "." not in sample["__key__"]
        assert sample["json"] == meta
        assert spec.schema_version == 2 and spec.array_keys == shards.ARRAY_KEYS
        for key in shards.ARRAY_KEYS:  # version 2: detector.npy and iou.npy too
            assert sample[key].dtype == np.float16
            np.testing.assert_allclose(sample[key], arrays[key].astype(np.float16))
        product = sample["detector.npy"].astype(np.float32) * sample["iou.npy"].astype(np.float32)
        np.testing.assert_allclose(sample["probs.npy"], product, atol=1e-3)
        np.testing.assert_allclose(sample["flac"], waveform, atol=1 / 2**15)
    first = shards.list_shards(tmp_path)[0]
    index = shards.shard_index(first)
    assert sorted(index) == sorted(shards.sample_key(i) for i in list(originals)[:2])
    assert all(meta is not None and meta.caption == originals[meta.id][0]["caption"] for meta in index.values())


def test_a_shard_index_keeps_a_key_whose_json_member_does_not_parse(tmp_path):
    """Stage one's resume counts a clip as made when its json member is there, parsed or not (else it is made
    again, and the folder holds it twice); only what parses is compared with the manifest."""
    import io
    import tarfile

    good = {"id": "a", "caption": "a dog", "label": "", "split": "train", "duration": 1.0, "valid_frames": 2,
            "nouns": ["dog"], "source": "/v/a.mp4"}
    path = tmp_path / "train-000-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.json", json.dumps(good).encode()), ("a.flac", b"x"), ("b.json", b"{not json"),
                           ("c.json", b"[1, 2]"), ("c.flac", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = shards.shard_index(path)
    assert list(index) == ["a", "b", "c"] and index["b"] is None and index["c"] is None
    assert index["a"] is not None and index["a"].id == "a"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m, a: a.update({"clip.npy": a["clip.npy"][:-1]}), "clip.npy has shape"),
        (lambda m, a: a.update({"probs.npy": a["probs.npy"] + 1.5}), "outside [0, 1]"),
        (lambda m, a: a.update({"latent_mean.npy": a["latent_mean.npy"] * np.nan}), "non-finite"),
        (lambda m, a: m.update({"nouns": m["nouns"][:1]}), "nouns.npy has shape"),
        (lambda m, a: m.pop("duration"), "json lacks duration"),
        (lambda m, a: a.pop("caption.npy"), "missing caption.npy"),
        (lambda m, a: a.pop("detector.npy"), "missing detector.npy (schema version 2 requires it)"),
        (lambda m, a: a.pop("iou.npy"), "missing iou.npy (schema version 2 requires it)"),
        (lambda m, a: a.update({"iou.npy": a["iou.npy"] + 1.5}), "iou.npy outside [0, 1]"),
        (lambda m, a: a.update({"detector.npy": a["detector.npy"] - 1.5}), "detector.npy outside [0, 1]"),
        (lambda m, a: a.update({"probs.npy": a["detector.npy"]}), "probs.npy is not detector.npy * iou.npy"),
        (lambda m, a: a.update({"latent_std.npy": -np.abs(a["latent_std.npy"]) - 0.1}), "latent_std.npy has negative"),
    ],
)
def test_validation_rejects_samples_off_the_schema(spec, change, message):
    meta, arrays, waveform = make_sample(spec, "bad")
    change(meta, arrays)
    with pytest.raises(shards.ShardFormatError, match=re.escape(message)):
        shards.encode_sample(spec, meta, arrays, waveform)


def _tar_with(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_reader_refuses_pickles_and_unknown_members(tmp_path, spec):
    meta, arrays, waveform = make_sample(spec, "a")
    good = shards.encode_sample(spec, meta, arrays, waveform)
    members = {f"a.{k}": v for k, v in good.items() if not k.startswith("__")}

    class Boom:  # would run code if unpickled
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    _tar_with(tmp_path / "pickled.tar", {**members, "a.extra.pyd": pickle.dumps(Boom())})
    with pytest.raises(shards.ShardFormatError, match="unknown member 'extra.pyd'"):
        list(shards.iterate_samples([tmp_path / "pickled.tar"]))

    buffer = io.BytesIO()
    np.save(buffer, np.array([Boom()], dtype=object), allow_pickle=True)
    _tar_with(tmp_path / "object.tar", {**members, "a.clip.npy": buffer.getvalue()})
    with pytest.raises(shards.ShardFormatError, match="not a plain npy array"):
        list(shards.iterate_samples([tmp_path / "object.tar"]))


def test_killed_writer_leaves_nothing_a_reader_accepts(tmp_path, spec):
    write_meta(tmp_path, spec)
    writer = shards.ShardWriter(tmp_path, "train", rank=3, max_samples=10)
    for i in range(3):
        writer.write(shards.encode_sample(spec, *make_sample(spec, f"c{i}", seed=i)))
    # the process dies here: no close()
    assert shards.list_shards(tmp_path) == []
    assert [p.name for p in tmp_path.glob("*.tmp")] == ["train-003-000000.tar.tmp"]
    assert shards_main(["verify", str(tmp_path)]) == 1  # the leftover and the empty folder are reported
    assert [p.name for p in shards.remove_partial(tmp_path, rank=3)] == ["train-003-000000.tar.tmp"]
    # a new writer of the same rank continues with the next free index
    (tmp_path / "train-003-000000.tar").write_bytes(b"")
    writer = shards.ShardWriter(tmp_path, "train", rank=3, max_samples=10)
    writer.write(shards.encode_sample(spec, *make_sample(spec, "c9")))
    assert writer.flush().name == "train-003-000001.tar"


def test_a_failed_directory_fsync_after_the_rename_counts_the_shard_as_written(tmp_path, spec, monkeypatch):
    """The shard is visible once renamed; a failing fsync of its folder (EIO) after that left the writer holding it
    as pending, so stage one's summary counted its samples as lost and a retry of the flush failed again."""
    import errno

    import shards.io

    write_meta(tmp_path, spec)
    writer = shards.ShardWriter(tmp_path, "train", rank=0, max_samples=10)
    for i in range(2):
        writer.write(shards.encode_sample(spec, *make_sample(spec, f"c{i}", seed=i)))

    def failing(directory):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(shards.io, "_fsync_directory", failing)
    with pytest.raises(OSError, match="Input/output error"):
        writer.flush()
    assert writer.pending == 0 and [p.name for p in writer.completed] == ["train-000-000000.tar"]
    assert writer.flush() is None  # nothing left to write
    monkeypatch.undo()
    assert shards_main(["verify", str(tmp_path)]) == 0


def test_verify_counts_samples_and_reports_duplicates(tmp_path, spec, capsys):
    write_meta(tmp_path, spec)
    for rank in (0, 1):
        writer = shards.ShardWriter(tmp_path, "test" if rank else "train", rank=rank, max_samples=5)
        for i in range(2):
            writer.write(shards.encode_sample(spec, *make_sample(spec, f"c{i + rank}", seed=i, split="test" if rank else "train")))
        writer.close()
    assert shards_main(["verify", str(tmp_path)]) == 1  # c1 is in both shards
    out = capsys.readouterr().out
    assert "clip c1 also in" in out and "train: 2 samples" in out


def test_verify_reports_a_sample_whose_split_is_not_its_shards(tmp_path, spec, capsys):
    """Training and evaluation take a split's shards by their name: a clip saying 'test' inside a train shard is read
    by neither, and verify counted it as a valid test sample."""
    write_meta(tmp_path, spec)
    writer = shards.ShardWriter(tmp_path, "train", rank=0, max_samples=5)
    for i, split in enumerate(("train", "test")):
        writer.write(shards.encode_sample(spec, *make_sample(spec, f"c{i}", seed=i, split=split)))
    writer.close()
    assert shards_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "train-000-000000.tar: clip c1 says split 'test' in a 'train' shard" in out
    assert "train: 1 samples" in out and "test:" not in out


def test_verify_shows_at_most_a_hundred_problems(tmp_path, spec, capsys, monkeypatch):
    """A folder where every sample has a problem (a meta.json of another preset: ~200k on VGGSound) printed one
    line per sample; now the first hundred and how many more, and the count line has them all."""
    import shards.__main__ as tool

    monkeypatch.setattr(tool, "MAX_SHOWN", 3)
    write_meta(tmp_path, spec)
    for rank in (0, 1):
        writer = shards.ShardWriter(tmp_path, "train", rank=rank, max_samples=5)
        for i in range(5):
            writer.write(shards.encode_sample(spec, *make_sample(spec, f"c{i}", seed=i)))  # every id twice
        writer.close()
    assert shards_main(["verify", str(tmp_path)]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem")]
    assert len(lines) == 4 and lines[-1] == "problem: ... and 2 more (the first 3 are shown)"
    assert all("also in" in line for line in lines[:3])


def test_verify_refuses_another_schema_version(tmp_path, spec):
    write_meta(tmp_path, spec)
    meta = json.loads((tmp_path / shards.META_FILE).read_text())
    meta["spec"]["schema_version"] = 999
    (tmp_path / shards.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(shards.ShardFormatError, match="schema version 999"):
        shards.read_spec(tmp_path)
    meta["spec"]["schema_version"] = "2"  # a string: said as one, not as the version it reads
    (tmp_path / shards.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(shards.ShardFormatError, match="schema version '2'; this code reads versions 1, 2"):
        shards.read_spec(tmp_path)
    # a window no stage one makes: its audio (held whole) would be refused only when evaluation drew its figure
    meta["spec"] |= {"schema_version": spec.schema_version, "window_seconds": 1e300}
    (tmp_path / shards.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(shards.ShardFormatError, match="window_seconds must be a positive number of seconds up to 3600"):
        shards.read_spec(tmp_path)


def test_jsonl_survives_a_torn_line(tmp_path, caplog):
    """A line cut short by a crash is skipped with a warning naming it, and the next record is not glued onto it
    (it was, and was lost with it: the clip was then tried again)."""
    path = tmp_path / "failures.jsonl"
    shards.append_jsonl(path, {"id": "a", "stage": "video"})
    with open(path, "a") as handle:
        handle.write('{"id": "b", "sta')  # killed mid-line
    assert shards.read_jsonl(path) == [{"id": "a", "stage": "video"}]
    assert f"{path}:2: not JSON (a line cut short by a crash?); skipped" in caplog.text
    shards.append_jsonl(path, {"id": "c", "stage": "video"})
    assert shards.read_jsonl(path) == [{"id": "a", "stage": "video"}, {"id": "c", "stage": "video"}]


def test_object_embedding_is_eq1():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 5, 3, generator=g)  # (B, T, K)
    nouns = torch.randn(2, 3, 4, generator=g)  # (B, K, D)
    out = shards.object_embedding(probs, nouns)
    by_hand = torch.stack([torch.stack([sum(probs[b, t, k] * nouns[b, k] for k in range(3)) for t in range(5)]) for b in range(2)])
    torch.testing.assert_close(out, by_hand)
    # threshold zeroes weak detections, the mask removes padded nouns
    thresholded = shards.object_embedding(probs, nouns, threshold=0.5)
    torch.testing.assert_close(thresholded, shards.object_embedding(probs * (probs >= 0.5), nouns))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    masked = shards.object_embedding(probs, nouns, noun_mask=mask)
    torch.testing.assert_close(masked[1], probs[1, :, :1] @ nouns[1, :1])
    assert shards.object_embedding(torch.zeros(5, 0), torch.zeros(0, 4)).shape == (5, 4)


# ----------------------------------------------------------------------------------- the one door to shard files
def write_split(directory, spec, ids_by_split: dict[str, list[str]], max_samples: int = 2) -> dict[str, tuple]:
    """Shards of several splits (named after them, as stage one writes them); returns id -> (meta, arrays, wave)."""
    write_meta(directory, spec)
    written = {}
    for split, ids in ids_by_split.items():
        writer = shards.ShardWriter(directory, split, rank=0, max_samples=max_samples)
        for seed, clip_id in enumerate(ids):
            meta, arrays, waveform = make_sample(spec, clip_id, num_nouns=seed % 3, seed=seed, split=split)
            writer.write(shards.encode_sample(spec, meta, arrays, waveform))
            written[clip_id] = (meta, arrays, waveform)
        writer.close()
    return written


def test_sample_meta_round_trip_and_refusals():
    meta = shards.SampleMeta(id="a", caption="dog", label="x", split="test", duration=2.5, valid_frames=3,
                             nouns=("dog",), source="/v.mp4", start=1.0, silent=True, source_stamp="12:34")
    assert shards.SampleMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta
    assert set(meta.to_json()) == {"id", "caption", "label", "split", "duration", "valid_frames", "nouns", "source",
                                   "start", "silent", "source_stamp"}
    # written before they existed
    older = {k: v for k, v in meta.to_json().items() if k not in ("start", "silent", "source_stamp")}
    assert shards.SampleMeta.from_json(older).start == 0.0 and not shards.SampleMeta.from_json(older).silent
    assert shards.SampleMeta.from_json(older).source_stamp == ""
    with pytest.raises(shards.ShardFormatError, match="source_stamp"):
        shards.SampleMeta.from_json(meta.to_json() | {"source_stamp": 12})
    with pytest.raises(shards.ShardFormatError, match="json lacks id"):
        shards.SampleMeta.from_json({k: v for k, v in older.items() if k != "id"})
    with pytest.raises(shards.ShardFormatError, match="not an object"):
        shards.SampleMeta.from_json([older])
    with pytest.raises(shards.ShardFormatError, match="'duration'"):
        shards.SampleMeta.from_json(older | {"duration": "long"})
    with pytest.raises(shards.ShardFormatError, match="'valid_frames'"):
        shards.SampleMeta.from_json(older | {"valid_frames": True})
    with pytest.raises(shards.ShardFormatError, match="'nouns'"):
        shards.SampleMeta.from_json(older | {"nouns": ["dog", 3]})


def test_readers_select_the_split_and_the_ids(tmp_path, spec):
    written = write_split(tmp_path, spec, {"train": ["a", "b", "c"], "test": ["t2", "t0", "t1"]})
    test = shards.read_split(tmp_path, "test")
    assert [m.id for m in test] == ["t2", "t0", "t1"]  # shard order
    assert test[0] == shards.SampleMeta.from_json(written["t2"][0])
    assert [m.id for m in shards.read_split(tmp_path, "train")] == ["a", "b", "c"]
    assert shards.read_split(tmp_path, "val") == []

    decoded = list(shards.iter_split(tmp_path, "test", ids={"t1", "t2"}))
    assert [s["json"]["id"] for s in decoded] == ["t2", "t1"]
    np.testing.assert_allclose(decoded[0]["probs.npy"], written["t2"][1]["probs.npy"].astype(np.float16))

    flacs = {meta.id: data for meta, data in shards.iter_member(tmp_path, "test", shards.AUDIO_KEY, ids=["t0", "t1"])}
    assert sorted(flacs) == ["t0", "t1"]
    decoded_t1 = next(s for s in shards.iter_split(tmp_path, "test") if s["json"]["id"] == "t1")
    np.testing.assert_array_equal(soundfile.read(io.BytesIO(flacs["t1"]), dtype="float32")[0], decoded_t1["flac"])
    assert dict(shards.iter_member(tmp_path, "train", shards.AUDIO_KEY, ids=["t1"])) == {}  # only the asked split


def test_readers_name_the_broken_shard(tmp_path, spec):
    from shards.stream import record_path

    write_split(tmp_path, spec, {"test": ["t0", "t1"]}, max_samples=1)
    with pytest.raises(shards.ShardFormatError, match="nowhere: folder not found"):  # was 'meta.json: missing'
        shards.read_split(tmp_path / "nowhere", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(shards.ShardFormatError, match="meta.json: missing"):
        shards.read_split(tmp_path / "empty", "test")
    broken = shards.list_shards(tmp_path)[1]
    broken.write_bytes(broken.read_bytes()[:700])  # cut inside the first member's data: its record says so
    with pytest.raises(shards.ShardFormatError, match=rf"{broken.name}: shard has 700 bytes, its record says"):
        shards.read_split(tmp_path, "test")
    record_path(broken).unlink()  # a folder from before shard records: the tar reader's own error
    with pytest.raises(shards.ShardFormatError, match=rf"{broken.name}: unreadable shard"):
        shards.read_split(tmp_path, "test")
    _tar_with(broken, {"t1.json": b"[1, 2]"})
    with pytest.raises(shards.ShardFormatError, match=rf"{broken.name}: .*not an object"):
        shards.read_split(tmp_path, "test")
    # someone gzip'd it: the reader said only "bad checksum" or "invalid header"
    import gzip

    broken.write_bytes(gzip.compress(shards.list_shards(tmp_path)[0].read_bytes()))
    for read in (lambda: shards.read_split(tmp_path, "test"), lambda: list(shards.iter_split(tmp_path, "test"))):
        with pytest.raises(shards.ShardFormatError, match=rf"{broken.name}: unreadable shard \(.*\); the file is "
                                                          "gzip-compressed, and shards are plain tar files$"):
            read()


def test_a_shard_cut_at_a_samples_end_is_not_read_as_a_shorter_one(tmp_path, spec):
    """Cut exactly where a sample ends, a shard reads as a whole tar archive of fewer samples: evaluation scored
    the split on the clips left, with exit 0. Every reader checks the shard against its record."""
    import tarfile

    write_split(tmp_path, spec, {"test": ["t0", "t1", "t2"]}, max_samples=3)
    shard = shards.list_shards(tmp_path)[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    first = [m for m in members if m.name.startswith("t0.")][-1]
    end = first.offset_data + -(-first.size // 512) * 512  # where the first sample's last member ends
    shard.write_bytes(shard.read_bytes()[:end])
    with pytest.raises(shards.ShardFormatError, match=rf"{shard.name}: shard has {end} bytes, its record says"):
        shards.read_split(tmp_path, "test")


def test_range_stream_reads_one_range_of_a_split_and_skips(tmp_path, spec):
    import random

    write_split(tmp_path, spec, {"train": ["a", "b", "c", "d", "e"], "test": ["t0"]})  # shards of 2, 2, 1
    paths = shards.list_shards(tmp_path)
    index = [(path, sum(meta.split == "train" for meta in shards.iter_meta([path]))) for path in paths]
    assert [count for _, count in index] == [0, 2, 2, 1]  # the test shard first

    def ids(start, stop, buffer=1, **kw):
        return [s["json"]["id"] for s in shards.range_stream(index, "train", start, stop, buffer, "0", spec=spec, **kw)]

    everything = ids(0, 5)
    assert everything == ["a", "b", "c", "d", "e"]  # a buffer of one keeps the order
    assert ids(0, 2) + ids(2, 3) + ids(3, 5) == everything  # ranges that split a shard: each sample once
    shuffled = ids(0, 5, buffer=8)
    assert sorted(shuffled) == everything and shuffled == ids(0, 5, buffer=8)
    assert ids(0, 5, buffer=8, skip=3) == shuffled[3:] and ids(0, 5, buffer=8, take=4, skip=1) == shuffled[1:4]
    random.Random(1).shuffle(index)  # the caller's shard order is kept
    order = [s["json"]["id"] for s in shards.range_stream(index, "train", 0, 5, 1, "0")]
    assert sorted(order) == everything
    assert all(isinstance(s["clip.npy"], np.ndarray) for s in shards.range_stream(index, "train", 0, 5, 1, "0"))
    with pytest.raises(shards.ShardFormatError, match="holds 2 samples of split 'train', 3 when this stream began"):
        list(shards.range_stream([(p, c + 1 if c == 2 else c) for p, c in index], "train", 0, 6, 1, "0"))
    with pytest.raises(shards.ShardFormatError, match="holds 2 samples of split 'train', 1 when this stream began"):
        list(shards.range_stream([(p, c - 1 if c == 2 else c) for p, c in index], "train", 0, 3, 1, "0"))


def test_conditions_table_derives_every_condition(spec):
    meta, arrays, _ = make_sample(spec, "c", num_nouns=2)
    arrays = {k: v.astype(np.float16) for k, v in arrays.items()}  # as decoded from a shard
    conditions = shards.sample_conditions(arrays, object_threshold=0.5)
    assert tuple(conditions) == shards.CONDITION_NAMES == tuple(c.name for c in shards.CONDITIONS)
    for condition in shards.CONDITIONS:
        assert conditions[condition.name].shape == condition.shape(spec)
        assert conditions[condition.name].dtype == torch.float32
        assert all(member in shards.ARRAY_KEYS for member in condition.members)
    probs = torch.from_numpy(arrays["probs.npy"].astype(np.float32))
    detector = torch.from_numpy(arrays["detector.npy"].astype(np.float32))
    nouns = torch.from_numpy(arrays["nouns.npy"].astype(np.float32))
    torch.testing.assert_close(conditions["objects"], (probs * (detector >= 0.5)) @ nouns)
    torch.testing.assert_close(conditions["video"], torch.from_numpy(arrays["clip.npy"].astype(np.float32)))
    batch = shards.stack_conditions([conditions, shards.sample_conditions(arrays)])
    assert batch["caption"].shape == (2, spec.embed_dim) and batch["objects"].shape == (2, spec.num_frames, spec.embed_dim)
    assert not torch.equal(batch["objects"][0], batch["objects"][1])  # the threshold of each sample was applied


# ----------------------------------------------------------------------------------- schema version 2: the detector score
def test_the_threshold_applies_to_the_detector_score_not_to_probs():
    # T=4 frames, K=2 nouns; e_k = unit vectors, so O_t is p'_t itself (padded to D=3)
    detector = np.array([[0.9, 0.2], [0.3, 0.6], [0.4, 0.34], [0.5, 0.0]], np.float16)
    iou = np.array([[0.2, 1.0], [1.0, 0.9], [0.5, 1.0], [0.6, 1.0]], np.float16)
    probs = detector.astype(np.float32) * iou.astype(np.float32)
    arrays = {"clip.npy": np.zeros((4, 3)), "caption.npy": np.zeros(3), "nouns.npy": np.eye(2, 3),
              "probs.npy": probs, "detector.npy": detector, "iou.npy": iou}
    kept = shards.sample_conditions(arrays, object_threshold=0.35)["objects"][:, :2].numpy()
    # by hand: frame 0 noun 0 passes on its detector score 0.9 though SAM's IoU made p = 0.18 < 0.35; frame 2 noun 0
    # (0.4 * 0.5 = 0.2) likewise; frame 2 noun 1 (0.34) and frame 1 noun 0 (0.3) fail; p itself is what is kept
    expected = np.array([[0.18, 0.0], [0.0, 0.54], [0.2, 0.0], [0.3, 0.0]], np.float32)
    np.testing.assert_allclose(kept, expected, atol=1e-3)
    assert (kept > 0).tolist() == (detector >= 0.35).tolist()
    # thresholding probs instead would drop frames 0 and 2 (p < 0.35) although the detector saw the noun
    with pytest.warns(UserWarning):
        shards.conditions._warn_no_detector_scores.cache_clear()
        on_probs = shards.sample_conditions({k: v for k, v in arrays.items() if k != "detector.npy"}, 0.35)["objects"]
    assert (on_probs[:, :2].numpy() > 0).tolist() == (probs >= 0.35).tolist() != (kept > 0).tolist()
    # 0 keeps every detection (the ablation): Eq. (1) on p unchanged
    np.testing.assert_allclose(shards.sample_conditions(arrays, 0.0)["objects"][:, :2].numpy(), probs, atol=1e-6)
    # object_embedding on any scores: p passes or not by s alone, also where p would pass and s would not
    p = torch.tensor([[0.8, 0.1]])
    s = torch.tensor([[0.1, 0.8]])
    torch.testing.assert_close(shards.object_embedding(p, torch.eye(2), threshold=0.5, scores=s), torch.tensor([[0.0, 0.1]]))


def test_the_objects_condition_names_what_it_reads():
    objects = next(c for c in shards.CONDITIONS if c.name == "objects")
    assert objects.members == ("probs.npy", "detector.npy", "nouns.npy")
    assert "iou.npy" in shards.ARRAY_KEYS and set(objects.members) <= set(shards.ARRAY_KEYS)


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, np.float16), allow_pickle=False)
    return buffer.getvalue()


def write_version_1_folder(directory, spec, count: int = 2) -> dict[str, dict]:
    """A stage-one folder as version 1 wrote it: meta.json says version 1, samples hold the six v1 arrays only
    (tar members written by hand, not through this code's writer). Returns id -> arrays."""
    old = dataclasses.replace(spec, schema_version=1)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / shards.META_FILE).write_text(json.dumps({"schema_version": 1, "spec": old.to_dict()}))
    members, written = {}, {}
    for i in range(count):
        meta, arrays, waveform = make_sample(spec, f"old{i}", seed=i)
        v1 = {k: arrays[k] for k in ("clip.npy", "caption.npy", "nouns.npy", "probs.npy", "latent_mean.npy",
                                     "latent_std.npy")}
        flac = io.BytesIO()
        soundfile.write(flac, waveform, spec.sample_rate, format="FLAC", subtype="PCM_16")
        members |= {f"old{i}.json": json.dumps(meta).encode(), **{f"old{i}.{k}": _npy(v) for k, v in v1.items()},
                    f"old{i}.flac": flac.getvalue()}
        written[meta["id"]] = v1
    _tar_with(directory / "train-000-000000.tar", members)
    return written


def test_a_version_1_folder_still_reads_and_falls_back_with_one_warning(tmp_path, spec, capsys):
    from train.config import TrainConfig
    from train.data import ShardStream, check_shards

    written = write_version_1_folder(tmp_path, spec)
    old = shards.read_spec(tmp_path)
    assert old.schema_version == 1 and "detector.npy" not in old.array_keys
    decoded = list(shards.iterate_samples(shards.list_shards(tmp_path), old))  # validated against version 1
    assert [s["json"]["id"] for s in decoded] == ["old0", "old1"] and "detector.npy" not in decoded[0]
    assert shards_main(["verify", str(tmp_path)]) == 0
    assert "train: 2 samples" in (out := capsys.readouterr().out) and "schema version 1 (read;" in out

    # training reads it; the objects condition thresholds probs.npy, and says so once
    config = TrainConfig(shards=str(tmp_path), batch_size=2, shuffle_buffer=1, object_threshold=0.5)
    assert check_shards(config)[0] == old
    shards.conditions._warn_no_detector_scores.cache_clear()
    with pytest.warns(UserWarning, match=r"without detector.npy \(shard schema version 1\).*applies to probs.npy"):
        batch = next(iter(ShardStream(shards.list_shards(tmp_path), config)))
    for row, clip_id in enumerate(batch["id"]):
        probs = torch.from_numpy(written[clip_id]["probs.npy"].astype(np.float16).astype(np.float32))
        nouns = torch.from_numpy(written[clip_id]["nouns.npy"].astype(np.float16).astype(np.float32))
        torch.testing.assert_close(batch["objects"][row], (probs * (probs >= 0.5)) @ nouns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second epoch is silent
        shards.sample_conditions(decoded[0], 0.5)


def test_a_version_2_sample_without_its_members_is_refused(tmp_path, spec):
    meta, arrays, waveform = make_sample(spec, "new")
    members = {f"new.{k}": v for k, v in shards.encode_sample(spec, meta, arrays, waveform).items()
               if not k.startswith("__") and k != "detector.npy"}
    _tar_with(tmp_path / "train-000-000000.tar", members)
    with pytest.raises(shards.ShardFormatError, match=r"train-000-000000.tar: sample 'new' lacks detector.npy$"):
        list(shards.iterate_samples(shards.list_shards(tmp_path), spec))
    with pytest.raises(shards.ShardFormatError, match="schema version 3; this code reads versions 1, 2"):
        shards.ShardSpec.from_dict({**spec.to_dict(), "schema_version": 3})
    with pytest.raises(shards.ShardFormatError, match="schema version None"):
        shards.ShardSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "schema_version"})


def test_the_object_threshold_is_a_detector_score(capsys):
    from train.__main__ import main as train_main
    from train.config import PRESETS, TrainConfig

    assert PRESETS["paper"].object_threshold == 0.35 and PRESETS["tiny"].object_threshold == 0.0
    assert TrainConfig(object_threshold=1.0).object_threshold == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"^object_threshold must be in \[0, 1\] \(a detector score\), got"):
            TrainConfig(object_threshold=bad)
    assert train_main(["--preset", "paper", "--object-threshold", "0", "--dry-run"]) == 0  # the ablation
    assert json.loads(capsys.readouterr().out)["object_threshold"] == 0.0
    assert train_main(["--object-threshold", "35", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: object_threshold must be in [0, 1] (a detector score), got 35.0"


# ----------------------------------------------------------------------------------- hostile and damaged shards
def _good_members(spec, clip_id="a", seed=0) -> dict[str, bytes]:
    encoded = shards.encode_sample(spec, *make_sample(spec, clip_id, seed=seed))
    return {f"{encoded['__key__']}.{k}": v for k, v in encoded.items() if not k.startswith("__")}


def _training_error(folder) -> str:
    """The one-line DataError the training loader raises on this folder (with a DataLoader worker, so the line
    crosses the process boundary)."""
    from train.config import TrainConfig
    from train.data import DataError, make_loader

    config = TrainConfig(shards=str(folder), batch_size=1, shuffle_buffer=1, num_workers=1)
    with pytest.raises(DataError) as error:
        stream = iter(make_loader(shards.list_shards(folder), config))
        for _ in range(20):
            next(stream)
    assert "\n" not in str(error.value)
    return str(error.value)


def _verify_lines(folder, capsys) -> list[str]:
    assert shards_main(["verify", str(folder)]) == 1  # returns: no traceback escapes
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]


def test_a_shard_cut_at_a_sample_boundary_or_altered_is_an_error(tmp_path, spec, capsys):
    write_split(tmp_path, spec, {"train": ["a", "b", "c"]}, max_samples=3)
    shard = shards.list_shards(tmp_path)[0]
    record = json.loads((tmp_path / (shard.name + ".json")).read_text())
    assert record["samples"] == 3 and record["bytes"] == shard.stat().st_size
    assert shards_main(["verify", str(tmp_path)]) == 0 and "without records" not in capsys.readouterr().out
    whole = shard.read_bytes()
    with tarfile.open(shard) as tar:  # the offset where sample c begins: the tar before it still reads cleanly
        cut = next(m.offset for m in tar.getmembers() if m.name.startswith("c."))
    shard.write_bytes(whole[:cut])
    assert [s["json"]["id"] for s in wds_read(shard)] == ["a", "b"]  # what a plain tar reader accepts silently
    lines = _verify_lines(tmp_path, capsys)
    assert len(lines) == 1 and shard.name in lines[0] and "its record says" in lines[0]
    with pytest.raises(shards.ShardFormatError, match=rf"{shard.name}: shard has {cut} bytes"):
        list(shards.iterate_samples([shard]))
    assert shard.name in _training_error(tmp_path) and "cut short" in _training_error(tmp_path)

    altered = bytearray(whole)
    altered[cut - 10_000] ^= 1  # inside sample b's data: the tar still reads
    shard.write_bytes(bytes(altered))
    with pytest.raises(shards.ShardFormatError, match="checksum differs from its record"):
        list(shards.iterate_samples([shard]))
    assert "checksum differs" in _training_error(tmp_path)

    # an older folder (no records) still reads, and verify says what it cannot check
    shard.write_bytes(whole)
    (tmp_path / (shard.name + ".json")).unlink()
    assert [s["json"]["id"] for s in shards.iterate_samples([shard], spec)] == ["a", "b", "c"]
    assert shards_main(["verify", str(tmp_path)]) == 0
    assert "note: 1 shard(s) without records" in capsys.readouterr().out


def wds_read(shard):
    import webdataset as wds

    return [{"json": json.loads(s["json"])} for s in wds.WebDataset(str(shard), shardshuffle=False)]


def test_a_writer_killed_between_the_two_renames_leaves_a_record_the_next_run_deletes(tmp_path, spec, monkeypatch,
                                                                                        capsys):
    import os

    write_meta(tmp_path, spec)
    writer = shards.ShardWriter(tmp_path, "train", rank=0, max_samples=5)
    writer.write(shards.encode_sample(spec, *make_sample(spec, "a")))

    def killed(*args):
        raise KeyboardInterrupt  # dies right before the shard's rename

    monkeypatch.setattr(os, "replace", lambda src, dst, real=os.replace: real(src, dst) if str(dst).endswith(".json")
                        else killed())
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    monkeypatch.undo()
    assert shards.list_shards(tmp_path) == [] and [p.name for p in shards.orphan_records(tmp_path)] == [
        "train-000-000000.tar.json"]
    assert any("record of a shard an interrupted run never completed" in line for line in _verify_lines(tmp_path, capsys))
    removed = {p.name for p in shards.remove_partial(tmp_path, rank=0)}
    assert removed == {"train-000-000000.tar.tmp", "train-000-000000.tar.json"}
    writer = shards.ShardWriter(tmp_path, "train", rank=0, max_samples=5)
    writer.write(shards.encode_sample(spec, *make_sample(spec, "a")))
    assert writer.flush().name == "train-000-000000.tar" and shards_main(["verify", str(tmp_path)]) == 0


def _npy_raw(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update({"a.clip.npy": _npy_raw(np.zeros((20, 32), np.float32))}), "little-endian float16"),
        (lambda m: m.update({"a.clip.npy": _npy_raw(np.zeros((20, 32), ">f2"))}), "little-endian float16"),
        (lambda m: m.update({"a.latent_std.npy": _npy_raw(np.full((8, 256, 16), np.nan, np.float16))}), "non-finite"),
        (lambda m: m.update({"a.clip.npy": _npy_raw(np.zeros((19, 32), np.float16))}), "clip.npy has shape"),
        (lambda m: m.pop("a.json"), "lacks json"),
        (lambda m: m.pop("a.flac"), "lacks flac"),
        (lambda m: m.update({"a.extra.txt": b"hello"}), "unknown member 'extra.txt'"),
        (lambda m: m.update({"a.__evil__": b"x"}), "unknown member '__evil__'"),
    ],
)
def test_training_validates_every_sample_and_names_it(tmp_path, spec, change, message):
    write_meta(tmp_path, spec)
    members = _good_members(spec, "a")
    change(members)
    _tar_with(tmp_path / "train-000-000000.tar", _good_members(spec, "b", seed=1) | members)
    error = _training_error(tmp_path)
    assert "train-000-000000.tar" in error and "'a'" in error and message in error


def _huge_npy() -> bytes:
    """An npy header declaring a (1e6, 1e6) float16 array (1.8 TiB) followed by a few bytes."""
    header = {"descr": "<f2", "fortran_order": False, "shape": (1_000_000, 1_000_000)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + b"\0" * 64


def _symlink_member(path, members: dict[str, bytes], link: str):
    _tar_with(path, members)
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo(link)
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)


@pytest.mark.parametrize("content, reason", [(b"", "empty file"), (b"not a tar at all" * 64, "invalid header")])
def test_a_shard_that_is_no_tar_is_one_line(tmp_path, spec, content, reason):
    """A shard without a record that is empty or no tar: one line naming it. tarfile's auto-detecting mode listed
    every codec it had tried (gz, bz2, xz, tar), five lines; shards are plain tar."""
    from train.data import DataError, count_split

    write_meta(tmp_path, spec)
    (tmp_path / "train-000-000000.tar").write_bytes(content)
    expected = f"{tmp_path / 'train-000-000000.tar'}: unreadable shard ({reason})"
    with pytest.raises(shards.ShardFormatError) as caught:
        shards.read_split(tmp_path, "train")
    assert str(caught.value) == expected
    with pytest.raises(DataError) as caught_in_training:
        count_split(tmp_path, "train")
    assert str(caught_in_training.value) == expected


@pytest.mark.parametrize("hostile, message", [
    ("huge", "declares shape (1000000, 1000000)"),
    ("symlink", "member 'a.json' is a symlink, not a regular file"),
    ("unknown", "unknown member 'pth'"),
    ("no flac", "lacks flac"),
])
def test_hostile_members_are_one_error_in_verify_and_training(tmp_path, spec, capsys, hostile, message):
    write_meta(tmp_path, spec)
    members = _good_members(spec, "a")
    shard = tmp_path / "train-000-000000.tar"
    if hostile == "huge":
        members["a.clip.npy"] = _huge_npy()
    elif hostile == "unknown":
        members["a.pth"] = pickle.dumps({"weights": 1})
    elif hostile == "no flac":
        members.pop("a.flac")
    if hostile == "symlink":
        _symlink_member(shard, {k: v for k, v in members.items() if k != "a.json"}, "a.json")
    else:
        _tar_with(shard, members)
    lines = _verify_lines(tmp_path, capsys)
    assert len(lines) == 1 and shard.name in lines[0] and message in lines[0]
    error = _training_error(tmp_path)
    assert shard.name in error and message in error
    with pytest.raises(shards.ShardFormatError, match=re.escape(message)):
        list(shards.iter_split(tmp_path, "train"))


def test_the_huge_header_is_refused_before_any_allocation(spec):
    with pytest.raises(shards.ShardFormatError, match=r"declares shape \(1000000, 1000000\) but holds 64 bytes"):
        shards.decode_sample({"clip.npy": _huge_npy()})
    fitting = _npy_raw(np.zeros((21, 32), np.float16))  # consistent, but larger than the schema allows
    with pytest.raises(shards.ShardFormatError, match=r"the schema allows at most \(20, 32\)"):
        shards.decode_sample({"clip.npy": fitting}, spec)


def _flac_at(rate: int, spec, audio_format: str = "FLAC", channels: int = 1) -> bytes:
    """Audio of the schema's length that says it is `rate` Hz (0: the schema's rate; read as the schema's rate, another
    would be other audio), in `audio_format` (stage one writes FLAC only), with `channels` channels."""
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((spec.num_samples, channels), np.float32), rate or spec.sample_rate,
                    format=audio_format, subtype="PCM_16")
    return buffer.getvalue()


def test_reference_audio_of_another_rate_is_refused_by_evaluation(tmp_path, spec):
    """Evaluation reads the reference audio's flac members itself (to embed them): one at another rate than the
    schema's is refused, naming the clip, where it was embedded as if it were the schema's rate."""
    from eval.clips import EvalError
    from eval.embed import ShardAudio

    write_meta(tmp_path, spec)
    _tar_with(tmp_path / "test-000-000000.tar", {**_good_members(spec, "a"), "a.flac": _flac_at(8000, spec)})
    with pytest.raises(EvalError, match=f"clip 'a': member 'flac' is 8000 Hz, the folder's schema says "
                                        f"{spec.sample_rate} Hz"):
        ShardAudio(tmp_path, "train", ["a"])("a")
    _tar_with(tmp_path / "test-000-000000.tar", {**_good_members(spec, "a"), "a.flac": _flac_at(0, spec, "WAV")})
    with pytest.raises(EvalError, match="clip 'a': member 'flac' is not FLAC \\(a WAV file\\)"):
        ShardAudio(tmp_path, "train", ["a"])("a")


def test_verify_reports_each_bad_json_and_flac_in_one_line(tmp_path, spec, capsys):
    write_meta(tmp_path, spec)
    members: dict[str, bytes] = {}
    meta = make_sample(spec, "x")[0]
    bad_jsons = {"noid": {k: v for k, v in meta.items() if k != "id"}, "alist": [meta],
                 "types": meta | {"valid_frames": "3"}, "notjson": b"{oops"}
    for seed, (key, bad) in enumerate(bad_jsons.items()):
        sample = _good_members(spec, key, seed=seed)
        sample[f"{key}.json"] = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        members |= sample
    members |= {**_good_members(spec, "garbage", seed=9), "garbage.flac": b"fLaC not really"}
    members |= {**_good_members(spec, "rate", seed=11), "rate.flac": _flac_at(44100, spec)}
    members |= {**_good_members(spec, "wav", seed=12), "wav.flac": _flac_at(0, spec, "WAV")}  # soundfile reads it
    members |= {**_good_members(spec, "stereo", seed=13), "stereo.flac": _flac_at(0, spec, channels=2)}
    members |= _good_members(spec, "fine", seed=10)
    _tar_with(tmp_path / "train-000-000000.tar", members)
    assert shards_main(["verify", str(tmp_path)]) == 1  # returns: no traceback escapes
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert len(lines) == 8, lines
    for line, key, reason in zip(lines, [*bad_jsons, "garbage", "rate", "wav", "stereo"],
                                 ["json lacks id", "not an object", "'valid_frames'", "not JSON", "not readable FLAC",
                                  f"member 'flac' is 44100 Hz, the folder's schema says {spec.sample_rate} Hz",
                                  "member 'flac' is not FLAC (a WAV file)", "member 'flac' has 2 channels"]):
        assert f"train-000-000000.tar: sample '{key}'" in line and reason in line, line
    assert "train: 1 samples" in out  # the shard is read on past each bad sample


def test_double_underscore_members_are_refused_reader_fields_are_not(tmp_path, spec):
    write_meta(tmp_path, spec)
    _tar_with(tmp_path / "train-000-000000.tar", _good_members(spec, "a") | {"a.__key__": b"forged"})
    with pytest.raises(shards.ShardFormatError, match=r"unknown member '__key__'.*added by the reader"):
        list(shards.iterate_samples(shards.list_shards(tmp_path)))
    raw = {f"{k.partition('.')[2]}": v for k, v in _good_members(spec, "a").items()}
    assert shards.decode_sample(raw | {"__key__": "a", "__url__": "u"})["__key__"] == "a"
    with pytest.raises(shards.ShardFormatError, match="unknown member '__local_path__'"):
        shards.decode_sample(raw | {"__local_path__": "x"})


def test_damaged_meta_json_jsonl_and_json_members_are_one_line(tmp_path, spec, caplog):
    """meta.json that is not an object, or whose spec has sizes of the wrong type; a .jsonl line that is JSON but
    not an object; a json member nested too deep or with an integer of too many digits: each ShardFormatError (or
    a skipped line with a warning), never a TypeError, AttributeError, RecursionError or a nonsense comparison."""
    write_split(tmp_path, spec, {"train": ["a"]})
    meta_file = tmp_path / shards.META_FILE
    meta = json.loads(meta_file.read_text())
    for bad, reason in (([1, 2], "not a JSON object"), ({**meta, "spec": [1]}, "not a JSON object"),
                        ({**meta, "spec": {**meta["spec"], "num_frames": "20"}}, "num_frames must be a positive integer"),
                        ({**meta, "spec": {**meta["spec"], "window_seconds": float("nan")}}, "window_seconds must be"),
                        ({**meta, "spec": {**meta["spec"], "sample_rate": 0}}, "sample_rate must be a positive integer"),
                        ({k: v for k, v in meta.items() if k != "spec"}, "no 'spec'"),
                        ({**meta, "spec": {"schema_version": meta["spec"]["schema_version"]}}, "missing .* required")):
        meta_file.write_text(json.dumps(bad))
        with pytest.raises(shards.ShardFormatError, match=reason):
            shards.read_spec(tmp_path)
    meta_file.write_text("\u00e9t\u00e9".encode("latin-1").decode("latin-1"), encoding="latin-1")
    with pytest.raises(shards.ShardFormatError, match="meta.json: unreadable"):
        shards.read_meta(tmp_path)

    lines = tmp_path / "failures.jsonl"
    lines.write_text('{"id": "x", "stage": "decode"}\n[1, 2]\n"t0"\n{torn\n')
    with caplog.at_level("WARNING"):
        assert shards.read_jsonl(lines) == [{"id": "x", "stage": "decode"}]
    assert "failures.jsonl:2: not a JSON object" in caplog.text

    deep = b"[" * 100_000 + b"]" * 100_000
    for data, reason in ((deep, "RecursionError"), (b'{"id": ' + b"9" * 5000 + b"}", "ValueError")):
        with pytest.raises(shards.ShardFormatError, match=f"json member is not JSON \\({reason}"):
            shards.schema._decode_member("json", data, spec)


def test_sample_json_values_that_would_break_their_readers_are_refused():
    """A NaN duration ended evaluation in a traceback, a negative one wrote a short WAV silently, and an id with a
    newline split clip_ids.txt into two lines; the writer checks the same rules, so stage one never writes them."""
    good = {"id": "a", "caption": "", "label": "", "split": "test", "duration": 2.0, "valid_frames": 1, "nouns": [],
            "source": "a.mp4"}
    assert shards.SampleMeta.from_json(good).duration == 2.0
    for change, reason in (({"duration": float("nan")}, "duration must be a finite"), ({"duration": -1}, "duration must"),
                           ({"start": float("inf")}, "start must be a finite"), ({"id": "a\nb"}, "line break"),
                           ({"id": "a\x85b"}, "line break"), ({"id": "a\u2028b"}, "line break"),
                           ({"id": "nul\x00"}, "NUL"), ({"id": " x"}, "white space"), ({"id": ""}, "is empty")):
        with pytest.raises(shards.ShardFormatError, match=reason):
            shards.SampleMeta.from_json({**good, **change})
    assert shards.SampleMeta.from_json({**good, "id": "a\tb c"}).id == "a\tb c"  # inner white space is fine

    from preprocess.manifest import Clip, ManifestError, check_sample_keys

    with pytest.raises(ManifestError, match=r"videos/: clip id 'a\\u2028b' holds a line break"):
        check_sample_keys([Clip("a\u2028b", None, 0.0, "", "", "train")], "videos/")


@pytest.mark.parametrize("bad", [b"{torn", b'{"id": "b", "split": "train"}'])
def test_a_bad_json_member_found_while_listing_a_split_names_shard_and_sample(tmp_path, spec, bad):
    """Counting a split reads only the json members; one that is not JSON, or not a sample's metadata, names the
    shard and the sample's key (a shard holds thousands), in every reader that lists samples."""
    from tests.conftest import rewrite_shard

    write_split(tmp_path, spec, {"train": ["a", "b"]})
    (path,) = shards.list_shards(tmp_path, "train")
    key = shards.sample_key("b")
    rewrite_shard(path, lambda name, data: bad if name == f"{key}.json" else data)
    readers = (lambda: shards.read_split(tmp_path, "train"), lambda: list(shards.iter_split(tmp_path, "train")),
               lambda: list(shards.iter_member(tmp_path, "train", "flac")))
    for read in readers:
        with pytest.raises(shards.ShardFormatError) as caught:
            read()
        assert str(caught.value).startswith(f"{path}: sample {key!r}: "), caught.value


@pytest.mark.parametrize("kind", ["member", "long-name"])
def test_a_tar_header_claiming_a_huge_size_is_the_shards_error_not_a_memory_error(tmp_path, spec, kind):
    """tarfile reads what a header claims: a json member (or a GNU long name) of 2**45 bytes was a MemoryError
    traceback in training and evaluation, which read the json members of a folder's shards."""
    write_meta(tmp_path, spec)
    path = tmp_path / "train-000-000000.tar"
    if kind == "member":
        info = tarfile.TarInfo("x.json")
        info.size = 1 << 45
        path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"{}" + b"\0" * 1022)
    else:
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, 1 << 45
        path.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"x.json" + b"\0" * 1018)
    with pytest.raises(shards.ShardFormatError, match=str(path)):
        shards.read_split(tmp_path, "train")
    # stage one's resume: an error it reports as an unreadable shard (the json member is never read whole)
    with pytest.raises(shards.ShardFormatError if kind == "long-name" else OSError):
        shards.shard_index(path)


def test_an_aborted_shard_says_nothing_when_collected(tmp_path, spec, monkeypatch):
    """After a full disk stopped stage one, its one-line error was followed by 'Exception ignored in: <function
    _Stream.__del__> ... ValueError: write to closed file': the dropped tar stream flushed into the closed file."""
    import gc
    import sys

    caught: list = []
    monkeypatch.setattr(sys, "unraisablehook", caught.append)
    writer = shards.ShardWriter(tmp_path, "train", rank=0, max_samples=5)
    writer.write(shards.encode_sample(spec, *make_sample(spec, "a")))
    writer.abort()
    del writer
    gc.collect()
    assert caught == [] and not list(tmp_path.iterdir())


def test_a_flac_header_claiming_billions_of_samples_is_the_shards_error_not_a_memory_error():
    """soundfile sizes a whole read by the STREAMINFO's sample count: a forged count of 2**36 - 1 in a small member
    (within the size limits) asked for 256 GiB, a MemoryError traceback in verify and training."""
    from shards.schema import _flac_bytes

    data = bytearray(_flac_bytes(np.zeros(16000, np.float32), 16000))
    at = 18  # fLaC, the block header, then 10 bytes of block and frame sizes: rate, channels, bits and 36-bit count
    data[at:at + 8] = (int.from_bytes(data[at:at + 8], "big") | (1 << 36) - 1).to_bytes(8, "big")
    with pytest.raises(shards.ShardFormatError, match="member 'flac'"):
        shards.read_flac(bytes(data), 16000)
    assert len(shards.read_flac(_flac_bytes(np.zeros(16000, np.float32), 16000), 16000)) == 16000


def test_a_key_written_twice_in_a_shard_is_refused(tmp_path, spec, capsys):
    """A second sample under a key already read (its json naming another clip, so no id repeats) was read as one
    more sample: those features trained twice per epoch. Stage one never writes a key twice."""
    write_meta(tmp_path, spec)
    first, other = _good_members(spec, "a"), _good_members(spec, "b", seed=1)
    again = dict(first)
    meta = json.loads(again["a.json"])
    again["a.json"] = json.dumps({**meta, "id": "a2"}).encode()
    shard = tmp_path / "train-000-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for members in (first, other, again):
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    lines = _verify_lines(tmp_path, capsys)
    assert len(lines) == 1 and shard.name in lines[0] and "sample 'a' appears twice in the shard" in lines[0]
    with pytest.raises(shards.ShardFormatError, match="sample 'a' appears twice in the shard"):
        list(shards.iter_split(tmp_path, "train"))


@pytest.mark.parametrize("kind", ["pipe", "device"])
def test_a_shard_name_on_a_pipe_or_a_device_is_one_line_not_a_hang(tmp_path, spec, capsys, kind):
    """A FIFO named like a shard blocked verify and training forever in open(); a link to /dev/zero was read
    forever by verify and counted as an empty shard by training."""
    write_split(tmp_path, spec, {"train": ["a", "b"]})
    shard = tmp_path / "train-000-000001.tar"
    if kind == "pipe":
        os.mkfifo(shard)
    else:
        shard.symlink_to("/dev/zero")
    lines = _verify_lines(tmp_path, capsys)
    assert lines == [f"problem: {shard}: a {kind}, not a shard file"]
    error = _training_error(tmp_path)
    assert error == f"{shard}: a {kind}, not a shard file"


def test_verify_names_tar_files_no_stage_reads(tmp_path, spec, capsys):
    """A shard renamed by hand ('train-000-000000 copy.tar') was passed over without a word: its samples are
    trained by no run."""
    write_split(tmp_path, spec, {"train": ["a", "b", "c"]})
    shard = shards.list_shards(tmp_path)[0]
    for suffix in ("", ".json"):  # the shard and its record
        shard.with_name(shard.name + suffix).rename(tmp_path / f"train-000-000000 copy.tar{suffix}")
    assert shards_main(["verify", str(tmp_path)]) == 0
    assert ("note: 1 .tar file(s) not named like shards ({split}-{rank}-{index}.tar) are read by no stage: "
            "train-000-000000 copy.tar") in capsys.readouterr().out.splitlines()


def test_a_failures_record_verify_cannot_read_is_one_line(tmp_path, spec, capsys):
    """failures.jsonl made a folder (or a folder verify may not read: PermissionError) was a traceback."""
    write_split(tmp_path, spec, {"train": ["a"]})
    (tmp_path / shards.FAILURES_FILE).mkdir()
    assert shards_main(["verify", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / shards.FAILURES_FILE}: unreadable (Is a directory)\n"
