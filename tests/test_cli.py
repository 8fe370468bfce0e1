"""The `vta-sam` front: every stage reachable with the same options as its make target."""

from __future__ import annotations

import json

import pytest

from vta_sam.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_one_clear_error(capsys):
    assert main(["featurez"]) == 2
    assert "unknown command 'featurez'" in capsys.readouterr().err


def test_features_dry_run_prints_the_resolved_config(tmp_path, capsys):
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"x")
    assert main(["features", "--videos", str(videos), "--out", str(tmp_path / "o"), "--fps", "3", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["fps"] == 3.0 and printed["spec"]["num_frames"] == round(10.24 * 3) and printed["clips"] == 1
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_verify_goes_to_the_shards_tool(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 1
    assert "meta.json: missing" in capsys.readouterr().out


def test_a_value_the_config_refuses_is_one_line(tmp_path, capsys):
    assert main(["features", "--videos", str(tmp_path), "--fps", "-1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: fps and window_seconds must be positive numbers (got -1.0, 10.24)"


def test_eval_paper_protocol_flags_reach_the_config(tmp_path, capsys):
    assert main(["eval", "--preset", "paper", "--dry-run"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert (paper["sampler"], paper["steps"], paper["guidance"], paper["max_clips"]) == ("ddpm", 300, 3.0, 1000)
    ids = tmp_path / "clip_ids.txt"
    assert main(["eval", "--preset", "paper", "--dry-run", "--clip-ids", str(ids), "--selection-seed", "4",
                 "--model-weights", "raw", "--weights", str(tmp_path / "w")]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert (chosen["clip_ids"], chosen["selection_seed"], chosen["model_weights"]) == (str(ids), 4, "raw")
    assert chosen["weights"] == str(tmp_path / "w")  # --weights stays the stage-one weights folder
    assert main(["eval", "--max-clips", "-1", "--dry-run"]) == 2
    assert "max_clips" in capsys.readouterr().err


def test_ctrl_c_in_training_or_evaluation_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C ended training and evaluation with a KeyboardInterrupt traceback of about 30 lines; now one line
    saying how to go on, and the shell's exit code for an interrupt."""
    import eval.evaluate
    import train.trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.trainer, "train", interrupted)
    monkeypatch.setattr(eval.evaluate, "evaluate", interrupted)
    assert main(["train", "--output", str(tmp_path / "run")]) == 130
    # before its first checkpoint: it said 'resume from the last checkpoint in run/checkpoints', where there was none
    assert capsys.readouterr().err.strip() == ("interrupted: run the same command again to start again (no "
                                               "checkpoint was written yet)")
    saved = tmp_path / "run" / "checkpoints" / "step_00000004"
    saved.mkdir(parents=True)
    (saved / "complete").touch()
    assert main(["train", "--output", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: run the same command again to resume from {saved}"
    assert main(["eval", "--output", str(tmp_path / "ev")]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: run the same command again to go on ({tmp_path / 'ev'})"


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    """`python -m eval --output FILE` and `python -m eval table ... --out FOLDER` ended in tracebacks."""
    from eval.__main__ import main as eval_main

    taken = tmp_path / "taken"
    taken.write_text("notes")
    assert main(["eval", "--output", str(taken), "--run", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {taken}: exists and is not a folder; give --output a folder"
    assert taken.read_text() == "notes"
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text('{"fd": 1.0}')
    assert eval_main(["table", str(tmp_path / "ev"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}: cannot write the table (") and "\n" not in err


def test_stage_one_refuses_bad_values_and_outputs_in_one_line(tmp_path, capsys, monkeypatch):
    """Each was a traceback (or, for --limit -1, all clips but the last processed without a word): a bad --device,
    an --out that is a file, a negative --limit, values that failed later (NaN fps, a negative worker count),
    and Ctrl-C."""
    import preprocess.pipeline
    from tests import media

    videos = tmp_path / "videos"
    media.make_video(videos / "a.mp4", seconds=1.0, audio="tone")
    taken = tmp_path / "taken"
    taken.write_text("notes")
    common = ["features", "--videos", str(videos), "--no-progress"]
    cases = [
        (["--out", str(tmp_path / "o1"), "--device", "bogus"], "error: --device 'bogus': Expected one of"),
        (["--out", str(taken)], f"error: {taken}: exists and is not a folder; give --out a folder"),
        (["--out", str(taken / "sub")], f"error: {taken / 'sub'}: cannot be made (Not a directory)"),
        (["--out", str(tmp_path / "o2"), "--limit", "-1"], "error: --limit must be 0 or more (got -1)"),
        (["--out", str(tmp_path / "o3"), "--fps", "nan"], "error: fps and window_seconds must be positive numbers"),
        (["--out", str(tmp_path / "o4"), "--num-workers", "-1"], "error: num_workers must be 0"),
        (["--out", str(tmp_path / "o5"), "--max-memory-gib", "nan"],
         "error: max_memory_gib must be 0 (no cap) or a positive number, got nan"),
    ]
    for extra, start in cases:
        assert main([*common, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and "\n" not in err, err
    assert taken.read_text() == "notes"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess.pipeline, "run", interrupted)
    assert main([*common, "--out", str(tmp_path / "o5")]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: run the same command again to go on ({tmp_path / 'o5'})"
    assert main(["eval", "--device", "bogus", "--output", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --device 'bogus': Expected one of")


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, capsys, monkeypatch):
    """`--out ''` is Path('') = '.': stage one wrote meta.json and its shards into the current folder, vta-sam generate
    its video and WAV."""
    import pytest

    monkeypatch.chdir(tmp_path)
    for argv in (["features", "--out", ""], ["generate", "v.mp4", "--out", ""], ["eval", "table", "", "--out", "x"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "an empty path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_python_m_vta_sam_generate_runs_the_command():
    """It imported the module and exited 0, doing nothing (the README lists it among the runnable modules)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "vta_sam.generate", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--steps" in result.stdout, result.stderr


def test_python_m_works_from_a_folder_holding_folders_named_like_its_packages(tmp_path):
    """`python -m train` puts the current folder first on the import path: run from a folder holding `shards/` (stage
    one's output), `train/` or `eval/` (data or results), those folders, as namespace packages, took the place of the
    project's packages under the editable install's import hook ("cannot import name 'ShardSpec' from 'shards'",
    "'train' is a package and cannot be directly executed"). `make setup` installs the checkout as a path entry."""
    import subprocess
    import sys

    packages = ("shards", "train", "eval", "common", "preprocess", "audio_models", "vta_sam")
    for name in packages:
        (tmp_path / name).mkdir()
    found = subprocess.run([sys.executable, "-c", f"import {', '.join(packages)}; print([{', '.join(packages)}])"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert found.returncode == 0 and "namespace" not in found.stdout.lower(), found.stdout + found.stderr[-300:]
    result = subprocess.run([sys.executable, "-m", "vta_sam", "generate", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "--steps" in result.stdout, result.stderr[-300:]


def test_a_folder_or_file_it_may_not_use_is_one_line_in_every_stage(tmp_path, capsys, monkeypatch):
    """A read-only run folder (PermissionError from the lock), an unreadable manifest, a file where the embedding
    cache's folder goes: each was a traceback and exit 1."""
    import errno

    import preprocess.manifest
    import train.trainer

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(train.trainer, "folder_lock", denied)
    from tests.test_train_support import write_shards

    write_shards(tmp_path / "shards", num_shards=1, per_shard=8)
    assert main(["train", "--shards", str(tmp_path / "shards"), "--output", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {tmp_path / 'run'}: Permission denied"
    csv = tmp_path / "m.csv"
    csv.write_text("a,0,dog,train\n")
    monkeypatch.setattr(preprocess.manifest, "_read_text", denied)
    assert main(["features", "--csv", str(csv), "--videos", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {csv}: Permission denied"


def test_a_folder_given_as_a_file_and_a_missing_folder_are_said_as_such(tmp_path, capsys):
    """A folder given as the CSV or the captions file was 'not found'; so was a missing shards folder's meta.json."""
    (tmp_path / "videos").mkdir()
    assert main(["features", "--csv", str(tmp_path / "videos"), "--videos", str(tmp_path / "videos")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'videos'}: a folder, not a CSV file"
    assert main(["features", "--videos", str(tmp_path / "videos"), "--captions", str(tmp_path / "videos")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'videos'}: a folder, not a captions file"
    assert main(["verify", str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere'}: folder not found" in capsys.readouterr().out


def test_a_bad_flag_value_is_two_lines_not_a_page_of_usage(capsys):
    """argparse printed every flag of the stage (33-40 lines) above its one error line."""
    import pytest

    for argv in (["features", "--fps", "abc"], ["train", "--batch-size", "x"], ["eval", "--steps", "x"]):
        with pytest.raises(SystemExit):
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and err[0].endswith("[options] (--help lists them)") and "error: argument" in err[1], err


def test_help_shows_the_values_of_the_preset_given(capsys):
    """`--preset paper --help` showed the tiny preset's values ("(tiny preset: 0.001)" for the paper's 3e-05)."""
    import pytest

    from preprocess.config import PRESETS as FEATURES
    from train.config import PRESETS as TRAINING

    for args, flag, preset in ((["train", "--preset", "paper"], "learning-rate", TRAINING["paper"].learning_rate),
                               (["train"], "learning-rate", TRAINING["tiny"].learning_rate),
                               (["features", "--preset=paper"], "fps", FEATURES["paper"].fps)):
        with pytest.raises(SystemExit):
            main([*args, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        name = "paper" if "paper" in " ".join(args) else "tiny"
        shown = text.split(f"--{flag} ", 1)[1][:300]  # the flag's help
        assert f"({name} preset: {preset!r})" in shown, shown


def test_ctrl_c_while_a_command_loads_is_one_line(capsys, monkeypatch):
    """Ctrl-C in the seconds a command spends importing torch and transformers, before its own handling, ended in a
    KeyboardInterrupt traceback and exit 1; now one line and the shell's exit code for an interrupt."""
    import importlib

    def loading(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", loading)
    assert main(["features", "--help"]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"


def test_sigterm_to_evaluation_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM ended evaluation at once and silently (exit 143), where stage one, training and generate
    each say how to go on; it now stops as Ctrl-C does (the file being written dropped), with that line, and the
    signal's exit code. The handler that was there before is put back."""
    import os
    import signal

    import eval.evaluate

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped evaluation")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(eval.evaluate, "evaluate", signalled)
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--output", str(tmp_path / "ev")])
    assert stop.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == f"terminated (SIGTERM): run the same command again to go on ({tmp_path / 'ev'})"
    assert signal.getsignal(signal.SIGTERM) is before


def test_version_is_the_installed_distributions(capsys):
    from importlib import metadata

    from common.versions import software_versions

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"vta-sam {metadata.version('vta-sam')}\n"
    assert software_versions()["vta-sam"] == metadata.version("vta-sam")  # recorded in meta.json and results.json
