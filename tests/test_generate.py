"""`vta-sam generate`: sound for any video, muxed without touching the video stream."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch

from preprocess.__main__ import main as features_main
from preprocess.video import decode_frames
from tests import media
from tests.test_train_support import small_config
from train.__main__ import main as train_main
from vta_sam.cli import main as cli_main
from vta_sam.generate import NOUN_CHUNK, GenerateOptions, SoundGenerator, join_windows, shortlist, shortlist_size, window_starts


def ffprobe(path: Path) -> dict:
    result = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def video_stream_hash(path: Path) -> str:
    """Hash of the video stream's packets (payload and timing), whatever the container around them."""
    result = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "streamhash",
                             "-hash", "sha256", "-"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on stage-one features of three generated clips."""
    root = tmp_path_factory.mktemp("gen")
    videos = root / "videos"
    videos.mkdir()
    for i in range(3):
        media.make_video(videos / f"clip{i}.mp4", seconds=3.0, audio="tone")
    (root / "captions.json").write_text(json.dumps({f"clip{i}": "dog barking" for i in range(3)}))
    assert features_main(["--videos", str(videos), "--captions", str(root / "captions.json"), "--out", str(root / "shards"),
                          "--no-progress", "--num-workers", "0"]) == 0
    config = small_config(max_steps=2, checkpoint_every=2)
    flags = ["--shards", str(root / "shards"), "--output", str(root / "run"), "--max-steps", "2", "--checkpoint-every", "2",
             "--block-channels", *map(str, config.block_channels), "--attention-heads", *map(str, config.attention_heads),
             "--cross-attention-dim", str(config.cross_attention_dim), "--batch-size", "2", "--shuffle-buffer", "2"]
    assert train_main(flags) == 0
    return root / "run"


def run_with_features(run_dir: Path, tmp_path: Path, **config: object) -> Path:
    """A copy of the trained run whose model/features.json records other stage-one settings (`config`)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    path = run / "model" / "features.json"
    features = json.loads(path.read_text())
    features["config"].update(config)
    path.write_text(json.dumps(features))
    return run


def test_windows_cover_the_video_and_end_at_its_end():
    assert window_starts(3.0, 10.24, 2.0) == [0.0]
    starts = window_starts(25.0, 10.24, 2.0)
    assert starts[0] == 0 and starts[-1] == pytest.approx(25.0 - 10.24)
    assert all(b - a <= 10.24 - 2.0 + 1e-9 for a, b in zip(starts, starts[1:]))  # every seam has >= 2 s of overlap


def test_equal_power_crossfade_keeps_a_steady_signal_steady():
    rate = 100
    tone = np.sin(np.arange(1000) * 0.3).astype(np.float32)
    pieces = [tone[:600], tone[400:1000]]  # the same signal, windows overlapping 2 s
    joined = join_windows(pieces, [0.0, 4.0], 1000, rate)
    ramp = np.linspace(0, np.pi / 2, 200)
    expected_gain = np.concatenate([np.ones(400), np.cos(ramp) + np.sin(ramp), np.ones(400)])
    np.testing.assert_allclose(joined, tone * expected_gain, atol=1e-5)


def test_generate_muxes_sound_without_touching_the_video(run_dir, tmp_path, capsys):
    short = media.make_video(tmp_path / "short.mp4", seconds=3.0, audio=None)
    long = media.make_video(tmp_path / "long.mp4", seconds=25.0, fps=5, audio="tone", sample_rate=48000, channels=6)
    out = tmp_path / "out"
    code = cli_main(["generate", str(short), str(long), "--model", str(run_dir), "--out", str(out), "--steps", "3",
                     "--caption", "dog barking", "--no-progress", "--explain"])
    assert code == 0, capsys.readouterr().err
    for source, seconds in ((short, 3.0), (long, 25.0)):
        result = out / source.name
        assert video_stream_hash(result) == video_stream_hash(source)  # the video stream is copied bit for bit
        streams = {s["codec_type"]: s for s in ffprobe(result)["streams"]}
        assert streams["audio"]["codec_name"] == "aac"
        assert float(streams["audio"]["duration"]) == pytest.approx(seconds, abs=0.1)
        wave, rate = soundfile.read(out / f"{source.stem}.wav")
        assert rate == 16000 and len(wave) == round(seconds * 16000)
        assert (out / f"{source.stem}.explain.png").stat().st_size > 10_000

    # no click at the seams: where windows join (start of an overlap, end of the earlier window's audio), the
    # sample-to-sample jump is no outlier against the 4000 samples around it, and the level does not dip
    wave, rate = soundfile.read(out / "long.wav")
    assert wave.std() > 1e-3  # audible, not silence
    jumps = np.abs(np.diff(wave))
    starts = window_starts(25.0, 10.24, 2.0)
    joins = [round(s * rate) for s in starts[1:]] + [round((s + 10.24) * rate) for s in starts[:-1]]
    for join in joins:
        around = np.concatenate([jumps[join - 2000 : join - 2], jumps[join + 2 : join + 2000]])
        assert jumps[join - 2 : join + 2].max() <= around.max()
        assert wave[join - 800 : join + 800].std() > 0.5 * wave.std()

    # resumable: a second run skips finished videos and changes nothing
    before = (out / "long.wav").stat().st_mtime_ns
    assert cli_main(["generate", str(long), str(short), "--model", str(run_dir), "--out", str(out), "--no-progress"]) == 0
    assert (out / "long.wav").stat().st_mtime_ns == before


def test_without_caption_the_vocabulary_is_grounded(run_dir, tmp_path):
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    out = tmp_path / "single.mp4"
    assert cli_main(["generate", str(video), "--model", str(run_dir), "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert out.exists() and out.with_suffix(".wav").exists()


def test_the_shortlist_keeps_the_texts_closest_to_any_frame():
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # two frames; lengths do not matter (cosine)
    texts = torch.tensor([[0.0, 0.0, 1.0], [0.0, 5.0, 0.1], [-1.0, 0.0, 0.0], [3.0, 0.1, 0.0], [1.0, 1.0, 1.0]])
    assert shortlist(images, texts, 2) == [1, 3]  # each matches one frame: the best frame counts, not the mean
    assert shortlist(images, texts, 3) == [1, 3, 4]
    assert shortlist(images, texts, 99) == [0, 1, 2, 3, 4]
    assert [shortlist_size(k) for k in (1, 4, 8, 20)] == [2, 8, 16, NOUN_CHUNK]


def test_without_caption_clip_shortlists_and_one_prompt_is_grounded(run_dir, tmp_path, monkeypatch):
    """The vocabulary's text embeddings are made so that `shortlist_size` chosen nouns are the ones most similar to the
    video's frames: exactly those are grounded, in one prompt (one detector call per frame batch), the vocabulary
    is encoded once per generator, and the nouns kept come from the shortlist."""
    generator = SoundGenerator(GenerateOptions(model=run_dir, device="cpu", steps=2))
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    clip = generator.encoders.clip_encoder
    grounder = generator.encoders.grounder
    size = shortlist_size(generator.features.max_nouns)
    chosen = generator.vocabulary[5::19][:size]  # spread over the vocabulary, in its order
    assert len(chosen) == size

    encoded_texts: list[list[str]] = []
    real_encode_frames = clip.encode_frames
    seen_frames: list[torch.Tensor] = []

    def encode_frames(frames):
        embeddings = real_encode_frames(frames)
        seen_frames.append(embeddings)
        return embeddings

    def encode_texts(texts):
        encoded_texts.append(list(texts))
        direction = torch.nn.functional.normalize(seen_frames[-1], dim=-1).mean(0)
        noise = torch.randn(len(texts), len(direction), generator=torch.Generator().manual_seed(0))
        vectors = noise - 10 * direction  # every other noun points away from the frames
        for k, noun in enumerate(texts):
            if noun in chosen:
                vectors[k] = direction + 0.01 * noise[k]
        return vectors

    grounded: list[list[list[str]]] = []
    detector_calls: list[int] = []
    inside: list[bool] = []
    real_detections, real_detect = grounder.detections, grounder._detect

    def detections(frames, nouns):
        grounded.append(nouns)
        return real_detections(frames, nouns)

    def detect(images, batch_prompts):  # counts the grounder's passes, not its own re-entry for a batch of one
        if not inside:
            detector_calls.append(len(images))
        inside.append(True)
        try:
            return real_detect(images, batch_prompts)
        finally:
            inside.pop()

    monkeypatch.setattr(clip, "encode_frames", encode_frames)
    monkeypatch.setattr(clip, "encode_texts", encode_texts)
    monkeypatch.setattr(grounder, "detections", detections)
    monkeypatch.setattr(grounder, "_detect", detect)
    monkeypatch.setattr(grounder, "batch", 3)  # several frame batches per video

    cfg = generator.features
    frames = [decode_frames(video, 0.0, cfg.frame_times(), cfg.window_seconds, cfg.frame_short_side).frames]
    for _ in range(2):
        grounded.clear()
        detector_calls.clear()
        nouns, caption = generator._nouns(frames)
        assert grounded == [[chosen]]  # one prompt: the shortlist
        count = len(frames[0])
        assert detector_calls == [min(3, count - i) for i in range(0, count, 3)]  # one call per frame batch
        assert len(detector_calls) >= 2
        assert set(nouns) <= set(chosen) and len(nouns) == min(cfg.max_nouns, size)
        assert caption == ", ".join(nouns)
    assert encoded_texts == [generator.vocabulary]  # encoded once, on the first caption-less video

    waveform, explain = generator.audio(video, None)  # the whole path: nouns from the shortlist condition the model
    assert set(explain["nouns"]) <= set(chosen) and len(waveform) == round(2.0 * cfg.sample_rate)


def test_ground_all_grounds_the_whole_vocabulary_in_chunks(run_dir, monkeypatch):
    generator = SoundGenerator(GenerateOptions(model=run_dir, device="cpu", ground_all=True))
    calls: list[list[list[str]]] = []

    def probabilities(frames, nouns):
        calls.append(nouns)
        return [torch.zeros(len(f), len(n)) for f, n in zip(frames, nouns)]

    monkeypatch.setattr(generator.encoders.grounder, "probabilities", probabilities)
    frames = [np.zeros((3, 32, 32, 3), np.uint8)]
    nouns, _ = generator._nouns(frames)
    (chunks,) = calls
    assert [n for chunk in chunks for n in chunk] == generator.vocabulary and max(map(len, chunks)) == NOUN_CHUNK
    assert len(nouns) == generator.features.max_nouns and set(nouns) <= set(generator.vocabulary)


def test_a_broken_file_among_good_ones(run_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    media.make_video(folder / "good.mp4", seconds=2.0, audio=None)
    media.make_not_video(folder / "broken.mp4")
    media.make_audio_only(folder / "sound.mp4")
    out = tmp_path / "out"
    assert cli_main(["generate", str(folder), "--model", str(run_dir), "--out", str(out), "--steps", "2",
                     "--caption", "ball", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'broken.mp4'}:" in err and f"{folder / 'sound.mp4'}: no video stream" in err
    assert (out / "good.mp4").exists() and not (out / "broken.mp4").exists()


def test_an_unwritable_output_is_one_line(run_dir, tmp_path, capsys):
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli_main(["generate", str(video), str(video), "--model", str(run_dir), "--out", str(blocker / "out"),
                     "--steps", "2", "--caption", "ball", "--no-progress"]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_a_wav_that_cannot_be_written_is_one_line_and_the_others_go_on(run_dir, tmp_path, capsys, monkeypatch):
    """A WAV that cannot be written: one line naming the video, the file and the reason (libsndfile said only
    'System error'; the WAV is now written by Python), the next video still gets its sound, exit code 1. A folder
    where the WAV's temporary file goes blocks it even for root, unlike a read-only folder."""
    import vta_sam.generate as generate

    first = media.make_video(tmp_path / "a.mp4", seconds=2.0, audio=None)
    second = media.make_video(tmp_path / "b.mp4", seconds=2.0, audio=None)
    out = tmp_path / "out"
    (out / "a.wav.tmp").mkdir(parents=True)
    partial_path = generate.partial_path
    monkeypatch.setattr(generate, "partial_path",
                        lambda path: out / "a.wav.tmp" if path.name == "a.wav" else partial_path(path))
    assert cli_main(["generate", str(first), str(second), "--model", str(run_dir), "--out", str(out),
                     "--steps", "2", "--caption", "ball", "--no-progress"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {first}: cannot write {out / 'a.wav.tmp'} (Is a directory)"]
    assert "Traceback" not in captured.err
    assert (out / "b.mp4").exists() and (out / "b.wav").exists()
    assert not (out / "a.mp4").exists() and not (out / "a.wav").exists()
    assert "1 of 2 videos have sound" in captured.out


def test_the_run_carries_its_stage_one_config(run_dir):
    features = json.loads((run_dir / "model" / "features.json").read_text())
    assert features["config"]["preset"] == "tiny" and features["spec"]["num_frames"] == 20


def test_generation_thresholds_the_detector_score_as_training_does():
    """Stage one's in-memory features of a window (what `vta-sam generate` conditions on) carry the detector score
    and SAM's IoU, and give the conditions a shard sample of the same features gives a training step."""
    from types import SimpleNamespace

    import torch

    import shards
    from preprocess.config import PRESETS
    from preprocess.pipeline import Encoders
    from tests.conftest import make_sample

    cfg = PRESETS["tiny"].replace(device="cpu")
    encoders = Encoders(cfg, None, torch.device("cpu"), audio=False)
    frames = np.random.default_rng(0).integers(0, 256, (6, 64, 80, 3), dtype=np.uint8)
    (features,) = encoders.visual([frames], ["a dog and a car"], [["dog", "car"]])
    spec = cfg.shard_spec()
    assert {"detector.npy", "iou.npy"} <= set(features) and features["detector.npy"].shape == (spec.num_frames, 2)
    np.testing.assert_allclose(features["probs.npy"], features["detector.npy"] * features["iou.npy"], rtol=1e-6)
    assert not features["detector.npy"][6:].any()  # past the window's frames
    detector = features["detector.npy"][:6]
    threshold = float(np.median(detector))
    assert 0 < (detector.astype(np.float16) >= threshold).sum() < detector.size  # the threshold splits the frames

    meta, arrays, waveform = make_sample(spec, "window")
    raw = shards.encode_sample(spec, meta, arrays | features, waveform)
    decoded = shards.decode_sample(raw)
    trained = shards.sample_conditions(decoded, threshold)
    generated = SoundGenerator._conditions(  # type: ignore[arg-type]
        SimpleNamespace(train_config=SimpleNamespace(object_threshold=threshold), device="cpu"), [features])
    for name, condition in trained.items():
        torch.testing.assert_close(generated[name][0], condition, rtol=1e-2, atol=1e-2)
    kept = torch.from_numpy(detector.astype(np.float16).astype(np.float32) >= threshold)
    nouns = torch.from_numpy(features["nouns.npy"])
    by_hand = (torch.from_numpy(features["probs.npy"][:6]) * kept) @ nouns
    torch.testing.assert_close(generated["objects"][0, :6], by_hand, rtol=1e-5, atol=1e-5)


def test_cuda_graphs_flag():
    from vta_sam.generate import build_parser

    assert GenerateOptions().cuda_graphs and build_parser().parse_args(["v.mp4"]).cuda_graphs
    assert not build_parser().parse_args(["v.mp4", "--no-cuda-graphs"]).cuda_graphs


def test_features_made_with_the_fused_kernel_still_generate_where_it_cannot_run(run_dir, tmp_path, capsys):

    import torch

    from preprocess import deformable

    if torch.cuda.is_available() and deformable.available():
        pytest.skip("the fused kernel runs here")
    run = run_with_features(run_dir, tmp_path, deformable_attention="triton")  # stage one's GPU had the fused kernel
    video = media.make_video(tmp_path / "a.mp4", seconds=2.0, audio=None)
    code = cli_main(["generate", str(video), "--model", str(run), "--out", str(tmp_path / "out"), "--steps", "2",
                     "--caption", "dog", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "out" / "a.wav").exists()
    assert "needs a CUDA device and the triton package (device cpu); grounding with the PyTorch path" in err


def test_features_made_with_compiled_detectors_generate_without_compiling(run_dir, tmp_path, monkeypatch):
    """Stage one's --compile is its machine's speed choice (minutes of compilation per shape); generating sound
    for a video grounds with the eager models."""

    from preprocess.encoders import Grounder

    def refuse(self: Grounder) -> None:
        raise AssertionError("vta-sam generate compiled the detector")

    monkeypatch.setattr(Grounder, "compile_models", refuse)
    run = run_with_features(run_dir, tmp_path, compile=True)
    video = media.make_video(tmp_path / "a.mp4", seconds=2.0, audio=None)
    code = cli_main(["generate", str(video), "--model", str(run), "--out", str(tmp_path / "out"), "--steps", "2",
                     "--caption", "dog", "--no-progress"])
    assert code == 0 and (tmp_path / "out" / "a.wav").exists()


def test_stage_one_settings_of_other_shapes_than_the_model_was_trained_on_are_refused(run_dir, tmp_path, capsys):
    """The stage-one settings (model/features.json, or the shards' meta.json of an older run) were not compared with
    the model's: at another frame rate the model got 2x the frames it was trained on, and made sound without a word."""

    fps = json.loads((run_dir / "model" / "features.json").read_text())["config"]["fps"]
    run = run_with_features(run_dir, tmp_path, fps=2 * fps)
    path = run / "model" / "features.json"
    video = media.make_video(tmp_path / "a.mp4", seconds=2.0, audio=None)
    code = cli_main(["generate", str(video), "--model", str(run), "--out", str(tmp_path / "out"), "--steps", "2",
                     "--caption", "dog", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "out").exists(), err
    assert err.startswith(f"error: {path}: the model was trained on other features (num_frames ") and "\n" not in err


def test_nltk_data_is_needed_only_for_a_free_text_caption(run_dir, tmp_path, capsys, monkeypatch):
    """A model whose stage one tagged with nltk (the paper preset) stopped without nltk's tagger data even without a
    caption, whose nouns come from VGGSound's labels, and did so with a TaggerUnavailableError traceback."""

    import nltk

    from preprocess import nouns as nouns_module

    run = run_with_features(run_dir, tmp_path, tagger="nltk")

    def not_found(*args, **kwargs):
        raise LookupError("not found")

    monkeypatch.setattr(nltk.data, "find", not_found)
    nouns_module.get_tagger.cache_clear()  # a tagger loaded by another test would be taken from the cache
    try:
        video = media.make_video(tmp_path / "a.mp4", seconds=2.0, audio=None)
        common = ["--model", str(run), "--steps", "2", "--no-progress"]
        assert cli_main(["generate", str(video), "--out", str(tmp_path / "out"), *common]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert cli_main(["generate", str(video), "--out", str(tmp_path / "out2"), "--caption", "a man hammers a nail",
                         *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: nltk's tagger data 'averaged_perceptron_tagger_eng' is not installed") \
            and "\n" not in err and "Traceback" not in err, err
    finally:
        nouns_module.get_tagger.cache_clear()


def test_a_copy_that_would_lose_the_videos_rotation_is_refused(run_dir, tmp_path, capsys):
    """A phone video (a display matrix turning it 90°) given sound as .mkv: ffmpeg 5 writes no rotation into
    Matroska, so the copy played sideways without a word. The trial copy shows it before any sound is made; .mp4
    keeps the rotation."""
    import subprocess

    from preprocess.video import probe_video

    plain = media.make_video(tmp_path / "plain.mp4", seconds=2.0, audio=None)
    turned = tmp_path / "turned.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(turned)],
                   check=True)
    assert probe_video(turned)["rotation"] in (90, 270)
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    out = tmp_path / "out"
    out.mkdir()
    code = cli_main(["generate", str(turned), "--out", str(out / "copy.mkv"), *common])
    err = capsys.readouterr().err
    if code == 0:  # a newer ffmpeg writes rotation into Matroska: then the copy must hold it
        assert probe_video(out / "copy.mkv")["rotation"] == probe_video(turned)["rotation"]
    else:
        assert code == 1 and f"copy.mkv (a .mkv copy would lose the video's {probe_video(turned)['rotation']}° " in err
        assert not list(out.iterdir())  # refused before any sound was made
    assert cli_main(["generate", str(turned), "--out", str(out / "copy.mp4"), *common]) == 0
    assert probe_video(out / "copy.mp4")["rotation"] == probe_video(turned)["rotation"]


def test_a_copy_that_would_lose_the_videos_mirroring_is_refused(run_dir, tmp_path, capsys):
    """A display matrix that flips the picture upside down (no turn: rotation 0) was not looked at: a .mkv copy
    (ffmpeg 5 writes no display matrix into Matroska) played mirrored without a word."""
    from preprocess.video import probe_video

    plain = media.make_video(tmp_path / "plain.mp4", seconds=2.0, audio=None)
    flipped = tmp_path / "flipped.mp4"
    with av.open(str(plain)) as source, av.open(str(flipped), "w") as target:
        stream = target.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = source.streams.video[0].width, source.streams.video[0].height, "yuv420p"
        stream.set_display_matrix([1 << 16, 0, 0, 0, -(1 << 16), 0, 0, 0, 1 << 30])  # rows reversed
        for frame in source.decode(video=0):
            frame.pict_type = av.video.frame.PictureType.NONE
            target.mux(stream.encode(frame))
        target.mux(stream.encode())
    probe = probe_video(flipped)
    assert (probe["rotation"], probe["mirrored"]) == (0, True)
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    out = tmp_path / "out"
    out.mkdir()
    code = cli_main(["generate", str(flipped), "--out", str(out / "copy.mkv"), *common])
    err = capsys.readouterr().err
    if code == 0:  # a newer ffmpeg writes the display matrix into Matroska: then the copy must hold it
        assert probe_video(out / "copy.mkv")["mirrored"]
    else:
        assert code == 1 and "copy.mkv (a .mkv copy would lose the video's mirroring and play mirrored" in err
        assert not list(out.iterdir())  # refused before any sound was made
    assert cli_main(["generate", str(flipped), "--out", str(out / "copy.mp4"), *common]) == 0
    assert probe_video(out / "copy.mp4")["mirrored"]


def test_an_animated_png_is_refused_before_its_sound_is_made(run_dir, tmp_path, capsys):
    """An animated PNG's one-frame trial copy passed through the image muxer; the whole copy then failed ('Cannot
    write more than one file with the same name') after the sound was made. Its copy goes to Matroska, whose trial
    says at once that no container here takes the APNG stream (a copy never re-encodes the picture)."""
    anim = tmp_path / "anim.png"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=s=96x64:r=10:d=2", "-plays", "0", "-f", "apng",
                    str(anim)], check=True)
    out = tmp_path / "out"
    code = cli_main(["generate", str(anim), "--out", str(out), "--model", str(run_dir), "--steps", "2", "--caption", "dog",
                     "--no-progress"])
    err = capsys.readouterr().err
    if code == 0:  # an ffmpeg whose Matroska takes APNG
        assert sorted(path.name for path in out.iterdir()) == ["anim.mkv", "anim.wav"]
    else:
        assert code == 1 and f"error: {anim}: cannot write {out / 'anim.mkv'} (" in err, err
        assert "Cannot write more than one file" not in err and not list(out.glob("*.wav"))  # before the sound


def test_a_transport_stream_whose_timestamps_jump_is_one_line(run_dir, tmp_path, capsys):
    """Two recordings joined into one MPEG-TS, the second's clock behind the first's: FFmpeg read the jump back as a
    26-hour jump forward, and generate planned 11,572 windows for 8 s of video (memory grew until it was killed).
    Such a file is refused in one line saying how to mend it; a plain transport stream still gets its sound."""
    import subprocess

    def segment(name: str, offset: float) -> Path:
        path = tmp_path / name
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=10:duration=4", "-c:v",
                        "libx264", "-pix_fmt", "yuv420p", "-f", "mpegts", "-output_ts_offset", str(offset), str(path)],
                       check=True)
        return path

    first, second = segment("a.ts", 100), segment("b.ts", 0)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    out = tmp_path / "out"
    common = ["--model", str(run_dir), "--out", str(out), "--steps", "2", "--caption", "dog", "--no-progress"]
    assert cli_main(["generate", str(joined), str(first), *common]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: {joined}: its timestamps jump by +") and \
        "remux it first, e.g. ffmpeg -i joined.ts -c copy fixed.mp4" in err[0], err
    assert not (out / "joined.wav").exists()
    assert len(soundfile.read(out / "a.wav")[0]) == round(4.0 * 16000)


def test_a_video_too_narrow_to_ground_is_one_line_and_the_others_go_on(run_dir, tmp_path, capsys):
    sliver = media.make_video(tmp_path / "sliver.mp4", seconds=2.0, size=(16, 4000), audio=None)
    normal = media.make_video(tmp_path / "normal.mp4", seconds=2.0, audio=None)
    out = tmp_path / "out"
    code = cli_main(["generate", str(sliver), str(normal), "--model", str(run_dir), "--out", str(out), "--steps", "2",
                     "--caption", "dog", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {sliver}: frames of 16x4000 are too narrow to ground")
    assert (out / "normal.mp4").exists() and not (out / "sliver.mp4").exists()


def test_two_inputs_with_the_same_output_names_are_not_both_written(run_dir, tmp_path, capsys):
    """a/x.mp4 and b/x.mp4 (the same names), x.mp4 and x.webm (the same WAV): the later one is one line and
    exit code 1, the first keeps its outputs."""
    first = media.make_video(tmp_path / "a" / "x.mp4", seconds=2.0, audio=None)
    second = media.make_video(tmp_path / "b" / "x.mp4", seconds=2.0, audio=None)
    webm = media.make_video(tmp_path / "b" / "y.webm", seconds=2.0, audio=None, codec="vp9")
    other = media.make_video(tmp_path / "a" / "y.mp4", seconds=2.0, audio=None)
    out = tmp_path / "out"
    code = cli_main(["generate", str(first), str(second), str(other), str(webm), "--model", str(run_dir), "--out",
                     str(out), "--steps", "2", "--caption", "dog", "--no-progress"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 2
    assert errors[0] == f"error: {second}: its output x.wav would overwrite that of {first}; rename one or give them separate --out folders"
    assert errors[1].startswith(f"error: {webm}: its output y.wav would overwrite that of {other}")
    assert sorted(p.name for p in out.iterdir()) == ["x.mp4", "x.wav", "y.mp4", "y.wav"]
    assert "2 of 4 videos have sound" in captured.out


def decodable_end(path: Path) -> float:
    """Where the last frame that decodes ends, by PyAV alone, as the ffmpeg program decodes (a packet the decoder
    refuses is skipped, the demuxer's error at the cut ends it): its time plus one frame interval (10 fps clips)."""
    import av

    times = []
    with av.open(str(path)) as container:
        try:
            for packet in container.demux(video=0):
                try:
                    times.extend(float(frame.time) for frame in packet.decode())
                except av.FFmpegError:
                    continue
        except av.FFmpegError:
            pass  # the cut: every frame before it counts
    return max(times) + 0.1


def test_windows_end_where_the_frames_end_not_where_the_header_says(tmp_path):
    """A download cut short after an intact mp4 header announces 24 s; the frames stop about half-way. The windows
    are laid out again over the frames that exist, and every one of them is full of frames; a second pass over the
    windows (kept or decoded again) gives the same ones."""
    from preprocess.config import FeatureConfig
    from vta_sam.generate import Windows

    def decode_windows(video, claimed):
        windows = Windows(video, claimed, config, overlap=2.0, keep=1)
        first = [(start, d.duration, d.frames) for _, start, d in windows]
        again = [(start, d.duration, d.frames) for _, start, d in windows]
        assert [(s, d) for s, d, _ in first] == [(s, d) for s, d, _ in again]
        assert all(np.array_equal(a[2], b[2]) for a, b in zip(first, again))
        return windows.duration, windows.starts, first

    video = media.make_truncated(tmp_path / "cut.mp4", seconds=24.0, audio=None)
    config = FeatureConfig()
    claimed = 24.0
    end = decodable_end(video)
    assert 10.5 < end < 20  # more than one window, well short of the claim
    duration, starts, decoded = decode_windows(video, claimed)
    assert duration == pytest.approx(end, abs=1e-3)
    assert starts == window_starts(duration, config.window_seconds, 2.0) == [start for start, _, _ in decoded]
    assert all(seconds == pytest.approx(config.window_seconds) for _, seconds, _ in decoded)
    assert all(len(frames) == len(config.frame_times()) for _, _, frames in decoded)

    # a complete video keeps its duration and is decoded once per window
    whole = media.make_video(tmp_path / "whole.mp4", seconds=24.0, audio=None)
    duration, starts, decoded = decode_windows(whole, 24.0)
    assert duration == 24.0 and starts == window_starts(24.0, config.window_seconds, 2.0)


def test_a_video_cut_short_gets_sound_only_where_it_has_frames(run_dir, tmp_path, capsys):
    video = media.make_truncated(tmp_path / "cut.mp4", seconds=6.0, audio=None)
    end = decodable_end(video)
    assert end < 5.0
    out = tmp_path / "out"
    code = cli_main(["generate", str(video), "--model", str(run_dir), "--out", str(out), "--steps", "2", "--caption", "dog",
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    wave, rate = soundfile.read(out / "cut.wav")
    assert len(wave) == round(end * rate)


def test_webm_outputs_and_paths_ffmpeg_could_misread(run_dir, tmp_path, capsys):
    """--out x.webm: a VP9 video gets Opus sound (WebM holds no AAC); an H.264 one is refused before any sound is
    made. Names with ':' or a leading '-' reach ffmpeg as files, not as a protocol or an option."""
    vp9 = media.make_video(tmp_path / "in.webm", seconds=2.0, audio=None, codec="vp9")
    h264 = media.make_video(tmp_path / "h.mp4", seconds=2.0, audio=None)
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    assert cli_main(["generate", str(vp9), "--out", str(tmp_path / "a" / "x.webm"), *common]) == 0
    streams = {s["codec_type"]: s["codec_name"] for s in ffprobe(tmp_path / "a" / "x.webm")["streams"]}
    assert streams == {"video": "vp9", "audio": "opus"}
    capsys.readouterr()
    assert cli_main(["generate", str(h264), "--out", str(tmp_path / "b" / "x.webm"), *common]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {h264}: cannot write {tmp_path / 'b' / 'x.webm'} (WebM holds only "
                                               "vp8, vp9, av1 video and this video is h264: name the output .mkv or .mp4)")
    assert not (tmp_path / "b" / "x.wav").exists()

    odd = [media.make_video(tmp_path / name, seconds=2.0, audio=None) for name in ("a:b.mp4", "-c.mp4")]
    assert cli_main(["generate", *map(str, odd), "--out", str(tmp_path / "c"), *common]) == 0, capsys.readouterr().err
    for video in odd:
        assert video_stream_hash(tmp_path / "c" / video.name) == video_stream_hash(video)


def test_lists_of_videos(run_dir, tmp_path, capsys):
    """A .txt list: blank lines and '#' comments skipped, CRLF line ends read; a list that cannot be read is one
    error line and the other inputs still get sound; so is a folder without videos (exit code 1)."""
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    listing = tmp_path / "videos.txt"
    listing.write_bytes(f"# the videos\r\n\r\n{video}\r\n{tmp_path / 'gone.mp4'}\r\n".encode())
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    assert cli_main(["generate", str(listing), "--out", str(tmp_path / "out"), *common]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {tmp_path / 'gone.mp4'}: file not found"]
    assert (tmp_path / "out" / "v.wav").exists()
    assert cli_main(["generate", str(tmp_path / "nothing.txt"), str(video), "--out", str(tmp_path / "out3"), *common]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {tmp_path / 'nothing.txt'}: cannot read the list of videos (No such file or directory)"
    assert (tmp_path / "out3" / "v.wav").exists() and "1 of 1 videos have sound" in captured.out
    (tmp_path / "empty").mkdir()
    assert cli_main(["generate", str(tmp_path / "empty"), "--out", str(tmp_path / "out2"), *common]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {tmp_path / 'empty'}: this folder names no video")
    assert captured.out.startswith("0 videos have sound") and not (tmp_path / "out2").exists()
    assert cli_main(["generate", str(tmp_path / "empty"), str(video), "--out", str(tmp_path / "out4"), *common]) == 1
    assert (tmp_path / "out4" / "v.wav").exists() and "1 of 1 videos have sound" in capsys.readouterr().out


def test_a_caption_without_nouns_is_said_once(run_dir, tmp_path, capsys):
    """A caption in which the tagger finds no noun grounds no object: the sound comes from the frames alone, and
    the command says so in one warning line (once, not per video), where it used to say nothing."""
    videos = [media.make_video(tmp_path / f"v{i}.mp4", seconds=1.0, audio=None) for i in range(2)]
    common = ["--model", str(run_dir), "--steps", "2", "--no-progress", "--out", str(tmp_path / "out")]
    assert cli_main(["generate", *map(str, videos), "--caption", "very quickly", *common]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning:")] == [
        "warning: the caption 'very quickly' has no noun that the tagger finds: the sound is conditioned on the "
        "frames alone (no objects are grounded)"]
    assert (tmp_path / "out" / "v1.wav").exists()
    assert cli_main(["generate", str(videos[0]), "--caption", "a dog", *common[:-1], str(tmp_path / "dog")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_ffmpeg_error_reason():
    from common.ffmpeg import error_reason

    stderr = ("[webm @ 0x55f76b343000] Only VP8 or VP9 or AV1 video and Vorbis or Opus audio are supported for WebM.\n"
              "Could not write header for output file #0 (incorrect codec parameters ?): Invalid argument\n"
              "Error initializing output stream 0:1 -- \n")
    assert error_reason(stderr) == "Only VP8 or VP9 or AV1 video and Vorbis or Opus audio are supported for WebM."
    assert error_reason("x.mp4: No such file or directory\n") == "x.mp4: No such file or directory"
    assert error_reason("") == "ffmpeg failed"


def test_a_video_never_replaces_itself_and_a_very_short_one_gets_sound(run_dir, tmp_path, capsys, monkeypatch):
    """`--out .` in the video's own folder would write the copy with sound over the video: refused. A video shorter
    than the first sampling time (one frame) is conditioned on that frame, also without a caption."""
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio="tone")
    before = video.read_bytes()
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(run_dir), "--steps", "2", "--no-progress"]
    assert cli_main(["generate", "v.mp4", "--out", ".", "--caption", "dog", *common]) == 1
    assert capsys.readouterr().err.strip() == "error: v.mp4: its output would replace the video itself; give another --out"
    assert video.read_bytes() == before and not (tmp_path / "v.wav").exists()

    blink = media.make_video(tmp_path / "blink.mp4", seconds=0.1, audio=None)  # one frame, 0.1 s
    assert cli_main(["generate", str(blink), "--out", str(tmp_path / "out"), *common]) == 0, capsys.readouterr().err
    wave, rate = soundfile.read(tmp_path / "out" / "blink.wav")
    assert len(wave) == round(0.1 * rate)


def test_the_new_sound_starts_with_the_picture(run_dir, tmp_path, capsys):
    """The input's old audio starts 1.3 s before its picture: the generated track (made on the picture's clock)
    starts where the picture does in the output, not at the file's first timestamp."""
    from tests.test_audio import clicks, write_media

    video = write_media(tmp_path / "late_picture.mkv", clicks(44100, 6.0, 2), 44100, "aac", video_seconds=4.0,
                        video_delay=1.3)
    out = tmp_path / "out"
    assert cli_main(["generate", str(video), "--model", str(run_dir), "--out", str(out), "--steps", "2", "--caption",
                     "dog", "--no-progress"]) == 0, capsys.readouterr().err
    source = {s["codec_type"]: float(s["start_time"]) for s in ffprobe(video)["streams"]}
    assert source["video"] - source["audio"] > 1.25
    starts = {s["codec_type"]: float(s["start_time"]) for s in ffprobe(out / "late_picture.mkv")["streams"]}
    assert starts["video"] == pytest.approx(source["video"], abs=0.01)  # the picture's timing is kept
    # AAC's encoder delay (1024 samples at 16 kHz) is stored as a start 64 ms early: its first samples are not sound
    assert -0.07 <= starts["audio"] - starts["video"] <= 0.005


def test_containers_that_take_no_aac_become_matroska():
    from vta_sam.generate import container_problem, output_paths

    out = Path("out")
    assert output_paths(Path("v/a.mpg"), out, many=True) == (out / "a.mkv", out / "a.wav")
    assert output_paths(Path("v/a.ogv"), out, many=True) == (out / "a.mkv", out / "a.wav")
    assert output_paths(Path("v/a.ts"), out, many=True) == (out / "a.ts", out / "a.wav")  # MPEG-TS takes AAC
    assert container_problem("mpeg2video", Path("x.mpg")) == ".mpg holds no AAC audio: name the output .mkv"
    assert container_problem("mpeg2video", Path("x.mkv")) is None


def test_the_sound_goes_with_the_video_it_was_made_for(run_dir, tmp_path, capsys):
    """An mkv whose first video track is a cover picture: the sound is made from the real video, and the output
    carries that video stream (not the picture)."""
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    covered = media.make_covered(tmp_path / "covered.mkv", video)
    out = tmp_path / "out"
    assert cli_main(["generate", str(covered), "--model", str(run_dir), "--out", str(out), "--steps", "2", "--caption",
                     "dog", "--no-progress"]) == 0, capsys.readouterr().err
    streams = ffprobe(out / "covered.mkv")["streams"]
    assert [s["codec_name"] for s in streams] == ["h264", "aac"]
    assert video_stream_hash(out / "covered.mkv") == video_stream_hash(video)


@pytest.mark.parametrize("caption", ["dog", None])
def test_frames_held_do_not_grow_with_the_videos_length(run_dir, tmp_path, monkeypatch, caption):
    """Every window's frames were decoded and held before the first was encoded (and, without a caption, joined
    into a second copy): a 2-hour video at the paper's frame size would have held about 100 GB. Now at most the
    window batch and the windows kept between passes are alive, whatever the length; the audio is the same as
    from a list of every window's frames."""
    import gc
    import weakref

    import vta_sam.generate as generate_module
    from preprocess.video import DecodedFrames

    decoded_refs: list[weakref.ref[DecodedFrames]] = []
    decode = generate_module.decode_frames

    def tracked(*args, **kwargs):
        decoded = decode(*args, **kwargs)
        decoded_refs.append(weakref.ref(decoded))
        return decoded

    generator = SoundGenerator(GenerateOptions(model=run_dir, device="cpu", steps=2, window_batch=1))
    visual = generator.encoders.visual
    most = []

    def visual_counting(*args, **kwargs):
        gc.collect()
        most.append(sum(ref() is not None for ref in decoded_refs))
        return visual(*args, **kwargs)

    monkeypatch.setattr(generate_module, "decode_frames", tracked)
    monkeypatch.setattr(generator.encoders, "visual", visual_counting)
    video = media.make_video(tmp_path / "long.mp4", seconds=60.0, fps=5, audio=None)
    waveform, explain = generator.audio(video, caption)
    assert len(explain["starts"]) == len(most) == 8  # 60 s in windows of 10.24 s at a hop of 8.24 s: one per batch
    assert max(most) <= 2, most  # the batch's window and the one kept between passes
    assert len(waveform) == round(60.0 * generator.features.sample_rate) and waveform.std() > 1e-3
    assert explain["frames"] == []  # thumbnails only for --explain


def test_the_window_batch_bounds_memory_without_changing_the_audio(run_dir, tmp_path, capsys):
    """A 25 s video has three windows: one at a time or all three together, each window draws its noise from its
    own generator, so the audio is the same; bad values of the numeric options are one line and exit code 2."""
    video = media.make_video(tmp_path / "long.mp4", seconds=25.0, fps=5, audio=None)
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    waves = []
    for batch in ("1", "8"):
        out = tmp_path / f"out{batch}"
        assert cli_main(["generate", str(video), "--out", str(out), "--window-batch", batch, *common]) == 0
        waves.append(soundfile.read(out / "long.wav")[0])
    assert len(waves[0]) == round(25.0 * 16000) and waves[0].std() > 1e-3
    np.testing.assert_allclose(waves[0], waves[1], atol=1e-4)
    capsys.readouterr()
    for flag, value in (("--window-batch", "0"), ("--steps", "0"), ("--overlap", "-1"), ("--overlap", "nan"), ("--overlap", "10.24")):
        assert cli_main(["generate", str(video), "--out", str(tmp_path / "bad"), *common, flag, value]) == 2, (flag, value)
        assert capsys.readouterr().err.startswith(f"error: {flag} must be "), (flag, value)


def test_a_model_that_makes_nan_audio_writes_nothing(run_dir, tmp_path, capsys):
    """Damaged weights (NaN) made a constant full-scale WAV, muxed into the video, and a report of success: the
    audio is now checked before anything is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    for name in ("ema.safetensors", "raw.safetensors"):
        path = damaged / "model" / name
        if path.exists():
            save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                       for k, v in load_file(path).items()}, path)
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    out = tmp_path / "out"
    assert cli_main(["generate", str(video), "--model", str(damaged), "--out", str(out), "--steps", "2",
                     "--caption", "ball", "--no-progress"]) == 1
    assert f"{video}: the model made non-finite audio" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_damaged_run_folder_is_one_line_before_any_memory_is_taken(run_dir, tmp_path, capsys):
    """config.json not a run's config, a truncated weight file, and a config whose sizes the weights do not have
    (here absurd ones: 200000 channels would need hundreds of GB) are one line naming the file; the model is
    checked against the file's header on the meta device before it is built. Before: tracebacks, and an attempt to
    allocate the absurd model."""
    import shutil

    import safetensors.torch

    from train import load_model

    def damaged(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        return copy

    not_config = damaged("list")
    (not_config / "model" / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"config\.json: unreadable \(ValueError: not a run's model config"):
        load_model(not_config)

    truncated = damaged("truncated")
    weights = truncated / "model" / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"ema\.safetensors: unreadable"):
        load_model(truncated)

    huge = damaged("huge")
    config_file = huge / "model" / "config.json"
    config = json.loads(config_file.read_text())
    config["block_channels"] = [200000 * (i + 1) for i in range(len(config["block_channels"]))]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ema\.safetensors: not the weights of the model in .*config\.json") as error:
        load_model(huge)
    assert "\n" not in str(error.value) and "of other shapes" in str(error.value)
    config["block_channels"] = [10**9 * 8] * len(config["block_channels"])  # no tensor that large: torch's RuntimeError
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: describes no buildable model \(RuntimeError: "):
        load_model(huge)

    integers = damaged("integers")  # the right names and shapes, but integer tensors where the weights are float
    weights = integers / "model" / "ema.safetensors"
    state = safetensors.torch.load_file(str(weights))
    state = {name: tensor.round().to(torch.int32) if name.endswith("conv_in.weight") else tensor
             for name, tensor in state.items()}
    safetensors.torch.save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"ema\.safetensors: .*conv_in\.weight is stored as I32, where the model has float"):
        load_model(integers)

    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    assert cli_main(["generate", str(video), "--model", str(huge), "--out", str(tmp_path / "out"), "--steps", "2",
                     "--caption", "ball", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "describes no buildable model (RuntimeError: " in err and "Traceback" not in err


def test_encoders_other_than_the_ones_stage_one_used_are_refused(run_dir, tmp_path, capsys):
    """The run records the checksums of the checkpoints its features came from (model/features.json): a CLIP,
    Grounding DINO or VAE of the same shapes but other weights loaded silently and conditioned the model on
    features unlike its training's. Here the record says another CLIP than the one this run's models are."""
    import shutil

    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    features = other / "model" / "features.json"
    meta = json.loads(features.read_text())
    meta["models"]["clip"]["checksum"] = "0" * 64
    features.write_text(json.dumps(meta))
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    assert cli_main(["generate", str(video), "--model", str(other), "--out", str(tmp_path / "out"), "--steps", "2",
                     "--caption", "ball", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert f"{features}: the model was trained on clip features of checkpoint 000000000000..." in err
    assert "Traceback" not in err


def test_files_of_the_users_in_the_output_folder_are_never_overwritten(run_dir, tmp_path, capsys):
    """Only both outputs of a video mark it done; a lone copy with sound, or a WAV this command did not write
    (its INFO chunk says so), is someone else's file: that video fails in one line and the file is left as it was.
    A WAV of an interrupted run of this command (written, not yet muxed) is made again."""
    import hashlib

    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    out = tmp_path / "out"
    out.mkdir()
    first, second, third = (media.make_video(tmp_path / f"{name}.mp4", seconds=2.0, audio=None) for name in "abc")
    (out / "a.mp4").write_bytes(b"the user's own video")
    soundfile.write(out / "b.wav", np.zeros(1600), 16000)  # the user's own WAV
    digest = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("a.mp4", "b.wav")}
    assert cli_main(["generate", str(first), str(second), str(third), "--out", str(out), *common]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {first}: {out / 'a.mp4'} exists and is not from an earlier run of this command (no a.wav "
                      "beside it); move it or give another --out",
                      f"error: {second}: {out / 'b.wav'} exists and was not written by this command; move it or give "
                      "another --out"]
    assert {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in digest} == digest
    assert (out / "c.mp4").exists() and (out / "c.wav").exists()
    (out / "c.mp4").unlink()  # as a run killed between writing the WAV and muxing leaves it
    assert cli_main(["generate", str(third), "--out", str(out), *common]) == 0
    assert (out / "c.mp4").exists()


def test_bad_device_guidance_and_still_images_are_one_line(run_dir, tmp_path, capsys):
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress", "--out", str(tmp_path / "o")]
    assert cli_main(["generate", str(video), *common, "--device", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device 'bogus': ") and "\n" not in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert cli_main(["generate", str(video), *common, "--device", "cuda"]) == 2
        assert capsys.readouterr().err.strip() == "error: --device 'cuda': no CUDA device is available here"
    assert cli_main(["generate", str(video), *common, "--guidance", "nan"]) == 2
    assert capsys.readouterr().err.strip() == "error: --guidance must be a finite number (got nan)"
    image = tmp_path / "still.png"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=64x48", "-frames:v", "1", str(image)],
                   check=True)
    assert cli_main(["generate", str(image), *common]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {image}: a still image (png_pipe), not a video" and not (tmp_path / "o" / "still.wav").exists()


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True, capture_output=True)


def test_odd_inputs_get_sound_of_their_length_and_a_crash_fails_one_video_only(run_dir, tmp_path, capsys, monkeypatch):
    """An MPEG-1 elementary stream (FFmpeg guesses 0.01 s from its bit rate) and a raw H.264 stream named .mp4 (no
    timestamps: 'zero duration') get sound of their real length; VP8 in a file named .mp4 is written as Matroska
    (found by a trial mux before any sound is made, not after); a relative name with a colon opens (FFmpeg read it
    as a protocol); AVI gets PCM (AAC would start 64 ms late there); the same file named twice is done once; and a
    failure no check foresaw (here: a ZeroDivisionError, as an animated WebP's 0x0 size gave) fails its video in
    one line while the videos after it still get sound."""
    import vta_sam.generate as generate

    lavfi = ["-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-t", "3"]
    _ffmpeg(*lavfi, "-c:v", "mpeg1video", "-f", "mpeg1video", str(tmp_path / "elementary.mpg"))
    _ffmpeg(*lavfi, "-c:v", "libx264", "-f", "h264", str(tmp_path / "raw.mp4"))
    _ffmpeg(*lavfi, "-c:v", "libvpx", "-f", "matroska", str(tmp_path / "vp8.mp4"))
    _ffmpeg(*lavfi, "-c:v", "mjpeg", str(tmp_path / "m.avi"))
    media.make_video(tmp_path / "a:b.mp4", seconds=2.0, audio=None)
    crash, after = (media.make_video(tmp_path / f"{name}.mp4", seconds=2.0, audio=None) for name in ("crash", "zafter"))
    real_probe = generate.probe_video

    def probe(path):
        if Path(path).name == "crash.mp4":
            raise ZeroDivisionError("division by zero")
        return real_probe(path)

    monkeypatch.setattr(generate, "probe_video", probe)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    names = ["elementary.mpg", "raw.mp4", "vp8.mp4", "m.avi", "a:b.mp4", "./a:b.mp4", "crash.mp4", "zafter.mp4"]
    assert cli_main(["generate", *names, "--model", str(run_dir), "--out", str(out), "--steps", "2", "--caption",
                     "dog", "--no-progress"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == ["error: crash.mp4: failed unexpectedly (ZeroDivisionError: division by zero)"], captured.err
    assert f"note: vp8.mp4: .mp4 cannot hold its vp8 video; writing {out / 'vp8.mkv'}" in captured.err
    assert "6 of 7 videos have sound" in captured.out
    for name in ("elementary", "raw", "vp8"):
        assert soundfile.info(out / f"{name}.wav").duration == pytest.approx(3.0, abs=0.01), name
    assert (out / "elementary.mkv").exists() and (out / "vp8.mkv").exists() and not (out / "vp8.mp4").exists()
    assert (out / "a:b.mp4").exists() and (out / "zafter.mp4").exists() and not (out / "crash.wav").exists()
    audio = next(s for s in ffprobe(out / "m.avi")["streams"] if s["codec_type"] == "audio")
    assert audio["codec_name"] == "pcm_s16le"


def test_more_steps_than_the_model_was_trained_with_is_refused(run_dir, tmp_path, capsys):
    """DPM-Solver++ (the default sampler here) at --steps 5000 visited each of the 1000 timesteps five times."""
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    assert cli_main(["generate", str(video), "--model", str(run_dir), "--out", str(tmp_path / "o"), "--steps", "5000",
                     "--caption", "dog", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --steps 5000: the model was trained with 1000 timesteps; a "
                                               "sampler visits at most that many")
    assert not (tmp_path / "o").exists()


def test_outputs_and_options_that_cannot_work_are_refused_before_any_model(run_dir, tmp_path, capsys):
    """Both outputs there but not this command's were taken for finished work (and a user's <stem>.partial.mp4
    was overwritten by the copy on its way to its name); --out x.wav made a folder x.wav;
    --overlap near a window's length made a window every few frames (hours); a file as --out for several videos
    failed each video with 'File exists'."""
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "v.mp4").write_text("USER")
    (out / "v.wav").write_text("USER")
    assert cli_main(["generate", str(video), "--out", str(out), *common]) == 1
    assert f"error: {video}: {out / 'v.wav'} exists and was not written by this command" in capsys.readouterr().err
    assert (out / "v.mp4").read_text() == "USER"
    (out / "w.check.mp4").write_text("USER")  # a name a trial mux once used for its scratch copy
    (out / "w.partial.mp4").write_text("USER")  # the name the copy was once written into before its rename
    (tmp_path / "a_file").write_text("notes")
    other = media.make_video(tmp_path / "w.mp4", seconds=2.0, audio=None)
    for videos, flags, message in (([video], ["--out", str(tmp_path / "x.wav")], "give a video file name or a folder"),
                                   ([video], ["--out", str(out), "--overlap", "6"], "--overlap must be at most half a window (5.12 s"),
                                   ([video, other], ["--out", str(tmp_path / "a_file")], "a file, not a folder (with several videos")):
        assert cli_main(["generate", *map(str, videos), *flags, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --") and message in err and "\n" not in err, err
    assert not (tmp_path / "x.wav").exists() and (tmp_path / "a_file").read_text() == "notes"
    assert cli_main(["generate", str(other), "--out", str(out), *common]) == 0
    assert (out / "w.check.mp4").read_text() == "USER" and (out / "w.mp4").exists()
    assert (out / "w.partial.mp4").read_text() == "USER"
    assert sorted(p.name for p in out.iterdir()) == ["v.mp4", "v.wav", "w.check.mp4", "w.mp4", "w.partial.mp4", "w.wav"]


def test_sigterm_stops_as_ctrl_c_does_and_leaves_no_scratch_folder(run_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM (a job's time limit, `timeout`) killed the command at once: its scratch folder stayed in the
    temporary folder."""
    import signal
    import tempfile

    import vta_sam.generate as generate

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    video = media.make_video(tmp_path / "a.mp4", seconds=2.0, audio=None)
    real_mux = generate.mux

    def terminated(video, wav, target, *args, **kwargs):
        if not kwargs.get("first_frame_only"):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_mux(video, wav, target, *args, **kwargs)

    monkeypatch.setattr(generate, "mux", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert cli_main(["generate", str(video), "--out", str(tmp_path / "out"), "--model", str(run_dir), "--steps", "2",
                     "--caption", "dog", "--no-progress"]) == 130
    assert "interrupted: run the same command again to go on" in capsys.readouterr().err
    assert list((tmp_path / "tmp").iterdir()) == [] and signal.getsignal(signal.SIGTERM) is handler


def test_ctrl_c_is_exit_130_with_how_to_go_on_and_no_partial_file(run_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C was a KeyboardInterrupt traceback and exit 1; the same command goes on where it stopped."""
    import vta_sam.generate as generate

    videos = [media.make_video(tmp_path / f"{name}.mp4", seconds=2.0, audio=None) for name in ("a", "b")]
    common = ["--model", str(run_dir), "--steps", "2", "--caption", "dog", "--no-progress"]
    out = tmp_path / "out"
    real_mux = generate.mux

    def interrupted(video, wav, target, *args, **kwargs):
        if Path(video).name == "b.mp4" and not kwargs.get("first_frame_only"):
            raise KeyboardInterrupt
        return real_mux(video, wav, target, *args, **kwargs)

    monkeypatch.setattr(generate, "mux", interrupted)
    assert cli_main(["generate", *map(str, videos), "--out", str(out), *common]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted: run the same command again to go on" in err
    assert (out / "a.mp4").exists() and not (out / "b.mp4").exists()
    monkeypatch.setattr(generate, "mux", real_mux)
    assert cli_main(["generate", *map(str, videos), "--out", str(out), *common]) == 0
    assert (out / "b.mp4").exists() and not list(out.glob("*.partial*"))


def test_a_killed_runs_partial_copy_is_removed_and_a_live_ones_kept(tmp_path):
    """SIGKILL while ffmpeg wrote the copy left `.<stem>.<random>.partial.mp4`, a copy of the whole video stream,
    and the next run made a new one beside it. Its name now carries the writer's pid: the next run removes copies
    whose process is gone, never a live one's or a file of the user's."""
    import subprocess as sp

    from vta_sam.generate import remove_dead_partials

    dead = sp.Popen(["true"])
    dead.wait()
    killed = tmp_path / f".clip.{dead.pid}-0123456789ab.partial.mp4"
    live = tmp_path / f".clip.{os.getpid()}-0123456789ab.partial.mp4"
    user = tmp_path / ".clip.partial.mp4"
    other = tmp_path / f".other.{dead.pid}-0123456789ab.partial.wav"
    for path in (killed, live, user, other):
        path.write_bytes(b"x")
    assert sorted(remove_dead_partials(tmp_path)) == sorted([killed, other])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, user))


def test_the_wav_is_written_under_a_name_of_this_process_own(run_dir, tmp_path, capsys):
    """Two runs given one output folder (one per GPU, say) both wrote `<stem>.wav.tmp`: the second truncated the
    first's file while it was renamed, and its own rename then failed. The WAV now goes through a hidden partial
    name of the writer's own, as the video copy does; a killed run's partial WAV is removed by the next run, a
    live one's is kept."""
    import subprocess as sp

    video = media.make_video(tmp_path / "a.mp4", seconds=2.0, audio=None)
    out = tmp_path / "out"
    out.mkdir()
    dead = sp.Popen(["true"])
    dead.wait()
    killed = out / f".a.{dead.pid}-0123456789ab.partial.wav"
    live = out / f".a.{os.getppid()}-0123456789ab.partial.wav"
    other = out / "a.wav.tmp"  # what another writer of the same WAV used to be writing
    for path in (killed, live, other):
        path.write_bytes(b"OTHER")
    assert cli_main(["generate", str(video), "--out", str(out), "--model", str(run_dir), "--steps", "2",
                     "--caption", "dog", "--no-progress"]) == 0
    assert other.read_bytes() == b"OTHER" and live.read_bytes() == b"OTHER" and not killed.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.mp4", "a.wav", other.name, live.name])


def test_a_model_missing_from_the_weights_folder_is_one_line(run_dir, tmp_path, capsys):
    """A run whose features came from real checkpoints, given a weights folder without CLIP (or no weights folder
    at all): the message was right but came after a 21-line traceback, with exit 1; the VAE's absence was already
    one line."""

    run = run_with_features(run_dir, tmp_path, random_init=False)
    (tmp_path / "weights").mkdir()
    video = media.make_video(tmp_path / "v.mp4", seconds=2.0, audio=None)
    assert cli_main(["generate", str(video), "--model", str(run), "--out", str(tmp_path / "out"), "--steps", "2",
                     "--caption", "ball", "--weights", str(tmp_path / "weights"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [line for line in err.splitlines()
                                                                  if line.startswith("error: ")]
    assert "CLIP" in err and str(tmp_path / "weights") in err
