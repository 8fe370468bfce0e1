"""Generation for evaluation on a tiny trained run: one WAV per test clip, its length and level, determinism that
does not depend on batch composition (one batched sampling call), resume that skips existing WAVs, the manifest
that refuses to mix settings (EMA and raw weights included), the timesteps results.json states, the evaluated
set (seeded max_clips sample, clip-id lists, clip_ids.txt), and the CLI's presets."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

import eval.generate as eval_generate
import shards
from common.weights import sha256_file
from eval.__main__ import main as eval_main
from eval.clips import (
    CLIP_IDS_FILE,
    EvalError,
    evaluation_clips,
    iterate_reference_audio,
    iterate_split_samples,
    read_split,
    select_clips,
    wav_path,
)
from eval.config import PRESETS, EvalConfig
from eval.evaluate import evaluate
from eval.generate import MANIFEST_FILE, generate, generation_protocol, manifest_notes, sampler_schedule
from preprocess.config import PRESETS as FEATURE_PRESETS
from tests.conftest import make_sample
from tests.test_av_align import write_jumping_square
from tests.test_train_support import one_thread  # noqa: F401  (autouse: single-threaded torch)
from train.__main__ import main as train_main
from train.config import TrainConfig

FEATURES = FEATURE_PRESETS["tiny"]
# the tiny stage-one spec with a 4x shorter latent time axis (as the stage-two tests): 2.56 s of decoded audio
SPEC = dataclasses.replace(FEATURES.shard_spec(), latent_time=64)
CLIP_SECONDS = 2.0  # json 'duration' of every test clip: shorter than the decoded audio, so WAVs are cut to it
TEST_IDS = ("t0", "t1", "t2", "t3")
VIDEO_IDS = ("t2", "t3")  # test clips whose source video exists (AV-Align); t0 and t1 point nowhere
SMALL = ["--block-channels", "16", "32", "--attention-heads", "2", "2", "--cross-attention-dim", "32",
         "--batch-size", "2", "--shuffle-buffer", "4"]


def make_run(root: Path) -> tuple[Path, Path]:
    """Shards (4 train + 4 test clips, meta.json with the stage-one config) and a run trained for one step."""
    data = root / "shards"
    data.mkdir(parents=True)
    meta = {"schema_version": shards.SCHEMA_VERSION, "spec": SPEC.to_dict(), "config": dataclasses.asdict(FEATURES)}
    (data / shards.META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    videos = root / "videos"
    videos.mkdir()
    for split, ids in (("train", ("a0", "a1", "a2", "a3")), ("test", TEST_IDS)):
        writer = shards.ShardWriter(data, split, 0, 8)
        for seed, clip_id in enumerate(ids):
            sample_meta, arrays, waveform = make_sample(spec=SPEC, clip_id=clip_id, seed=seed, split=split)
            sample_meta.update(duration=CLIP_SECONDS, start=0.5, source=str(videos / f"{clip_id}.avi"))
            if clip_id in VIDEO_IDS:  # 2.5 s at 25 fps: the window [0.5, 2.5) holds frames 13..62
                write_jumping_square(videos / f"{clip_id}.avi", fps=25, frames=63, jumps={20, 40})
            writer.write(shards.encode_sample(SPEC, sample_meta, arrays, waveform))
        writer.close()
    run = root / "run"
    assert train_main(["--shards", str(data), "--output", str(run), *SMALL, "--max-steps", "1"]) == 0
    return data, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_run(tmp_path_factory.mktemp("eval_run"))
    finally:
        torch.set_num_threads(threads)


def config_for(tiny_run: tuple[Path, Path], out: Path, **changes: object) -> EvalConfig:
    data, run = tiny_run
    settings: dict[str, object] = dict(run=str(run), shards=str(data), output=str(out), steps=2, batch_size=2,
                                       cache_dir=str(out.parent / "cache"))
    return PRESETS["demo"].replace(**{**settings, **changes})


def wavs(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: soundfile.read(p, dtype="int16")[0] for p in sorted((folder / "wav").glob("*.wav"))}


def test_generation_writes_one_wav_per_test_clip(tiny_run, tmp_path):
    config = config_for(tiny_run, tmp_path / "a")
    clips = select_clips(read_split(config.shards, "test"), 0)
    assert [c.id for c in clips] == list(TEST_IDS)  # train clips are not evaluated
    assert config.peak == 0  # the demo keeps the vocoder's level
    info = generate(config, clips, progress=False)
    assert info["written"] == len(TEST_IDS)
    written = sorted((tmp_path / "a" / "wav").iterdir())
    # and no temporary file is left
    assert [p.name for p in written] == sorted([f"{i}.wav" for i in TEST_IDS] + [MANIFEST_FILE])
    for path in written[1:]:
        info = soundfile.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == round(CLIP_SECONDS * 16000)  # cut to the clip's length
        audio = soundfile.read(path, dtype="int16")[0]
        assert np.abs(audio.astype(int)).max() >= 328  # the tiny vocoder's own level: above 1% of full scale
    manifest = json.loads((tmp_path / "a" / "wav" / MANIFEST_FILE).read_text())
    assert (manifest["steps"], manifest["sampler"], manifest["peak"], manifest["sample_rate"]) == (2, "ddim", 0.0, 16000)
    assert manifest["precision"] == "fp32"  # 'auto' on the CPU
    assert len(manifest["checkpoint_sha256"]) == 64 and len(manifest["shards_config_sha256"]) == 64


def test_peak_scales_each_wav(tiny_run, tmp_path):
    config = config_for(tiny_run, tmp_path / "a", peak=0.5)
    generate(config, select_clips(read_split(config.shards, "test"), 2), progress=False)
    for audio in wavs(tmp_path / "a").values():
        assert abs(np.abs(audio.astype(int)).max() - 0.5 * 32767) <= 2


def test_same_seed_same_audio_whatever_the_batch(tiny_run, tmp_path, monkeypatch):
    clips = select_clips(read_split(tiny_run[0], "test"), 0)
    batches: list[int] = []
    sample = eval_generate.train.sample

    def counting(model, conditions, **kwargs):
        batches.append(len(kwargs["generator"]))  # one generator per clip of the batch
        return sample(model, conditions, **kwargs)

    monkeypatch.setattr(eval_generate.train, "sample", counting)
    generate(config_for(tiny_run, tmp_path / "batched", batch_size=3), clips, progress=False)
    assert batches == [3, 1]  # one sampling call per batch, not one per clip
    monkeypatch.undo()
    # one clip per batch and in another order: each clip's noise is seeded by (seed, id) alone
    generate(config_for(tiny_run, tmp_path / "single", batch_size=1), clips[::-1], progress=False)
    generate(config_for(tiny_run, tmp_path / "other", seed=1), clips, progress=False)
    batched, single, other = wavs(tmp_path / "batched"), wavs(tmp_path / "single"), wavs(tmp_path / "other")
    assert batched.keys() == single.keys() == set(TEST_IDS)
    for clip_id in TEST_IDS:
        assert np.abs(batched[clip_id].astype(int) - single[clip_id]).max() <= 1  # up to one 16-bit step
        assert not np.array_equal(batched[clip_id], other[clip_id])  # another seed, other audio
    assert not np.array_equal(batched["t0"], batched["t1"])  # clips differ from each other


def test_padding_the_last_batch_changes_no_clip(tiny_run):
    """--compile pads the last batch to batch_size (static shapes): the real rows get what they get unpadded."""
    import torch

    config = config_for(tiny_run, Path("unused"), steps=2)
    model, train_config = eval_generate.load_run(config.run, torch.device("cpu"))
    samples = list(eval_generate.iterate_split_samples(config.shards, "test", ["t0", "t1"]))
    rows = [shards.sample_conditions(s, train_config.object_threshold) for s in samples]
    conditions = shards.stack_conditions(rows, torch.device("cpu"))

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(eval_generate.clip_seed(0, s[shards.META_KEY]["id"])) for s in samples]

    plain = eval_generate.sample_batch(model, conditions, generators(), config)
    padded = eval_generate.sample_batch(model, conditions, generators(), config, pad_to=4)
    assert padded.shape == plain.shape == (2, *plain.shape[1:])
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)  # batch-size-dependent float32 rounding only
    other = eval_generate.sample_batch(model, conditions, list(reversed(generators())), config, pad_to=4)
    assert not torch.allclose(other, plain)  # the rows' own noise decides (the test can fail)


def test_resume_skips_existing_wavs(tiny_run, tmp_path):
    config = config_for(tiny_run, tmp_path / "a")
    clips = select_clips(read_split(config.shards, "test"), 0)
    generate(config, clips, progress=False)
    first = wavs(tmp_path / "a")
    kept = wav_path(tmp_path / "a", "t1")
    marker = kept.read_bytes()[:44] + b"\0" * 100  # a valid header on other samples: a regeneration would undo it
    kept.write_bytes(marker)
    wav_path(tmp_path / "a", "t2").unlink()
    (tmp_path / "a" / "wav" / "t3.wav.tmp").write_bytes(b"half a file")  # left by a killed run
    generate(config, clips, progress=False)
    assert kept.read_bytes() == marker
    again = wavs(tmp_path / "a")
    assert np.abs(again["t2"].astype(int) - first["t2"]).max() <= 1  # the same audio (alone in its batch now)
    assert not (tmp_path / "a" / "wav" / "t3.wav.tmp").exists()


def test_manifest_refuses_to_mix_settings(tiny_run, tmp_path):
    config = config_for(tiny_run, tmp_path / "a")
    clips = select_clips(read_split(config.shards, "test"), 2)
    generate(config, clips, progress=False)
    manifest = tmp_path / "a" / "wav" / MANIFEST_FILE
    before = manifest.read_text()
    for change in ({"steps": 3}, {"guidance": 1.0}, {"seed": 1}, {"sampler": "ddpm"}, {"peak": 0.5}):
        with pytest.raises(EvalError, match=r"generated with other settings.*choose another --output or delete"):
            generate(config.replace(**change), clips, progress=False)
    assert manifest.read_text() == before and len(list((tmp_path / "a" / "wav").glob("*.wav"))) == 2
    # the same settings resume (and take more clips); a retrained model is refused
    generate(config, select_clips(read_split(config.shards, "test"), 0), progress=False)
    assert all(wav_path(tmp_path / "a", i).exists() for i in TEST_IDS)
    edited = json.loads(before)
    edited["checkpoint_sha256"] = "0" * 64
    manifest.write_text(json.dumps(edited))
    with pytest.raises(EvalError, match="checkpoint_sha256"):
        generate(config, clips, progress=False)
    # the vocoder is recorded (WAVs of two vocoders were mixed without a word); a manifest written before it was
    # recorded is taken as this run's, and then records it
    for key in ("vocoder", "decoder_configs"):
        edited = json.loads(before)
        edited[key] = "0" * 64
        manifest.write_text(json.dumps(edited))
        with pytest.raises(EvalError, match=key):
            generate(config, clips, progress=False)
    older = {k: v for k, v in json.loads(before).items() if k not in ("vocoder", "decoder_configs")}
    manifest.write_text(json.dumps(older))
    generate(config, clips, progress=False)
    assert json.loads(manifest.read_text()) == json.loads(before)
    assert json.loads(before)["vocoder"] == "random-init(seed=0)"
    edited = json.loads(before)
    edited["checkpoint_sha256"] = "0" * 64
    # WAVs with no manifest: unknown settings, refused; an emptied folder takes the new settings
    manifest.unlink()
    with pytest.raises(EvalError, match="no manifest.json"):
        generate(config, clips, progress=False)
    for path in (tmp_path / "a" / "wav").glob("*.wav"):
        path.unlink()
    manifest.write_text(json.dumps(edited))
    generate(config.replace(steps=3), clips, progress=False)
    assert json.loads(manifest.read_text())["steps"] == 3


def test_reference_audio_is_read_in_shard_order(tiny_run):
    data, _ = tiny_run
    found = dict(iterate_reference_audio(data, "test", ["t3", "t1"]))
    assert list(found) == ["t1", "t3"]  # shard order, whatever the order asked
    expected = {s["json"]["id"]: s["flac"] for s in iterate_split_samples(data, "test", ["t1", "t3"])}
    for clip_id, data_bytes in found.items():
        np.testing.assert_array_equal(soundfile.read(io.BytesIO(data_bytes), dtype="float32")[0], expected[clip_id])
    assert dict(iterate_reference_audio(data, "train", ["t1"])) == {}  # only the asked split


def metas(ids: list[str]) -> list[shards.SampleMeta]:
    return [shards.SampleMeta(id=i, caption="", label="", split="test", duration=1.0, valid_frames=1, nouns=(),
                              source="") for i in ids]


def smallest_of(ids: list[str] | tuple[str, ...], seed: int, n: int) -> list[str]:
    """The documented selection rule, written out independently: the n ids with the smallest
    sha256('<seed>/<id>'), in id order."""
    return sorted(sorted(ids, key=lambda i: hashlib.sha256(f"{seed}/{i}".encode()).hexdigest())[:n])


def test_max_clips_takes_a_seeded_sample_in_id_order():
    ids = [f"clip{k:03d}" for k in range(200)]
    shuffled = random.Random(0).sample(ids, len(ids))
    chosen = [c.id for c in select_clips(metas(shuffled), 20, selection_seed=7)]
    assert chosen == smallest_of(ids, 7, 20)  # in id order, whatever the shards' order
    assert chosen != ids[:20]  # a sample of the split, not its first ids
    assert [c.id for c in select_clips(metas(ids), 20, selection_seed=8)] != chosen  # another seed, other clips
    # a clip's key is its own: the chosen clips stay chosen when the split holds one more, and N + 10 contains N
    assert set(chosen) <= {c.id for c in select_clips(metas([*shuffled, "zz"]), 21, 7)}
    assert set(chosen) <= {c.id for c in select_clips(metas(ids), 30, 7)}
    assert [c.id for c in select_clips(metas(shuffled), 0)] == ids == [c.id for c in select_clips(metas(ids), 500)]
    with pytest.raises(EvalError, match="'clip003' appears twice"):
        select_clips(metas([*ids, "clip003"]), 5)


def test_select_clips_reads_the_shards(tiny_run):
    clips = select_clips(read_split(tiny_run[0], "test"), 2)
    assert [c.id for c in clips] == smallest_of(TEST_IDS, 0, 2)
    assert clips[0].start == 0.5 and clips[0].duration == CLIP_SECONDS and clips[0].nouns == ("noun0", "noun1")


def test_a_clip_id_list_defines_the_set(tmp_path):
    split = metas(["b", "a", "c", "d"])
    config = EvalConfig(max_clips=1, clip_ids=str(tmp_path / "ids.txt"), shards="data/x")
    (tmp_path / "ids.txt").write_text("d\n\n  a \n", encoding="utf-8")
    assert [c.id for c in evaluation_clips(config, split)] == ["a", "d"]  # the list wins over max_clips; id order
    (tmp_path / "ids.txt").write_text("\ufeffd\r\na\r\n", encoding="utf-8")  # a Windows editor's BOM and CRLF
    assert [c.id for c in evaluation_clips(config, split)] == ["a", "d"]
    for text, message in (("a\nzz\nd\nyy\n", r"ids.txt: 2 of its 4 clip ids are not in split 'test' of data/x: 'zz', 'yy'$"),
                          ("a\nd\na\n", r"ids.txt: clip id 'a' is listed twice"),
                          ("\n \n", r"ids.txt: no clip id in it")):
        (tmp_path / "ids.txt").write_text(text, encoding="utf-8")
        with pytest.raises(EvalError, match=message) as refused:
            evaluation_clips(config, split)
        assert "\n" not in str(refused.value)  # one line
    (tmp_path / "ids.txt").write_text("\n".join(f"x{k}" for k in range(8)), encoding="utf-8")
    with pytest.raises(EvalError, match=r"8 of its 8 clip ids .*: 'x0', 'x1', 'x2', 'x3', 'x4', \.\.\.$"):
        evaluation_clips(config, split)
    with pytest.raises(EvalError, match="nowhere.txt: clip-id file missing"):
        evaluation_clips(config.replace(clip_ids=str(tmp_path / "nowhere.txt")), split)
    with pytest.raises(ValueError, match="model_weights must be one of"):
        EvalConfig(model_weights="best")  # type: ignore[arg-type]


def test_clip_ids_txt_lets_another_evaluation_take_the_same_clips(tiny_run, tmp_path):
    # two whole evaluations (generation, embeddings, scores) of two clips each, AV-Align off
    first = evaluate(config_for(tiny_run, tmp_path / "a", max_clips=2, selection_seed=3, figure_clips=0,
                                av_align=False), progress=False)
    listed = tmp_path / "a" / CLIP_IDS_FILE
    assert listed.read_text(encoding="utf-8").splitlines() == first["clips"] == smallest_of(TEST_IDS, 3, 2)
    assert first["protocol"]["clip_ids_sha256"] == hashlib.sha256(listed.read_bytes()).hexdigest()
    assert first["protocol"]["clip_selection"] == {"rule": "smallest sha256('<selection_seed>/<id>')",
                                                   "max_clips": 2, "selection_seed": 3}
    assert not list((tmp_path / "a").glob("*.tmp"))
    # another system (here: another seed) scored on exactly those clips, whatever max_clips says
    second = evaluate(config_for(tiny_run, tmp_path / "b", max_clips=3, seed=5, clip_ids=str(listed), figure_clips=0,
                                 av_align=False), progress=False)
    assert second["clips"] == first["clips"] and second["protocol"]["clip_selection"]["rule"] == "clip_ids"
    assert second["protocol"]["clip_ids_sha256"] == first["protocol"]["clip_ids_sha256"]
    assert (tmp_path / "b" / CLIP_IDS_FILE).read_bytes() == listed.read_bytes()
    assert sorted(p.stem for p in (tmp_path / "b" / "wav").glob("*.wav")) == first["clips"]


def test_raw_weights_are_loaded_checksummed_and_never_mixed_with_ema(tiny_run, tmp_path, monkeypatch):
    import safetensors.torch
    import torch

    data, trained = tiny_run
    run = tmp_path / "run"
    shutil.copytree(trained / "model", run / "model")
    ema = safetensors.torch.load_file(str(run / "model" / "ema.safetensors"))
    generator = torch.Generator().manual_seed(0)
    # raw weights far from the EMA, so that the audio tells which file generated it
    raw = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in ema.items()}
    safetensors.torch.save_file(raw, str(run / "model" / "raw.safetensors"))
    clips = select_clips(read_split(data, "test"), 0)[:2]
    asked: list[str] = []
    load_model = eval_generate.train.load_model

    def spying(*args, **kwargs):
        asked.append(kwargs.get("weights", "ema"))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(eval_generate.train, "load_model", spying)
    ema_config = config_for(tiny_run, tmp_path / "out", run=str(run))
    raw_config = ema_config.replace(model_weights="raw")
    generate(ema_config, clips, progress=False)
    generate(raw_config.replace(output=str(tmp_path / "raw")), clips, progress=False)
    assert asked == ["ema", "raw"]
    manifest = json.loads((tmp_path / "raw" / "wav" / MANIFEST_FILE).read_text())
    assert manifest["checkpoint_sha256"] == sha256_file(run / "model" / "raw.safetensors")  # the file loaded
    assert manifest["checkpoint_sha256"] != sha256_file(run / "model" / "ema.safetensors")
    ema_audio, raw_audio = wavs(tmp_path / "out"), wavs(tmp_path / "raw")
    assert any(not np.array_equal(ema_audio[i], raw_audio[i]) for i in ema_audio)
    # raw-weight WAVs are not added to the EMA folder (nor the reverse)
    with pytest.raises(EvalError, match="generated with other settings.*checkpoint_sha256"):
        generate(raw_config, clips, progress=False)
    with pytest.raises(EvalError, match="checkpoint_sha256"):
        generate(ema_config.replace(output=str(tmp_path / "raw")), clips, progress=False)
    # results.json names the weights file whose checksum the manifest holds, whatever --model-weights says now
    assert generation_protocol(raw_config.replace(output=str(tmp_path / "raw")), clips, manifest)["model_weights"] == "raw"
    assert generation_protocol(raw_config.replace(output=str(tmp_path / "raw")), clips, None)["model_weights"] is None
    assert generation_protocol(ema_config, clips, json.loads((tmp_path / "out" / "wav" / MANIFEST_FILE).read_text())
                               )["model_weights"] == "ema"
    assert "generated by checkpoint" in manifest_notes(ema_config, manifest)[0]
    assert manifest_notes(raw_config, manifest) == []
    (run / "model" / "raw.safetensors").unlink()
    with pytest.raises(EvalError, match=r"raw.safetensors: missing"):
        generate(raw_config.replace(output=str(tmp_path / "c")), clips, progress=False)


def test_the_recorded_schedule_is_what_sampling_visits(tiny_run, tmp_path, monkeypatch):
    from train.model import VTASAM

    visited: list[int] = []
    forward = VTASAM.forward

    def recording(self, x, t, *args, **kwargs):
        visited.append(int(t[0]))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(VTASAM, "forward", recording)
    clips = select_clips(read_split(tiny_run[0], "test"), 0)[:1]
    for sampler, steps in (("ddpm", 3), ("ddim", 2), ("dpmsolver++", 3)):
        visited.clear()
        config = config_for(tiny_run, tmp_path / sampler, sampler=sampler, steps=steps)
        manifest = generate(config, clips, progress=False)["manifest"]
        schedule = generation_protocol(config, clips, manifest)["sampler_schedule"]
        assert (schedule["timesteps"], schedule["first_timestep"], schedule["last_timestep"]) == \
            (len(visited), visited[0], visited[-1]), sampler
    assert generation_protocol(config, clips, None)["sampler_schedule"] is None
    # VTA-LDM's sampler (diffusers' DDPMScheduler, 'leading' spacing, steps_offset 1): t_i = (1000 // 300) i + 1
    paper = sampler_schedule(TrainConfig(), "ddpm", 300)
    assert (paper["scheduler"], paper["timestep_spacing"], paper["steps_offset"], paper["variance_type"]) == \
        ("DDPMScheduler", "leading", 1, "fixed_small")
    assert (paper["timesteps"], paper["first_timestep"], paper["last_timestep"]) == (300, (1000 // 300) * 299 + 1, 1)


def test_incompatible_or_missing_inputs_are_one_line_errors(tiny_run, tmp_path):
    data, run = tiny_run
    other = tmp_path / "shards"
    shutil.copytree(data, other)
    meta = json.loads((other / shards.META_FILE).read_text())
    meta["spec"]["embed_dim"] = 16
    (other / shards.META_FILE).write_text(json.dumps(meta))
    clips = select_clips(read_split(data, "test"), 0)
    with pytest.raises(EvalError, match="embed_dim 32 vs 16"):
        generate(config_for(tiny_run, tmp_path / "a", shards=str(other)), clips, progress=False)
    with pytest.raises(EvalError, match="ema.safetensors"):
        generate(config_for(tiny_run, tmp_path / "b", run=str(tmp_path / "nowhere")), clips, progress=False)
    # latents made by another VAE than the one loaded here (same shapes, other weights) would decode silently
    other_vae = tmp_path / "other_vae"
    shutil.copytree(data, other_vae)
    meta = json.loads((other_vae / shards.META_FILE).read_text())
    meta.setdefault("models", {})["vae"] = {"checksum": "f" * 64}
    (other_vae / shards.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(EvalError, match=r"the latents were made by VAE checkpoint ffffffffffff\.\.\., but the random"):
        generate(config_for(tiny_run, tmp_path / "d", shards=str(other_vae)), clips, progress=False)
    assert not (tmp_path / "d" / "wav" / MANIFEST_FILE).exists()
    with pytest.raises(EvalError, match="empty: folder not found"):
        read_split(tmp_path / "empty", "test")
    with pytest.raises(EvalError, match="precision bf16 needs a CUDA device"):
        generate(config_for(tiny_run, tmp_path / "c", precision="bf16", device="cpu"), clips, progress=False)
    assert not (tmp_path / "c" / "wav" / MANIFEST_FILE).exists()


def test_cli_presets_and_dry_run(capsys):
    assert eval_main(["--dry-run"]) == 0
    demo = json.loads(capsys.readouterr().out)
    assert (demo["run"], demo["shards"], demo["split"], demo["sampler"], demo["steps"]) == \
        ("runs/demo", "data/shards/demo", "test", "ddim", 25)
    assert eval_main(["--preset", "paper", "--dry-run", "--sampler", "dpmsolver++", "--steps", "25"]) == 0
    paper = json.loads(capsys.readouterr().out)
    assert (paper["guidance"], paper["random_embedders"], paper["sampler"], paper["steps"]) == \
        (3.0, False, "dpmsolver++", 25)
    paper_preset = PRESETS["paper"]
    assert (paper_preset.sampler, paper_preset.steps, paper_preset.guidance) == ("ddpm", 300, 3.0)
    assert (paper_preset.max_clips, paper_preset.selection_seed, paper_preset.clip_ids) == (1000, 0, "")
    assert (PRESETS["demo"].max_clips, PRESETS["demo"].model_weights, paper_preset.model_weights) == (0, "ema", "raw")
    with pytest.raises(SystemExit):
        eval_main(["--sampler", "euler"])
    with pytest.raises(SystemExit):
        eval_main(["--model-weights", "best"])
    assert eval_main(["--min-paired", "1.5", "--dry-run"]) == 2


def test_sampling_batch_apart_from_the_decoding_batch(tiny_run, tmp_path, monkeypatch):
    clips = select_clips(read_split(tiny_run[0], "test"), 0)
    batches: list[int] = []
    sample = eval_generate.train.sample

    def counting(model, conditions, **kwargs):
        batches.append(len(kwargs["generator"]))
        return sample(model, conditions, **kwargs)

    monkeypatch.setattr(eval_generate.train, "sample", counting)
    info = generate(config_for(tiny_run, tmp_path / "a", sampling_batch=3, batch_size=2), clips, progress=False)
    assert batches == [3, 1] and info["written"] == len(TEST_IDS)  # sampled 3 at a time, decoded 2 at a time
    assert info["speed"] == {"sampling_batch": 3, "cuda_graphs": False, "device": "cpu"}  # nothing measured off CUDA
    with pytest.raises(ValueError, match="sampling_batch"):
        config_for(tiny_run, tmp_path / "b", sampling_batch=-1)


def test_measured_sampling_batch_stops_at_out_of_memory(tiny_run, monkeypatch):
    import torch

    config = config_for(tiny_run, Path("unused"))
    model, _ = eval_generate.load_run(config.run, torch.device("cpu"))
    spec = shards.read_spec(config.shards)
    sample, tried = eval_generate.train.sample, []

    def small_card(model, conditions, **kwargs):
        tried.append(len(kwargs["generator"]))
        if len(kwargs["generator"]) >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sample(model, conditions, **kwargs)

    monkeypatch.setattr(eval_generate.train, "sample", small_card)
    found = eval_generate.measure_sampling_batch(model, spec, config, None, torch.device("cpu"), 100, False)
    assert found["sampling_batch"] == 4 and list(found["seconds_per_clip_step"]) == ["4"]
    assert found["probe_stopped"] == "CUDA out of memory at batch 8" and 16 not in tried
    assert found["seconds_per_clip_step"]["4"] > 0

    def no_memory(model, conditions, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(eval_generate.train, "sample", no_memory)
    with pytest.raises(eval_generate.EvalError, match="out of memory sampling 4 clip"):
        eval_generate.measure_sampling_batch(model, spec, config, None, torch.device("cpu"), 9, False)


def test_wavs_ids_and_manifests_that_would_mislead_are_refused(tmp_path):
    """A float WAV holding NaN or infinity (FAD's sqrtm then spun forever), two clip ids that name one WAV ('a/b'
    and 'a_b': the second clip was scored on the first one's audio), and a WAV manifest that is JSON but not an
    object: each one line."""
    from eval.clips import read_wav, sorted_unique
    from eval.generate import read_manifest

    wav = tmp_path / "x.wav"
    for bad in (np.nan, np.inf):
        samples = np.zeros(1600, np.float32)
        samples[10] = bad
        soundfile.write(wav, samples, 16000, subtype="FLOAT")
        with pytest.raises(ValueError, match=r"x\.wav: NaN or infinite samples"):
            read_wav(wav)
    with pytest.raises(EvalError, match=r"clip ids 'a/b' and 'a_b' would share one WAV \(a_b\.wav\)"):
        sorted_unique(metas(["a_b", "a/b", "c"]))
    with pytest.raises(EvalError, match=r"is too long to name its WAV \(304 bytes; at most 251 with \.tmp\)"):
        sorted_unique(metas(["x" * 300]))  # Path.exists() raised 'File name too long' before any check
    assert len(sorted_unique(metas(["x" * 243]))) == 1
    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(EvalError, match=r"manifest\.json: unreadable \(not a JSON object\)"):
        read_manifest(tmp_path)


def test_a_run_refused_for_its_settings_leaves_the_earlier_runs_files(tiny_run, tmp_path):
    """clip_ids.txt (the list other systems are scored on with --clip-ids) and config.json were written before the
    WAV folder's settings were checked: a refused run replaced an earlier run's list with its own."""
    from eval.clips import CLIP_IDS_FILE
    from eval.evaluate import CONFIG_FILE

    out = tmp_path / "out"
    evaluate(config_for(tiny_run, out, metrics="fd", figure_clips=0, av_align=False), progress=False)
    before = {name: (out / name).read_text() for name in (CLIP_IDS_FILE, CONFIG_FILE)}
    with pytest.raises(EvalError, match="generated with other settings"):
        evaluate(config_for(tiny_run, out, metrics="fd", figure_clips=0, av_align=False, max_clips=2, steps=3),
                 progress=False)
    assert {name: (out / name).read_text() for name in before} == before


def test_a_second_evaluation_into_a_busy_folder_stops_before_writing(tiny_run, tmp_path):
    """While one evaluation writes into a folder, a second one given it stops with one line and touches nothing:
    generation deletes a killed run's unfinished WAVs (`*.tmp`), which would be the first run's files in flight."""
    from common.lock import folder_lock

    out = tmp_path / "out"
    (out / "wav").mkdir(parents=True)
    in_flight = out / "wav" / "x.wav.tmp"  # the first run's WAV being written
    in_flight.write_bytes(b"RIFF")
    with folder_lock(out, "evaluation"):
        with pytest.raises(EvalError, match=f"^{out}: another evaluation is writing into this folder"):
            evaluate(config_for(tiny_run, out, metrics="fd", figure_clips=0, av_align=False), progress=False)
        assert in_flight.exists() and sorted(p.name for p in out.rglob("*")) == [".lock", "wav", "x.wav.tmp"]
    results = evaluate(config_for(tiny_run, out, metrics="fd", figure_clips=0, av_align=False), progress=False)
    assert not in_flight.exists() and results["counts"]["paired"] == results["counts"]["clips"] > 0


def test_a_wav_that_cannot_be_written_fails_its_clip_only(tiny_run, tmp_path, monkeypatch, capsys):
    """An id too long for a file name (or any refusal of one file) was a traceback that ended the run; now that clip
    is a 'generate' failure and the others are written. A full disk still stops the run, in one line."""
    import errno

    real = eval_generate.write_wav
    clips = select_clips(read_split(tiny_run[0], "test"), 0)
    victim = clips[0].id

    def refusing(path, waveform, rate):
        if path.stem == victim:
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        real(path, waveform, rate)

    monkeypatch.setattr(eval_generate, "write_wav", refusing)
    out = tmp_path / "a"
    generate(config_for(tiny_run, out), clips, progress=False)
    assert not wav_path(out, victim).exists() and all(wav_path(out, c.id).exists() for c in clips[1:])
    failures = shards.read_jsonl(out / "generation_failures.jsonl")
    assert failures == [{"id": victim, "stage": "generate", "reason": f"cannot write {victim}.wav (File name too long)"}]

    def full(path, waveform, rate):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(eval_generate, "write_wav", full)
    capsys.readouterr()
    with pytest.raises(EvalError, match="No space left on device"):
        generate(config_for(tiny_run, tmp_path / "b"), clips, progress=True)
    drawn = capsys.readouterr().err
    assert "generating" in drawn and drawn.endswith("\n"), repr(drawn[-200:])  # the bar's line is ended for the error


@pytest.mark.parametrize(("changes", "message"), [
    ({"guidance": float("nan")}, "guidance, peak and duration must be finite numbers, got nan, 0.0 and 10.0"),
    ({"peak": float("inf")}, "guidance, peak and duration must be finite numbers, got 3.0, inf and 10.0"),
    ({"duration": 1e12}, "duration must be at most 600 s, got 1e+12"),
    ({"peak": 2.0}, "peak must be at most 1 (full scale; 0 keeps the vocoder's level), got 2"),
])
def test_values_that_failed_after_generating_are_refused_first(changes, message):
    """NaN guidance made every clip's audio non-finite and exited 0; an infinite peak wrote square waves; a NaN or
    huge duration failed after every WAV was generated (NaN to integer, 56.8 PiB asked for)."""
    with pytest.raises(ValueError) as refused:
        PRESETS["demo"].replace(**changes)
    assert str(refused.value) == message


def test_more_steps_than_the_model_was_trained_with_is_one_line(tiny_run, tmp_path):
    """DDIM and DDPM raised diffusers' ValueError traceback; DPM-Solver++ visited each timestep five times."""
    for sampler in ("ddim", "dpmsolver++"):
        with pytest.raises(EvalError, match=r"--steps 5000: .* was trained with 1000 timesteps; a sampler visits at "
                                             "most that many"):
            generate(config_for(tiny_run, tmp_path / sampler, steps=5000, sampler=sampler),
                     select_clips(read_split(tiny_run[0], "test"), 0), progress=False)
        assert not (tmp_path / sampler / "wav").exists() or not list((tmp_path / sampler / "wav").glob("*.wav"))


@pytest.mark.parametrize(("config", "expected"), [([1, 2], "'config' is a list, not an object"),
                                                  ({"sample_rate": "16000"}, "field 'sample_rate' is '16000', expected int")])
def test_a_stage_one_config_of_other_types_is_one_line(tmp_path, config, expected):
    """A meta.json whose config is not an object, or holds a field of another type, was an AttributeError or
    huggingface_hub's StrictDataclassFieldValidationError traceback in evaluation."""
    from eval.generate import audio_model_config
    from preprocess.config import PRESETS as FEATURES
    from tests.test_train_support import SPEC, write_meta

    write_meta(tmp_path, SPEC)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["config"] = config if isinstance(config, list) else {**FEATURES["tiny"].to_dict(), **config}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EvalError, match=f"meta.json: unreadable stage-one config \\({re.escape(expected)}\\)$"):
        audio_model_config(tmp_path)


def test_a_full_disk_reaches_write_wavs_caller_as_the_os_error(tmp_path, monkeypatch):
    """libsndfile wrote the WAV itself and said only 'System error' (a LibsndfileError, no OSError) on a full or
    read-only disk: evaluation's one-line stop for a full disk never saw it, and the run ended in a traceback. The
    WAV is now made in memory and written by Python: the OSError keeps its errno, and no .tmp stays."""
    import errno

    def full(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(eval_generate, "open", full, raising=False)  # the module's `open`, before the builtin
    target = tmp_path / "clip.wav"
    with pytest.raises(OSError) as caught:
        eval_generate.write_wav(target, np.zeros(1600, np.float32), 16000, software="vta-sam")
    assert caught.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())
    monkeypatch.undo()
    eval_generate.write_wav(target, np.full(1600, 0.5, np.float32), 16000, software="vta-sam")
    data, rate = soundfile.read(target)
    assert rate == 16000 and len(data) == 1600 and abs(data[0] - 0.5) < 1e-4
    assert soundfile.SoundFile(target).software.startswith("vta-sam")  # the INFO chunk a later run recognises
