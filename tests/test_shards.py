"""The shard contract: round trip, validation, refusal of unsafe members, crash-safe writing."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

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
        for key in shards.ARRAY_KEYS:
            assert sample[key].dtype == np.float16
            np.testing.assert_allclose(sample[key], arrays[key].astype(np.float16))
        np.testing.assert_allclose(sample["flac"], waveform, atol=1 / 2**15)
    assert sorted(shards.shard_keys(shards.list_shards(tmp_path)[0])) == sorted(shards.sample_key(i) for i in list(originals)[:2])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m, a: a.update({"clip.npy": a["clip.npy"][:-1]}), "clip.npy has shape"),
        (lambda m, a: a.update({"probs.npy": a["probs.npy"] + 1.5}), "outside [0, 1]"),
        (lambda m, a: a.update({"latent_mean.npy": a["latent_mean.npy"] * np.nan}), "non-finite"),
        (lambda m, a: m.update({"nouns": m["nouns"][:1]}), "nouns.npy has shape"),
        (lambda m, a: m.pop("duration"), "json lacks duration"),
        (lambda m, a: a.pop("caption.npy"), "missing caption.npy"),
    ],
)
def test_validation_rejects_samples_off_the_schema(spec, change, message):
    meta, arrays, waveform = make_sample(spec, "bad")
    change(meta, arrays)
    with pytest.raises(shards.ShardFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
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


def test_verify_refuses_another_schema_version(tmp_path, spec):
    write_meta(tmp_path, spec)
    meta = json.loads((tmp_path / shards.META_FILE).read_text())
    meta["spec"]["schema_version"] = 999
    (tmp_path / shards.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(shards.ShardFormatError, match="schema version 999"):
        shards.read_spec(tmp_path)


def test_jsonl_survives_a_torn_line(tmp_path):
    path = tmp_path / "failures.jsonl"
    shards.append_jsonl(path, {"id": "a", "stage": "video"})
    with open(path, "a") as handle:
        handle.write('{"id": "b", "sta')  # killed mid-line
    assert shards.read_jsonl(path) == [{"id": "a", "stage": "video"}]


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
                             nouns=("dog",), source="/v.mp4", start=1.0, silent=True)
    assert shards.SampleMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta
    assert set(meta.to_json()) == {"id", "caption", "label", "split", "duration", "valid_frames", "nouns", "source",
                                   "start", "silent"}
    older = {k: v for k, v in meta.to_json().items() if k not in ("start", "silent")}  # written before they existed
    assert shards.SampleMeta.from_json(older).start == 0.0 and not shards.SampleMeta.from_json(older).silent
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
    write_split(tmp_path, spec, {"test": ["t0", "t1"]}, max_samples=1)
    with pytest.raises(shards.ShardFormatError, match="meta.json: missing"):
        shards.read_split(tmp_path / "nowhere", "test")
    broken = shards.list_shards(tmp_path)[1]
    broken.write_bytes(broken.read_bytes()[:700])  # cut inside the first member's data
    with pytest.raises(shards.ShardFormatError, match=rf"{broken.name}: unreadable shard"):
        shards.read_split(tmp_path, "test")
    _tar_with(broken, {"t1.json": b"[1, 2]"})
    with pytest.raises(shards.ShardFormatError, match=rf"{broken.name}: .*not an object"):
        shards.read_split(tmp_path, "test")


def test_sample_stream_selects_the_split_and_skips(tmp_path, spec):
    import random

    write_split(tmp_path, spec, {"train": ["a", "b", "c", "d"], "test": ["t0"]})
    urls = [str(p) for p in shards.list_shards(tmp_path)]
    everything = [s["json"]["id"] for s in shards.sample_stream(urls, "train", shuffle_buffer=1, seed="0")]
    assert everything == ["a", "b", "c", "d"]  # a buffer of one keeps the order
    shuffled = [s["json"]["id"] for s in shards.sample_stream(urls, "train", shuffle_buffer=8, seed="0")]
    assert sorted(shuffled) == everything
    assert shuffled == [s["json"]["id"] for s in shards.sample_stream(urls, "train", shuffle_buffer=8, seed="0")]
    resumed = [s["json"]["id"] for s in shards.sample_stream(urls, "train", shuffle_buffer=8, seed="0", skip=3)]
    assert resumed == shuffled[3:]
    random.Random(0).shuffle(urls)  # the caller's shard order is kept
    assert all(isinstance(s["clip.npy"], np.ndarray) for s in shards.sample_stream(urls, "test", 1, "0"))


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
    nouns = torch.from_numpy(arrays["nouns.npy"].astype(np.float32))
    torch.testing.assert_close(conditions["objects"], (probs * (probs >= 0.5)) @ nouns)
    torch.testing.assert_close(conditions["video"], torch.from_numpy(arrays["clip.npy"].astype(np.float32)))
    batch = shards.stack_conditions([conditions, shards.sample_conditions(arrays)])
    assert batch["caption"].shape == (2, spec.embed_dim) and batch["objects"].shape == (2, spec.num_frames, spec.embed_dim)
    assert not torch.equal(batch["objects"][0], batch["objects"][1])  # the threshold of each sample was applied
