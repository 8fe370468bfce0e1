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


def test_manifests_from_spreadsheets_and_editors(tmp_path, capsys):
    """A byte-order mark (as spreadsheet programs save CSV) is not part of the first id; a quoted label may hold
    a comma or a newline, and the line numbers in errors stay those of the file."""
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "abc_000030.mp4").write_bytes(b"x")
    csv = tmp_path / "vgg.csv"
    csv.write_text('\ufeffabc,30,"dog barking, then\na car",train\ndef,1,x,train\n', encoding="utf-8")
    clips = {c.id: c for c in from_vggsound_csv(csv, videos)}
    assert clips["abc_000030"].path == videos / "abc_000030.mp4"
    assert clips["abc_000030"].label == "dog barking, then\na car"
    csv.write_text('abc,30,"two\nlines",train\ndef,-1,x,train\n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"vgg.csv:3: start_seconds '-1' is not a number of seconds >= 0"):
        from_vggsound_csv(csv, videos)
    for start in ("nan", "inf", "1e400"):
        csv.write_text(f"abc,{start},x,train\n")
        with pytest.raises(ManifestError, match=r"vgg.csv:1: start_seconds"):
            from_vggsound_csv(csv, videos)
    csv.write_bytes(b"abc,30,caf\xe9,train\n")  # Latin-1, not UTF-8
    with pytest.raises(ManifestError, match=r"vgg.csv: not UTF-8 text \(byte 10"):
        from_vggsound_csv(csv, videos)


def test_captions_json_values(tmp_path, capsys):
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (tmp_path / name).write_bytes(b"x")
    captions = tmp_path / "captions.json"
    captions.write_text('\ufeff{"a": "dog", "b": null}', encoding="utf-8")
    assert [c.caption for c in from_folder(tmp_path, captions)] == ["dog", "", ""]  # null is no caption, not "None"
    captions.write_text(json.dumps({"a": "dog", "b": ["cat"]}))
    with pytest.raises(ManifestError, match=r"captions.json: the caption of 'b' is a list, not a string"):
        from_folder(tmp_path, captions)
    # two names of one video with other captions: the last won without a word
    captions.write_text(json.dumps({"a.mp4": "dog", "other/a.mkv": "cat", "b": "owl", "b.mp4": "owl"}))
    with pytest.raises(ManifestError, match=r"captions.json: 'a.mp4' and 'other/a.mkv' both name video 'a', with "
                                            r"other captions \('dog', 'cat'\); keep one$"):
        from_folder(tmp_path, captions)
    rows = tmp_path / "captions.csv"
    rows.write_text("a.mp4,dog\nb,owl\nb.mp4,owl\na,cat\n")  # the same caption twice is one
    with pytest.raises(ManifestError, match=r"captions.csv: 'a.mp4' and 'a' both name video 'a'"):
        from_folder(tmp_path, rows)
    rows.write_text("a.mp4,dog\nb,owl\nb.mp4,owl\n")
    assert [c.caption for c in from_folder(tmp_path, rows)] == ["dog", "owl", ""]


def test_captions_that_miss_the_videos_are_reported(tmp_path, capsys):
    """Captions keyed by names that match no file (a typo, another naming scheme) would silently leave every
    clip without nouns: one warning line for each side."""
    for i in range(5):
        (tmp_path / f"clip{i}.mp4").write_bytes(b"x")
    captions = tmp_path / "captions.csv"
    captions.write_text("clip0.mp4,a dog\nvideo_1,a cat\nvideo_2,a car\n")
    clips = from_folder(tmp_path, captions)
    assert [c.caption for c in clips] == ["a dog", "", "", "", ""]
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {captions}: 4 of 5 videos have no caption there: clip1, clip2, clip3 ...",
                   f"warning: {captions}: 2 captions name no video in the folder: video_1, video_2"]
    captions.write_text("".join(f"clip{i},x\n" for i in range(5)))
    from_folder(tmp_path, captions)
    assert capsys.readouterr().err == ""


def test_names_of_videos_that_are_not_files_are_reported(tmp_path, capsys):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "missing.mp4")
    (tmp_path / "folder.mkv").mkdir()
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")  # resolving it fails (ELOOP): it was a traceback
    assert [c.id for c in from_folder(tmp_path)] == ["a"]
    assert capsys.readouterr().err.strip() == (f"warning: {tmp_path}: 3 entries named like videos are not files (a broken "
                                               "link, a link loop or a folder) and are left out: folder.mkv, gone.mp4, "
                                               "loop.mp4")


def test_captions_and_csv_files_the_parsers_refuse_are_one_line(tmp_path):
    """JSON nested too deeply for the parser (RecursionError) and a CSV field over the csv module's 128 kB limit
    (csv.Error) ended stage one with a traceback."""
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"x")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match=r"^.*deep\.json: not valid JSON \(nested too deeply\)$"):
        from_folder(tmp_path / "v", deep)
    huge = tmp_path / "huge.csv"
    huge.write_text("a.mp4,fine\n" + "b.mp4," + "x" * 200_000 + "\n")
    with pytest.raises(ManifestError, match=r"huge\.csv:2: not readable as CSV \(field larger than field limit"):
        from_folder(tmp_path / "v", huge)
    rows = tmp_path / "vgg.csv"
    rows.write_text("a,0," + "y" * 200_000 + ",train\n")
    with pytest.raises(ManifestError, match=r"vgg\.csv:1: not readable as CSV"):
        from_vggsound_csv(rows, tmp_path / "v")


def test_rows_of_one_clip_id_that_disagree_are_reported(tmp_path, capsys):
    """VGGSound repeats rows: a repeat is dropped quietly. Rows that share an id but differ (another label, or a
    start that differs in its fraction on a whole video) are dropped with one warning naming them."""
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "x.mp4").write_bytes(b"x")  # a whole video: the window starts at the row's start
    csv = tmp_path / "vgg.csv"
    csv.write_text("x,1700,dog barking,train\nx,1700,dog barking,train\nx,1700.5,dog barking,train\n"
                   "y,3,cat,train\ny,3,car,train\n")
    clips, dropped = dedupe(from_vggsound_csv(csv, videos))
    assert [(c.id, c.start, c.label) for c in clips] == [("x_001700", 1700.0, "dog barking"), ("y_000003", 0.0, "cat")]
    assert dropped == 3
    assert capsys.readouterr().err.strip() == (
        "warning: 2 manifest rows share a clip id with an earlier, different row and are left out (the first row is "
        "used): x_001700 (start 1700.0 kept, 1700.5 left out); y_000003 (label cat kept, car left out)")


def test_a_video_whose_name_cannot_be_an_id_is_left_out_alone(tmp_path, capsys):
    """A name ending in a space or holding a line break cannot name a clip (ids name files and lines): that video is
    left out with a warning line, and the others go on (the whole run used to stop)."""
    for name in ("a.mp4", "trailing .mp4", "new\nline.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"x")
    assert [c.id for c in from_folder(tmp_path)] == ["a", "b"]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path}: clip id 'new\\nline' holds a line break or a NUL (ids name files and lines); left out "
        "(rename the video or the manifest's id)",
        f"warning: {tmp_path}: clip id 'trailing ' begins or ends with white space; left out (rename the video or the "
        "manifest's id)"]


def test_a_caption_name_with_a_dot_names_its_own_video(tmp_path, capsys):
    """`take.2` was read as file name take + suffix .2, so its caption went to take.mp4 (and a file naming both was
    refused as naming one video twice). A name is a video's stem, or a file name with a video suffix."""
    for name in ("take.mp4", "take.2.mp4", "dog.mkv"):
        (tmp_path / name).write_bytes(b"x")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"take.2": "a cat meowing", "take": "a man talking", "dog.mkv": "a dog"}))
    assert {c.id: c.caption for c in from_folder(tmp_path, captions)} == {
        "take": "a man talking", "take.2": "a cat meowing", "dog": "a dog"}


def test_rows_with_a_field_too_many_are_refused_naming_the_line(tmp_path):
    """An unquoted comma in a caption cut it short; in a VGGSound row, the label's second half became the split."""
    (tmp_path / "v").mkdir()
    (tmp_path / "v/a.mp4").write_bytes(b"x")
    captions = tmp_path / "captions.csv"
    captions.write_text("a.mp4,male speech, man speaking\n")
    with pytest.raises(ManifestError, match=r"captions.csv:1: expected 2 fields `name,caption`, got 3 .*quote a caption"):
        from_folder(tmp_path / "v", captions)
    csv = tmp_path / "vgg.csv"
    csv.write_text("abc,0,dog,train\nabc,0,dog,barking,train\n")
    with pytest.raises(ManifestError, match=r"vgg.csv:2: expected 4 fields .*got 5 .*quote a label"):
        from_vggsound_csv(csv, tmp_path / "v")
    csv.write_text(",5,dog,train\n")
    with pytest.raises(ManifestError, match=r"vgg.csv:1: empty youtube_id"):
        from_vggsound_csv(csv, tmp_path / "v")


def test_a_captions_file_that_names_no_video_is_refused(tmp_path):
    """Another folder's captions (or a TSV read as one-field rows) only warned, and every clip was made without
    nouns."""
    for i in range(3):
        (tmp_path / f"clip{i}.mp4").write_bytes(b"x")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"other0": "a dog", "other1": "a cat"}))
    with pytest.raises(ManifestError, match=r"its 2 captions name none of the 3 videos of the folder \(e.g. 'other0'"):
        from_folder(tmp_path, captions)


def test_captions_and_split_without_a_folder_of_videos_are_refused(tmp_path, capsys):
    """With --csv, --captions and --split were dropped without a word (the CSV's rows give labels and splits)."""
    from preprocess.__main__ import main

    (tmp_path / "v").mkdir()
    csv = tmp_path / "vgg.csv"
    csv.write_text("abc,0,dog,train\n")
    for extra in (["--captions", str(csv)], ["--split", "test"]):
        assert main(["--csv", str(csv), "--videos", str(tmp_path / "v"), *extra, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {extra[0]} apply to a folder of videos (--videos without --csv)"), err


def test_manifests_given_through_a_pipe_are_read(tmp_path):
    """`--csv <(...)` and `--captions <(...)` are pipes, not regular files: they were 'not found'."""
    import os
    import threading

    (tmp_path / "v").mkdir()
    (tmp_path / "v/a.mp4").write_bytes(b"x")
    for name, text, read in (("vgg", "a,0,dog,train\n", lambda p: from_vggsound_csv(p, tmp_path / "v")),
                             ("cap", "a,a dog\n", lambda p: from_folder(tmp_path / "v", p))):
        pipe = tmp_path / name
        os.mkfifo(pipe)
        writer = threading.Thread(target=lambda pipe=pipe, text=text: pipe.write_text(text))
        writer.start()
        clips = read(pipe)
        writer.join()
        assert [(c.id, c.caption) for c in clips] in ([("a_000000", "dog")], [("a", "a dog")])


def test_a_header_row_after_comments_is_a_header(tmp_path):
    (tmp_path / "v").mkdir()
    csv = tmp_path / "vgg.csv"
    csv.write_text("# exported 2026-11-30\n\nyoutube_id,start_seconds,label,split\nabc,3,dog,train\n")
    assert [c.id for c in from_vggsound_csv(csv, tmp_path / "v")] == ["abc_000003"]


def test_split_names_differing_in_case_are_warned_about(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    csv = tmp_path / "vgg.csv"
    csv.write_text("abc,3,dog,train\nabd,3,cat,Train\nabe,3,cow,test\n")
    assert sorted({c.split for c in from_vggsound_csv(csv, tmp_path / "v")}) == ["Train", "test", "train"]
    assert capsys.readouterr().err.strip() == (f"warning: {csv}: split names that differ only in case are separate "
                                               "splits ('Train' and 'train'); training and evaluation read one split "
                                               "by its exact name")


def test_start_seconds_are_plain_decimal_numbers(tmp_path):
    """float() also reads '5_0' as 50 and an Arabic-Indic '\u0665' as 5: a typo became another window, silently."""
    (tmp_path / "v").mkdir()
    for name in "abcde":
        (tmp_path / "v" / f"{name}.mp4").write_bytes(b"x")  # whole videos: the window starts at start_seconds
    csv = tmp_path / "vgg.csv"
    csv.write_text("a,30,dog,train\nb,+1.5,dog,train\nc,.5,dog,train\nd,2e1,dog,train\ne,7.,dog,train\n")
    assert [(c.id, c.start) for c in from_vggsound_csv(csv, tmp_path / "v")] == [
        ("a_000030", 30.0), ("b_000001", 1.5), ("c_000000", 0.5), ("d_000020", 20.0), ("e_000007", 7.0)]
    for start in ("5_0", "\u0665", "infinity", "nan", "-1", "1e999", "0x10", "1,5"):
        csv.write_text(f'a,30,dog,train\nb,"{start}",dog,train\n')
        with pytest.raises(ManifestError, match=rf"vgg.csv:2: start_seconds {start!r} is not a number of seconds"):
            from_vggsound_csv(csv, tmp_path / "v")


def test_a_captions_json_key_written_twice_with_other_captions_is_refused(tmp_path):
    """json.loads keeps the last of a repeated key: one of the two captions was dropped without a word."""
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"x")
    captions = tmp_path / "captions.json"
    captions.write_text('{"a": "a dog barking", "b": "owl", "a": "a cat"}')
    with pytest.raises(ManifestError, match=r"captions.json: 'a' and 'a' both name video 'a', with other captions "
                                            r"\('a dog barking', 'a cat'\); keep one$"):
        from_folder(tmp_path, captions)
    captions.write_text('{"a": "a dog", "b": "owl", "a": "a dog"}')  # the same caption twice is one
    assert [c.caption for c in from_folder(tmp_path, captions)] == ["a dog", "owl"]
    captions.write_text('{"a": {"text": "a dog"}}')
    with pytest.raises(ManifestError, match=r"the caption of 'a' is a object, not a string"):
        from_folder(tmp_path, captions)
    captions.write_text('[{"a": "a dog"}]')
    with pytest.raises(ManifestError, match=r"expected a JSON object mapping video name to caption"):
        from_folder(tmp_path, captions)


def test_a_video_named_only_by_its_suffix_is_reported(tmp_path, capsys):
    """'.mp4' (a video with an empty name) was not seen as a video at all: no clip and no word about it."""
    for name in ("a.mp4", ".mp4", ".MKV"):
        (tmp_path / name).write_bytes(b"x")
    assert [c.id for c in from_folder(tmp_path)] == ["a"]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path}: 1 clip id(s) have several video files; using the first by name: .MKV (not .mp4)",
        f"warning: {tmp_path}: clip id '' is empty; left out (rename the video or the manifest's id)"]


def test_a_video_whose_name_is_not_utf8_is_left_out_alone(tmp_path, capsys):
    """A file name that is not UTF-8 reads as a lone surrogate ('caf\\udce9'): such an id broke printing it and
    writing it as text (verify ended in a UnicodeEncodeError traceback)."""
    import os

    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / os.fsdecode(b"caf\xe9.mp4")).write_bytes(b"x")
    assert [c.id for c in from_folder(tmp_path)] == ["a"]
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path}: clip id 'caf\\udce9' holds a lone surrogate (not text that files and terminals can "
        "write); left out (rename the video or the manifest's id)"]
