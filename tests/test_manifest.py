"""Reading what to process: VGGSound CSV rows, folders, captions, rank partitions."""

from __future__ import annotations

import json

import pytest

from preprocess.manifest import ManifestError, dedupe, from_folder, from_vggsound_csv, partition


def test_vggsound_csv_finds_trimmed_and_full_videos(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "abc_000030.mp4").write_bytes(b"x")  # trimmed clip: window from 0
    (videos / "def.webm").write_bytes(b"x")  # whole video: window from start_seconds
    csv = tmp_path / "vgg.csv"
    csv.write_text("abc,30,dog barking,train\ndef,12,cat meowing,test\nghi,0,missing clip,train\n")
    clips = {c.id: c for c in from_vggsound_csv(csv, videos)}
    assert clips["abc_000030"].path == videos / "abc_000030.mp4" and clips["abc_000030"].start == 0.0
    assert clips["def_000012"].path == videos / "def.webm" and clips["def_000012"].start == 12.0
    assert clips["def_000012"].split == "test" and clips["def_000012"].caption == "cat meowing"
    assert clips["ghi_000000"].path is None


def test_bad_csv_rows_name_the_file_and_line(tmp_path):
    (tmp_path / "v").mkdir()
    csv = tmp_path / "bad.csv"
    csv.write_text("abc,30,dog barking,train\nabc,thirty,dog,train\n")
    with pytest.raises(ManifestError, match=r"bad.csv:2: start_seconds 'thirty'"):
        from_vggsound_csv(csv, tmp_path / "v")
    with pytest.raises(ManifestError, match="video folder not found"):
        from_vggsound_csv(csv, tmp_path / "nope")


def test_folder_with_captions(tmp_path):
    for name in ("b.mp4", "a.mkv", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"a.mkv": "a dog barking"}))
    clips = from_folder(tmp_path, captions, split="test")
    assert [(c.id, c.caption, c.split) for c in clips] == [("a", "a dog barking", "test"), ("b", "", "test")]


def test_partition_is_disjoint_and_complete(tmp_path):
    (tmp_path / "v").mkdir()
    csv = tmp_path / "vgg.csv"
    csv.write_text("".join(f"id{i},0,x,train\n" for i in range(11)) + "id3,0,x,train\n")
    clips, dropped = dedupe(from_vggsound_csv(csv, tmp_path / "v"))
    assert dropped == 1
    parts = [partition(clips, r, 3) for r in range(3)]
    ids = [c.id for p in parts for c in p]
    assert sorted(ids) == sorted(c.id for c in clips) and len(ids) == len(set(ids))
    with pytest.raises(ManifestError):
        partition(clips, 3, 3)


def test_split_names_must_fit_shard_file_names(tmp_path):
    (tmp_path / "v").mkdir()
    csv = tmp_path / "vgg.csv"
    csv.write_text("abc,30,dog barking,val-1\n")
    with pytest.raises(ManifestError, match=r"vgg.csv:1: split 'val-1'"):
        from_vggsound_csv(csv, tmp_path / "v")
    with pytest.raises(ManifestError, match="split 'a b'"):
        from_folder(tmp_path / "v", split="a b")


def test_clip_ids_that_share_a_sample_key_are_refused_naming_both(tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    for name in ("x.1.mp4", "x_1.mp4", "y.mp4"):
        (videos / name).write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"clip ids 'x.1' and 'x_1' both become shard sample key 'x_1'"):
        from_folder(videos)
    csv = tmp_path / "vgg.csv"
    csv.write_text("a/b,30,dog,train\na.b,30,dog,train\na.b,30,dog,train\n")
    with pytest.raises(ManifestError, match=r"vgg.csv: clip ids 'a/b_000030' and 'a.b_000030' both become"):
        from_vggsound_csv(csv, videos)
    # the same id repeated (VGGSound's repeated rows) is no clash
    csv.write_text("abc,30,dog,train\nabc,30,dog,train\n")
    assert dedupe(from_vggsound_csv(csv, videos))[1] == 1


def test_files_sharing_a_stem_give_one_clip_the_first_by_name_with_a_warning(tmp_path, capsys):
    for name in ("x.mp4", "x.avi", "x.mov", "y.mp4", "z.MKV", "z.flv"):
        (tmp_path / name).write_bytes(b"")
    clips = {c.id: c.path for c in from_folder(tmp_path)}
    assert clips == {"x": tmp_path / "x.avi", "y": tmp_path / "y.mp4", "z": tmp_path / "z.MKV"}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "2 clip id(s) have several video files" in warnings[0] and "x.avi (not x.mov, x.mp4)" in warnings[0]
    from_folder(tmp_path)  # the same choice every time, whatever order the directory lists its files in
    assert {c.id: c.path for c in from_folder(tmp_path)} == clips
