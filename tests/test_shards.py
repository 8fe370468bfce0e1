"""The shard contract: round trip, validation, refusal of unsafe members, crash-safe writing."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
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
