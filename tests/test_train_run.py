"""`python -m train` end to end in one process: dry run, resume, exported weights, bad input, NaN guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import shards
from tests.test_train_support import SPEC, one_thread, write_meta, write_shards, write_uneven_shards  # noqa: F401
from train import load_model, trainer
from train.__main__ import main

# the small model of test_train_support.small_config, as flags
SMALL = ["--block-channels", "16", "32", "--attention-heads", "2", "2", "--cross-attention-dim", "32",
         "--batch-size", "2", "--shuffle-buffer", "4", "--log-every", "1"]


def run(shard_dir: Path, out: Path, *extra: str) -> int:
    return main(["--shards", str(shard_dir), "--output", str(out), *SMALL, *extra])


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["--preset", "paper", "--dry-run", "--learning-rate", "1e-4", "--inputs", "V+O+T"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["block_channels"] == [320, 640, 1280, 1280] and printed["cross_attention_dim"] == 1024
    assert printed["learning_rate"] == 1e-4 and printed["inputs"] == "V+O+T" and printed["upcast_attention"]
    assert (printed["snr_weighting"], printed["min_snr_gamma"], printed["lr_schedule"]) == ("vta-ldm", 5.0, "linear")
    assert main(["--dry-run", "--snr-weighting", "min-snr-v", "--min-snr-gamma", "2", "--lr-schedule", "cosine"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["snr_weighting"], printed["min_snr_gamma"], printed["lr_schedule"]) == ("min-snr-v", 2.0, "cosine")
    assert main(["--dry-run", "--snr-weighting", "vta-ldm"]) == 2  # the tiny preset's gamma is 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: min_snr_gamma must be > 0") and len(err.splitlines()) == 1, err


def _state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Model weights, optimizer moments, EMA and generator states of a resume state, flattened to name -> tensor."""
    out = {f"model.{k}": v for k, v in safetensors.torch.load_file(str(checkpoint / "model.safetensors")).items()}
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    for index, state in optimizer["state"].items():
        for name, value in state.items():
            out[f"optim.{index}.{name}"] = torch.as_tensor(value)
    ema = safetensors.torch.load_file(str(checkpoint / "ema.safetensors"))
    out.update({f"ema.{k}": v for k, v in ema.items()})
    rng = safetensors.torch.load_file(str(checkpoint / "rng_rank0.safetensors"))
    out.update({f"rng.{k}": v for k, v in rng.items()})
    return {name: value.clone() for name, value in out.items()}  # not views of the files (a test may rewrite them)


def test_resume_continues_exactly_where_it_stopped(tmp_path, capsys):
    data = tmp_path / "shards"
    write_shards(data, num_shards=2, per_shard=5, splits=("train", "train", "train", "train", "test"))
    # uninterrupted: 4 steps; interrupted: 2 steps, then the same command with --max-steps 4
    assert run(data, tmp_path / "a", "--max-steps", "4", "--checkpoint-every", "2") == 0
    assert run(data, tmp_path / "b", "--max-steps", "2", "--checkpoint-every", "2") == 0
    assert (tmp_path / "b/checkpoints/step_00000002/complete").exists()
    assert run(data, tmp_path / "b", "--max-steps", "4", "--checkpoint-every", "2") == 0
    progress = json.loads((tmp_path / "b/checkpoints/step_00000004/progress.json").read_text())
    assert progress["step"] == 4 and progress["samples"] == 8
    a, b = _state(tmp_path / "a/checkpoints/step_00000004"), _state(tmp_path / "b/checkpoints/step_00000004")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # TensorBoard shows every step once: the resumed run's purge marker drops only the killed run's steps after its
    # checkpoint (it dropped the checkpoint's step 2 too)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "b/logs"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]
    # the step-2 state differs from step 4 (the comparison above is not vacuous)
    early = _state(tmp_path / "b/checkpoints/step_00000002")
    assert any(not torch.equal(early[k], b[k]) for k in b if k.startswith("model."))

    # the exported EMA weights are what load_model returns, the raw weights what it returns for weights="raw"
    model, config = load_model(tmp_path / "b")
    raw, _ = load_model(tmp_path / "b", weights="raw")
    assert config.max_steps == 4 and model.spec == SPEC
    for name, value in model.state_dict().items():
        assert torch.equal(value, b[f"ema.{name}"]), name
        assert torch.equal(raw.state_dict()[name], b[f"model.{name}"]), name
    assert any(not torch.equal(value, raw.state_dict()[name]) for name, value in model.state_dict().items())
    assert trainer.exported_step(tmp_path / "b/model/ema.safetensors") == 4 and "cut short" not in capsys.readouterr().err
    # an export cut short between its two files: the EMA of step 4 beside raw weights of step 2, said on loading
    trainer.save_weights(raw, tmp_path / "b/model/raw.safetensors", step=2)
    load_model(tmp_path / "b")
    assert capsys.readouterr().err == (f"warning: {tmp_path / 'b/model/ema.safetensors'} holds the weights of step 4, "
                                       "raw.safetensors beside it those of step 2 (an export was cut short); run the "
                                       "training command again to export both\n")
    (tmp_path / "b/model/raw.safetensors").unlink()  # a run exported before raw weights were
    with pytest.raises(FileNotFoundError, match="raw.safetensors: missing .*train or resume it once more"):
        load_model(tmp_path / "b", weights="raw")


def test_a_decaying_learning_rate_resumes_exactly_and_fixes_the_run_length(tmp_path, capsys):
    """--lr-schedule linear: the rate reaches 0 at the last step; a run resumed from its middle checkpoint ends where
    the uninterrupted one did; changing its length is refused."""
    data, out = tmp_path / "shards", tmp_path / "run"
    write_shards(data, num_shards=1, per_shard=8)
    flags = ["--max-steps", "4", "--checkpoint-every", "2", "--lr-schedule", "linear"]
    assert run(data, out, *flags) == 0
    lr = {s: torch.load(out / f"checkpoints/step_0000000{s}/scheduler.bin", weights_only=True)["_last_lr"][0] for s in (2, 4)}
    assert lr[2] == pytest.approx(1e-3 * 2 / 4, rel=1e-12) and lr[4] == 0.0  # (T - s) / T of the tiny rate 1e-3
    uninterrupted = _state(out / "checkpoints/step_00000004")
    shutil.rmtree(out / "checkpoints/step_00000004")  # as if the run had stopped after step 2
    assert run(data, out, *flags) == 0
    resumed = _state(out / "checkpoints/step_00000004")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    capsys.readouterr()
    assert run(data, out, "--max-steps", "6", *flags[2:]) == 2
    err = capsys.readouterr().err.strip()
    assert "other max_steps (max_steps 4 there vs 6 now) (its learning rate decays to 0 at its last step" in err
    assert len(err.splitlines()) == 1


def test_a_run_saved_before_snr_weighting_and_lr_schedule_resumes(tmp_path):
    """config.json without the newer fields means what the run trained with (no weighting, constant rate)."""
    data, out = tmp_path / "shards", tmp_path / "run"
    write_shards(data, num_shards=1, per_shard=4)
    assert run(data, out, "--max-steps", "1") == 0
    saved = json.loads((out / "config.json").read_text())
    for name in ("snr_weighting", "lr_schedule"):
        del saved[name]
    (out / "config.json").write_text(json.dumps(saved))
    assert run(data, out, "--max-steps", "2") == 0
    assert (out / "checkpoints/step_00000002/complete").exists()
    rewritten = json.loads((out / "config.json").read_text())
    assert (rewritten["snr_weighting"], rewritten["lr_schedule"]) == ("none", "constant")


def test_only_the_configured_split_is_read(tmp_path):
    data = tmp_path / "shards"
    write_shards(data, num_shards=1, per_shard=6, splits=("train", "test", "test"))
    assert run(data, tmp_path / "run", "--max-steps", "2", "--record-ranks") == 0
    seen = {line.split()[2] for line in (tmp_path / "run/ranks/ids_rank0.txt").read_text().splitlines()}
    assert seen == {"clip0_0", "clip0_3"}  # every third sample is train


@pytest.mark.parametrize("problem", ["missing", "empty", "schema", "preset", "config_change", "vae_scaling"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, problem):
    data = tmp_path / "shards"
    extra: list[str] = []
    if problem == "empty":
        write_meta(data, SPEC)
    elif problem == "schema":
        write_shards(data, num_shards=1)
        meta = json.loads((data / shards.META_FILE).read_text())
        meta["spec"]["schema_version"] = meta["schema_version"] = shards.SCHEMA_VERSION + 1
        (data / shards.META_FILE).write_text(json.dumps(meta))
    elif problem == "preset":
        write_shards(data, num_shards=1)
    elif problem == "vae_scaling":  # shards encoded by a trained VAE whose factor is not the run's (tiny: 5.0)
        write_shards(data, num_shards=1)
        meta = json.loads((data / shards.META_FILE).read_text())
        meta.update(config={"random_init": False}, models={"vae": {"scaling_factor": 0.9227914214134216}})
        (data / shards.META_FILE).write_text(json.dumps(meta))
    elif problem == "config_change":
        write_shards(data, num_shards=1)
        assert run(data, tmp_path / "run", "--max-steps", "1") == 0
        capsys.readouterr()
        extra = ["--learning-rate", "0.5"]
    if problem == "preset":  # the paper preset's own model (the small-model flags are for 2 resolutions)
        code = main(["--preset", "paper", "--shards", str(data), "--output", str(tmp_path / "run")])
    else:
        code = run(data, tmp_path / "run", "--max-steps", "1", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    expected = {"missing": "does not exist", "empty": "no complete shard", "schema": "schema version",
                "preset": "embed_dim", "config_change": "learning_rate",
                "vae_scaling": "meta.json: the shards were encoded by a trained VAE with scaling_factor 0.9227914214134216, "
                               "the run scales latents by vae_scaling_factor 5.0 (pass --vae-scaling-factor"}[problem]
    assert expected in err
    if problem != "config_change":
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_losses_skip_steps_then_stop(tmp_path, capsys, monkeypatch):
    data = tmp_path / "shards"
    write_shards(data, num_shards=1, per_shard=8)
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", "--checkpoint-every", "2", "--max-bad-steps", "3") == 0
    before = safetensors.torch.load_file(str(out / "checkpoints/step_00000002/model.safetensors"))
    # every loss is now NaN (the shard readers refuse non-finite latents, so the data cannot be the cause)
    finite_loss = trainer.training_loss
    monkeypatch.setattr(trainer, "training_loss", lambda *args, **kwargs: finite_loss(*args, **kwargs) * float("nan"))
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", "--checkpoint-every", "2", "--max-bad-steps", "3") == 1
    assert "3 non-finite losses in a row" in capsys.readouterr().out
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_00000002"]
    after = safetensors.torch.load_file(str(out / "checkpoints/step_00000002/model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("flags", "message"), [
    (["--log-every", "0"], "log_every must be at least 1, got 0"),
    (["--train-timesteps", "0"], "train_timesteps must be at least 1, got 0"),
    (["--num-workers", "-1"], "num_workers and max_steps must be >= 0, got -1 and 300"),
    (["--max-steps", "-1"], "num_workers and max_steps must be >= 0, got 0 and -1"),
    (["--norm-groups", "0"], "norm_groups must be at least 1, got 0"),
    (["--block-channels", "0", "0"], "block_channels must be positive multiples of norm_groups (8), got [0, 0]"),
    (["--adam-betas", "0.9"], "adam_betas must be two numbers in [0, 1), got [0.9]"),
    (["--learning-rate", "nan"], "learning_rate must be a finite number > 0, got nan"),
    (["--vae-scaling-factor", "0"], "vae_scaling_factor must be a finite number > 0, got 0.0"),
    (["--beta-start", "nan"], "beta_start must be a finite number > 0, got nan"),
    (["--grad-clip", "nan"], "grad_clip must be a finite number > 0, got nan"),
    (["--ema-decay", "2"], "ema_decay must be in [0, 1], got 2.0"),
])
def test_values_that_failed_deep_inside_a_run_are_refused_at_once(flags, message, capsys):
    """Each passed --dry-run and then failed after the first step (ZeroDivisionError, torch's ValueError, 20 steps
    of NaN losses) or trained something meaningless (latents scaled to 0, an untrained model exported)."""
    assert main(["--dry-run", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}", err


def test_exported_weights_are_readable_by_others_as_the_umask_allows(tmp_path):
    """safetensors writes its files 0600: another user of a shared group or a container's uid could not load the
    model ('unreadable (FileNotFoundError ...)', safetensors' word for a permission denied)."""
    import os
    import stat

    from common.weights import safetensors_header
    from tests.test_train_support import write_shards

    write_shards(tmp_path / "shards", num_shards=1, per_shard=8)
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            assert run(tmp_path / "shards", tmp_path / f"run{umask}", "--max-steps", "1") == 0
        finally:
            os.umask(old)
        for name in ("ema.safetensors", "raw.safetensors", "config.json"):
            assert stat.S_IMODE((tmp_path / f"run{umask}" / "model" / name).stat().st_mode) == mode, (umask, name)
    denied = tmp_path / "denied.safetensors"
    denied.mkdir()  # opening it fails otherwise than 'not found'
    with pytest.raises(IsADirectoryError):
        safetensors_header(denied)


def test_a_half_written_checkpoint_of_a_killed_run_is_removed(tmp_path, capsys):
    """SIGKILL while checkpoints/step_N.tmp was written (a scheduler's kill after its grace period) left the folder,
    a resume state's size, for good: no step folder, so never loaded or pruned. Resuming removes it."""
    data = tmp_path / "shards"
    write_shards(data, num_shards=2, per_shard=5, splits=("train", "train", "train", "train", "test"))
    out = tmp_path / "run"
    assert run(data, out, "--max-steps", "2", "--checkpoint-every", "2") == 0
    half = out / "checkpoints" / "step_00000003.tmp"
    half.mkdir()
    (half / "optimizer.bin").write_bytes(b"\0" * 1000)
    capsys.readouterr()
    assert run(data, out, "--max-steps", "4", "--checkpoint-every", "2") == 0
    assert not half.exists() and "removed 1 checkpoint folder(s) an interrupted run left half written " \
        "(step_00000003.tmp)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_with_workers_a_run_resumed_at_any_step_sees_the_batches_of_an_uninterrupted_one(tmp_path):
    """The DataLoader takes batches from its workers in turn starting with worker 0: a run stopped after an odd
    number of batches with two workers resumed with the streams' batches on other steps (weights off by 6e-4).
    A resumed loader now starts with the stream the uninterrupted run would have asked next."""
    data = tmp_path / "shards"
    write_shards(data, num_shards=3, per_shard=4)
    flags = ["--num-workers", "2", "--checkpoint-every", "7"]
    assert run(data, tmp_path / "a", "--max-steps", "12", *flags) == 0
    assert run(data, tmp_path / "b", "--max-steps", "7", *flags) == 0
    assert run(data, tmp_path / "b", "--max-steps", "12", *flags) == 0
    a, b = _state(tmp_path / "a/checkpoints/step_00000012"), _state(tmp_path / "b/checkpoints/step_00000012")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_an_epochs_streams_read_the_split_and_half_a_shard_each_beyond(tmp_path):
    """A data stream opens only the shards its range touches, reading the one it starts in from that shard's start
    (`benchmarks.data_streams` measures the cost): ranges on shard boundaries read each byte of the split once, and
    ranges inside shards read at most one shard more per stream."""
    from benchmarks.data_streams import one_epoch
    from benchmarks.random_shards import write_random_shards
    from preprocess.config import PRESETS as FEATURE_PRESETS
    from train.data import split_index

    folder = write_random_shards(tmp_path / "s", FEATURE_PRESETS["tiny"], {"train": 48}, per_shard=8)
    paths = shards.split_shards(folder, "train")
    index = split_index(paths, "train", folder)
    split_bytes = sum(path.stat().st_size for path in paths)
    one_epoch(folder, index, 1, 4)  # lazy imports and caches out of the way
    read, decoded, _ = one_epoch(folder, index, 3, 4)  # ranges of 16: on shard boundaries
    assert decoded == 48 and split_bytes <= read < 1.02 * split_bytes
    read, decoded, _ = one_epoch(folder, index, 5, 4)  # ranges of 9.6 samples: 4 of 5 start inside a shard
    assert decoded == 40 and 1.1 * split_bytes < read < split_bytes + 5 * max(p.stat().st_size for p in paths)


def test_every_sample_is_read_once_per_epoch_whatever_the_shard_sizes(tmp_path):
    """Streams that each took whole shards ran through epochs at their own pace when shards differed in size (a
    shard smaller than a batch, one holding only another split, counts not divisible by the streams): some clips
    were trained three times as often as others in two epochs, a stream could stop for good, and a rank could run
    out of data mid-run. Each of the 2 ranks x 2 workers streams now reads one range of the epoch's samples."""
    from train.config import TrainConfig
    from train.data import ShardStream, split_index

    data = tmp_path / "shards"
    ids = write_uneven_shards(data)
    paths = shards.list_shards(data)
    index = split_index(paths, "train", data)
    assert sum(count for _, count in index) == len(ids) == 19
    config = TrainConfig(shards=str(data), batch_size=2, shuffle_buffer=4, num_workers=2)
    for epoch in range(3):
        seen: list[list[str]] = []
        for rank in range(2):
            stream = ShardStream(paths, config, rank=rank, world=2, index=index)
            assert stream.batches_per_epoch() == 2  # 19 // (4 streams x batch 2)
            for number in range(2):
                seen.append([example["id"] for example in stream.epoch_samples(epoch, number, 0)])
        assert [len(found) for found in seen] == [4, 4, 4, 4]  # the same number of batches from every stream
        every = [clip for found in seen for clip in found]
        assert len(set(every)) == len(every) == 16 and set(every) <= set(ids)  # once each; 3 left out this epoch
