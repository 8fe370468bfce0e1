"""Hostile and damaged run folders: no checkpoint file runs code, a broken checkpoint is skipped (never silently half
loaded), a moved run folder resumes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import shards
from tests.conftest import make_sample
from tests.test_train_run import _state, run
from tests.test_train_support import SPEC, one_thread, write_shards  # noqa: F401

FLAGS = ["--checkpoint-every", "2"]


class Plant:
    """Unpickling this creates `marker`: what a tampered pickle could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def hostile_pickle(path: Path, marker: Path) -> None:
    """A torch.save file whose full unpickling creates `marker` (checked on a copy, so the test is not vacuous)."""
    torch.save({"state": Plant(marker)}, path)
    control = marker.with_name(marker.name + ".control")
    copy = path.with_name(path.name + ".copy")
    shutil.copy(path, copy)
    torch.save({"state": Plant(control)}, copy)
    torch.load(copy, weights_only=False)
    assert control.exists()
    copy.unlink()
    control.unlink()


def rewrite_manifest(checkpoint: Path, name: str) -> None:
    """Make manifest.json agree with the file `name` as it is now (what someone tampering would do)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, num_shards=1, per_shard=8)
    return folder


def test_a_checkpoint_in_the_old_pickled_format_is_refused_unread(tmp_path, capsys, data):
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    checkpoint = out / "checkpoints/step_00000002"
    for name in ("manifest.json", "ema.safetensors", "progress.json", "rng_rank0.safetensors"):
        (checkpoint / name).unlink()
    hostile_pickle(checkpoint / "custom_checkpoint_0.pkl", marker)  # what register_for_checkpointing wrote
    torch.save({"step": 2, "skipped": 0, "samples": 4}, checkpoint / "custom_checkpoint_1.pkl")
    hostile_pickle(checkpoint / "random_states_0.pkl", marker)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    assert "step_00000002: the checkpoint predates the safe checkpoint format" in one_error_line(capsys)
    assert not marker.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # left as it was


def test_a_pickle_added_to_a_checkpoint_is_never_loaded(tmp_path, capsys, data):
    """accelerate would read random_states_0.pkl if it were there: a file the manifest does not list makes the
    checkpoint unusable; the one before it is resumed from."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    hostile_pickle(out / "checkpoints/step_00000004/random_states_0.pkl", marker)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    printed = capsys.readouterr().out
    assert "step_00000004 is not usable, random_states_0.pkl is not in its manifest" in printed
    assert "resuming from" in printed and "step_00000002 at step 2" in printed
    assert not marker.exists()


def test_a_tampered_optimizer_file_is_refused_by_the_restricted_unpickler(tmp_path, capsys, data):
    """Even with a manifest that agrees, optimizer.bin (a torch.save pickle) is read with weights_only=True."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    checkpoint = out / "checkpoints/step_00000002"
    hostile_pickle(checkpoint / "optimizer.bin", marker)
    rewrite_manifest(checkpoint, "optimizer.bin")
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    err = one_error_line(capsys)
    # the file is named, and the reason for the refusal is given, not cut off behind torch's general advice
    assert f"{checkpoint / 'optimizer.bin'}: does not load (UnpicklingError: the restricted unpickler refused" in err
    assert "open" in err.split("refused the file:", 1)[1], err
    assert not marker.exists()


def rewrite_safetensors(path: Path, change, metadata: dict[str, str] | None = None) -> None:
    """Rewrite a safetensors file with change(tensors) and rewrite its checkpoint's manifest to agree."""
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file(change(tensors), str(path), metadata=metadata)
    rewrite_manifest(path.parent, path.name)


def as_integers(tensors):
    return {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in tensors.items()}


def one_nan(tensors):
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    return tensors


@pytest.mark.parametrize(("name", "change", "metadata", "expected"), [
    ("model.safetensors", as_integers, {"format": "pt"}, "is stored as I32, where the model has float weights"),
    ("ema.safetensors", as_integers, {"format": "pt"}, "is stored as I32, where the model has float weights"),
    ("model.safetensors", one_nan, {"format": "pt"}, "holds NaN or infinite values (the run diverged"),
    ("ema.safetensors", one_nan, {"format": "pt"}, "holds NaN or infinite values (the run diverged"),
    ("rng_rank0.safetensors", dict, None, "does not load (ValueError: no 'scalars' metadata entry"),
])
def test_a_checkpoint_that_agrees_with_its_manifest_but_not_with_training_is_one_line_naming_the_file(
        tmp_path, capsys, data, name, change, metadata, expected):
    """Files rewritten together with their manifest pass the checksum; what training could never have written (float
    weights stored as integers, which load_state_dict would cast without a word; NaN weights, with which every step
    would be skipped; a generator file without its scalars) is refused in one line naming the file, not loaded."""
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    checkpoint = out / "checkpoints/step_00000002"
    rewrite_safetensors(checkpoint / name, change, metadata)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {checkpoint / name}: ") and expected in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]


def empty(path: Path) -> None:
    path.write_bytes(b"")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("name", "damage"), [("rng_rank0.safetensors", empty), ("rng_rank0.safetensors", truncate),
                                              ("model.safetensors", truncate), ("optimizer.bin", flip_a_byte),
                                              ("progress.json", empty), ("ema.safetensors", Path.unlink)])
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before_exactly(tmp_path, capsys, data, name, damage):
    """A damaged generator state would silently change the noise of every later step: the checkpoint is skipped with a
    warning naming it and the file, the steps after the previous one are trained again, bit for bit, and the broken
    folder is kept aside (nothing written is deleted)."""
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    uninterrupted = _state(out / "checkpoints/step_00000004")
    damage(out / "checkpoints/step_00000004" / name)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    printed = capsys.readouterr().out
    assert f"warning: {out / 'checkpoints/step_00000004'} is not usable, {name}" in printed, printed
    assert "step_00000002 at step 2" in printed
    resumed = _state(out / "checkpoints/step_00000004")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004",
                                                                       "step_00000004.broken"]
    assert (name in {p.name for p in (out / "checkpoints/step_00000004.broken").iterdir()}) == (damage is not Path.unlink)


def test_no_usable_checkpoint_is_one_line_and_nothing_is_deleted(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    truncate(out / "checkpoints/step_00000004/rng_rank0.safetensors")
    empty(out / "checkpoints/step_00000002/model.safetensors")
    capsys.readouterr()
    assert run(data, out, "--max-steps", "6", *FLAGS) == 2
    err = one_error_line(capsys)
    assert "no usable checkpoint (step_00000004: rng_rank0.safetensors is truncated" in err
    assert "step_00000002: model.safetensors is truncated" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_a_moved_run_folder_resumes(tmp_path, capsys, data):
    """The output path, --record-ranks and the shards path (when the data there is the same) do not change what is
    trained: they do not block a resume; other data at the same or another path does."""
    assert run(data, tmp_path / "a", "--max-steps", "4", *FLAGS) == 0
    assert run(data, tmp_path / "b", "--max-steps", "2", *FLAGS) == 0
    shutil.move(tmp_path / "b", tmp_path / "moved")
    shutil.copytree(data, tmp_path / "copied")
    write_shards(tmp_path / "other", num_shards=1, per_shard=9)
    capsys.readouterr()
    assert run(tmp_path / "other", tmp_path / "moved", "--max-steps", "4", *FLAGS) == 2
    assert "trained with other shards;" in one_error_line(capsys)
    assert run(tmp_path / "copied", tmp_path / "moved", "--max-steps", "4", *FLAGS, "--record-ranks") == 0
    assert "step_00000002 at step 2" in capsys.readouterr().out
    saved = json.loads((tmp_path / "moved/config.json").read_text())
    assert (saved["output"], saved["shards"]) == (str(tmp_path / "moved"), str(tmp_path / "copied"))
    a, b = _state(tmp_path / "a/checkpoints/step_00000004"), _state(tmp_path / "moved/checkpoints/step_00000004")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_checkpoint_of_another_process_count_is_one_line_on_every_rank(tmp_path, capsys, data):
    """A checkpoint written by two processes resumed by one: every rank refuses it the same way (no rank falls back
    alone to an older checkpoint while another loads the newest)."""
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    checkpoint = out / "checkpoints/step_00000002"
    for name in ("rng_rank0.safetensors", "data_rank0.json"):  # as if a rank 1 had written its files too
        shutil.copy(checkpoint / name, checkpoint / name.replace("rank0", "rank1"))
        rewrite_manifest(checkpoint, name.replace("rank0", "rank1"))
    record = json.loads((out / "config.json").read_text()) | {"world_size": 2}  # as the two processes wrote it
    (out / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    assert "written by 2 process(es), this run has 1" in one_error_line(capsys)
    assert json.loads((out / "config.json").read_text()) == record  # the refused run rewrote it with world_size 1


def test_a_torn_run_config_is_one_line(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    config = (out / "config.json").read_text()
    (out / "config.json").write_text(config[: len(config) // 2])  # cut by a crash of another writer
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    assert "config.json: unreadable" in one_error_line(capsys)
    assert not list(out.rglob("*.tmp"))  # the run's own files are written through a temporary name and renamed


def test_a_second_training_into_a_busy_folder_stops_at_once(tmp_path, capsys, data):
    """While one training holds the output folder, a second one given it stops with one line before writing: its
    checkpoints would interleave with the first's. Once the folder is free, the same command resumes."""
    from common.lock import folder_lock

    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    with folder_lock(out, "training"):  # what the first training holds while it runs
        assert run(data, out, "--max-steps", "4", *FLAGS) == 2
        assert one_error_line(capsys) == (f"error: {out}: another training is writing into this folder (pid "
                                          f"{os.getpid()}); wait for it to end, or choose another folder")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    assert (out / "checkpoints/step_00000004").is_dir()


def test_a_clip_found_twice_is_refused_before_training(tmp_path, capsys, data):
    """A folder assembled by hand can hold a clip twice (here in two shards); it would be trained twice as often
    as the others, so training refuses it in one line before any step. Stage one never writes one twice."""
    writer = shards.ShardWriter(data, "train", 7, 4)
    meta, arrays, waveform = make_sample(SPEC, "clip0_1", seed=5, split="train")
    writer.write(shards.encode_sample(SPEC, meta, arrays, waveform))
    writer.close()
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 2
    assert one_error_line(capsys) == (f"error: {data}: clip 'clip0_1' is in split 'train' 2 times; it would be "
                                      f"trained more often than the others (python -m shards verify {data} names "
                                      "the shards)")
    assert not (out / "checkpoints").exists()


def test_a_resume_with_another_worker_count_or_changed_shards_is_refused(tmp_path, capsys, data):
    """Data positions are kept per DataLoader worker: another --num-workers would repeat some samples of the epoch
    and skip others, so it is refused; so are shard files changed at the same path (the fingerprint was compared
    only when the path changed, and then overwritten). The same settings and data resume."""
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS, "--num-workers", "2") == 2
    assert ("trained with other num_workers (num_workers 0 there vs 2 now) (data positions are kept per DataLoader "
            "worker") in one_error_line(capsys)
    recorded = json.loads((out / "config.json").read_text())["data_fingerprint"]
    extra = shards.ShardWriter(data, "train", 7, 4)
    meta, arrays, waveform = make_sample(SPEC, "added", seed=5, split="train")
    extra.write(shards.encode_sample(SPEC, meta, arrays, waveform))
    extra.close()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    assert f"trained with other shards (the shard files in {data} changed: names, sizes or contents)" in one_error_line(capsys)
    assert json.loads((out / "config.json").read_text())["data_fingerprint"] == recorded  # not overwritten
    for path in data.glob("train-007-*"):
        path.unlink()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0


@pytest.mark.parametrize("case", ["foreign files", "foreign config", "output is a file", "checkpoints is a file"])
def test_an_output_folder_of_someone_else_is_never_written(tmp_path, capsys, data, case):
    """Training wrote its config.json and model/ over whatever the --output folder held: a folder with files but no
    training run's config.json is refused, and so is a file where the folder or one of its parts goes (which
    failed with a traceback, or at the first checkpoint). Nothing there changes."""
    out = tmp_path / "run"
    if case == "output is a file":
        out.write_text("notes")
    elif case == "checkpoints is a file":
        assert run(data, out, "--max-steps", "2", *FLAGS) == 0
        shutil.rmtree(out / "checkpoints")
        (out / "checkpoints").write_text("not a folder")
    else:
        (out / "model").mkdir(parents=True)
        (out / "model" / "ema.safetensors").write_text("precious")
        if case == "foreign config":
            (out / "config.json").write_text('{"my": "notes"}')
    before = {p: p.read_bytes() for p in ([out] if out.is_file() else out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert run(data, out, "--max-steps", "2", *FLAGS) == 2
    err = one_error_line(capsys)
    assert {"foreign files": f"{out}: holds model but no training run (no config.json)",
            "foreign config": f"{out / 'config.json'}: not a training run's configuration",
            "output is a file": f"{out}: exists and is not a folder",
            "checkpoints is a file": f"{out / 'checkpoints'}: a file where the run's checkpoints folder goes"}[case] in err
    after = {p: p.read_bytes() for p in ([out] if out.is_file() else out.rglob("*")) if p.is_file()}
    assert after == before


def test_what_this_project_leaves_before_config_json_is_no_foreign_file(tmp_path, data):
    """An evaluation run before training makes <run>/eval (its default output) with its lock; a first start killed
    while writing config.json leaves config.json.tmp. Neither makes the folder someone else's."""
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / ".lock").write_bytes(b"")
    (out / "config.json.tmp").write_text('{"cut sh')
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    assert (out / "checkpoints/step_00000002").is_dir()


def test_an_error_during_training_starts_its_own_line_after_the_progress_bar(tmp_path, capsys, data, monkeypatch):
    """A data error after some steps (e.g. a damaged sample) is printed after the progress bar's line is ended;
    it used to be glued to the end of the bar."""
    import train.trainer as trainer
    from train.data import DataError

    real_step, calls = trainer.train_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise DataError("shard-x.tar: sample 'k': damaged")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", failing_step)
    assert run(data, tmp_path / "run", "--max-steps", "4", *FLAGS) == 2
    err = capsys.readouterr().err
    assert "train:" in err  # the bar was drawn
    assert err.split("\n")[-2] == "error: shard-x.tar: sample 'k': damaged", repr(err[-300:])


def test_a_plain_pickle_refused_by_the_restricted_unpickler_keeps_its_reason(tmp_path):
    """torch says this refusal after an empty 'WeightsUnpickler error:' line: the reason was cut to nothing."""
    import pickle

    from common.weights import one_line

    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(Exception) as caught:
        torch.load(path, weights_only=True)
    line = one_line(caught.value)
    assert line.startswith("UnpicklingError: the restricted unpickler refused the file: ") and len(line) > 70, line
    assert not line.endswith("file: ")


@pytest.mark.parametrize("where", ["ema", "export", "optimizer"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, capsys, data, monkeypatch,
                                                                                where):
    """A disk that filled up while a checkpoint (or the exported weights) was written was a SafetensorError
    traceback, and the half-written step_N.tmp held its space until step N came again. Now one line, nothing
    partial left, and the same command resumes from the checkpoint before."""
    import errno

    import safetensors.torch

    import train.trainer as trainer

    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        name = Path(filename).name
        if (where == "ema" and name.startswith("ema.safetensors") and "step_00000004" in str(filename)) or \
                (where == "export" and Path(filename).parent.name == "model" and name.startswith("raw.")):
            Path(filename).write_bytes(b"half")
            raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })')
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(trainer.safetensors.torch, "save_file", full)
    real_save = torch.save

    def full_torch(obj, f, *args, **kwargs):  # accelerate's optimizer.bin: PyTorchStreamWriter on a full disk
        if where == "optimizer" and "step_00000004" in str(f) and str(f).endswith("optimizer.bin"):
            Path(f).write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_torch)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    printed = capsys.readouterr().err
    assert "Traceback" not in printed
    err = printed.strip().splitlines()[-1]  # after the progress bar's line
    what = out / ("model/raw.safetensors" if where == "export" else "checkpoints/step_00000004")
    why = "[enforce fail at inline_container.cc" if where == "optimizer" else "Error while serializing: IoError(Os {"
    assert err.startswith(f"error: {what}: cannot be written ({why}"), err
    assert err.endswith("the checkpoints and weights before it are kept: free the cause and run the same command again")
    assert not [p for p in out.rglob("*.tmp")] and errno.ENOSPC == 28
    assert (out / "checkpoints/step_00000002").is_dir()
    monkeypatch.undo()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    assert (out / "checkpoints/step_00000004").is_dir() and (out / "model/raw.safetensors").is_file()


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("progress.json", '{"step": -100, "skipped": 0, "samples": 8}', "counters must be whole numbers >= 0, got -100"),
    ("progress.json", '{"step": 7, "skipped": 0, "samples": 8}', "step 7 is not the step of its folder"),
    ("progress.json", '{"step": 2.5, "skipped": 0, "samples": 8}', "counters must be whole numbers >= 0, got 2.5"),
    ("data_rank0.json", '{"0": [0, -5]}', "a data position below 0"),
])
def test_counters_and_positions_training_never_writes_are_one_line(tmp_path, capsys, data, name, text, expected):
    """A progress.json rewritten with its manifest and a negative step resumed at step -100: the good checkpoints were
    set aside as broken (step folders compared as strings), 44 unprunable step_-00000NN folders were written and the
    run ended in a ZeroDivisionError; a negative data position was a traceback from inside webdataset."""
    from train.trainer import write_manifest

    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    checkpoint = out / "checkpoints/step_00000002"
    (checkpoint / name).write_text(text)
    write_manifest(checkpoint, 2)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {checkpoint / name}: does not load (ValueError: ") and expected in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]


@pytest.mark.parametrize("free, full", [(0, True), (1 << 40, False)])
def test_a_torch_write_failure_says_when_the_disk_is_full(tmp_path, monkeypatch, free, full):
    """torch.save on a full disk says only '[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598':
    the line now says the disk is full when it is (and only then)."""
    import collections
    import shutil

    import train.trainer as trainer

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 41, (1 << 41) - free, free))
    with pytest.raises(trainer.WriteFailed) as caught:
        with trainer.writing(tmp_path / "optimizer.bin.tmp", tmp_path / "optimizer.bin"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert caught.value.reason.startswith("No space left on device: [enforce fail") == full
    assert caught.value.reason.endswith("unexpected pos 704 vs 598")


def test_data_positions_of_an_older_version_resume_with_a_warning(tmp_path, capsys, data):
    """An older version recorded {worker: position} of streams that took whole shards; today's positions are per
    data stream of a sample range, marked as such. An older record resumes, saying that its samples from there on
    differ from an uninterrupted run's."""
    from train.trainer import write_manifest

    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    checkpoint = out / "checkpoints/step_00000002"
    recorded = json.loads((checkpoint / "data_rank0.json").read_text())
    assert set(recorded) == {"streams"}
    (checkpoint / "data_rank0.json").write_text(json.dumps(recorded["streams"]))  # as an older version wrote it
    write_manifest(checkpoint, 2)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
    assert "data positions of an older version" in capsys.readouterr().out
    assert run(data, tmp_path / "again", "--max-steps", "4", *FLAGS) == 0
    assert "older version" not in capsys.readouterr().out


def test_an_unexpected_error_with_workers_ends_the_process(tmp_path, data):
    """DataLoader workers ignore SIGTERM (the training loop stops on it); the interpreter's exit terminates and
    joins them, and after an error nothing caught in a worker (a forged FLAC's MemoryError: the traceback holds the
    loader) the process waited for them forever. The loader's workers now end with the training loop."""
    import subprocess
    import sys

    from tests.test_train_run import SMALL

    script = f"""
import sys
from train import data
from train.__main__ import main

def fails(*args, **kwargs):
    raise RuntimeError("not foreseen")

data.to_example = fails  # in the workers (forked)
sys.exit(main({["--shards", str(data), "--output", str(tmp_path / "out"), *SMALL, "--num-workers", "2",
                "--max-steps", "2"]!r}))
"""
    try:
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               cwd=Path(__file__).parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not end after the error")
    assert child.returncode == 1 and "RuntimeError: not foreseen" in child.stderr, child.stderr[-800:]


def test_a_shard_replaced_by_another_of_the_same_size_is_refused_on_resume(tmp_path, capsys):
    """The fingerprint held the shards' names and sizes: a shard replaced by one of other clips of the same size
    (fixed-size members, tar's 512-byte blocks) resumed, training on other data at the saved positions. The
    checksums of the shards' records are in it now; a run that recorded the older fingerprint still resumes."""
    from train.trainer import data_fingerprint

    data, other = tmp_path / "shards", tmp_path / "other"
    write_shards(data, num_shards=2, per_shard=4)
    writer = shards.ShardWriter(other, "train", 1, 4)  # shard 1's samples under other ids of the same length
    for i in range(4):
        meta, arrays, waveform = make_sample(SPEC, f"diff{1}_{i}", seed=100 + i, split="train")
        writer.write(shards.encode_sample(SPEC, meta, arrays, waveform))
    writer.close()
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", *FLAGS) == 0
    capsys.readouterr()
    shard, replacement = sorted(data.glob("*.tar"))[1], sorted(other.glob("*.tar"))[0]
    assert replacement.stat().st_size == shard.stat().st_size and replacement.read_bytes() != shard.read_bytes()
    for suffix in ("", ".json"):
        shutil.copy(f"{replacement}{suffix}", f"{shard}{suffix}")
    config = json.loads((out / "config.json").read_text())
    assert run(data, out, "--max-steps", "4", *FLAGS) == 2
    assert "(the shard files in" in one_error_line(capsys)
    # a run that recorded the fingerprint of names and sizes alone resumes as before
    config["data_fingerprint"] = data_fingerprint(data, shards.list_shards(data), checksums=False)
    (out / "config.json").write_text(json.dumps(config))
    assert run(data, out, "--max-steps", "4", *FLAGS) == 0
