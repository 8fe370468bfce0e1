"""`vta-sam generate VIDEO...`: add synchronized sound to any video.

Each video is cut into 10.24 s windows (overlapping when it is longer; one window of its own length when
shorter). Every window goes through stage one's own feature code (decoding, CLIP, nouns, Grounding DINO/SAM),
the trained model samples a latent, and the audio models' decoder (AudioLDM VAE + HiFi-GAN, `audio_models`) turns it into audio.
Windows are joined with equal-power crossfades, the audio is cut to the video's duration, and a copy of the
video is written with the video stream copied bit for bit and the new audio as AAC, plus the WAV.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from tqdm import tqdm

import shards
from common.config import path_argument
from common.devices import PRECISIONS, resolve_device, resolve_precision, tune_backends
from common.ffmpeg import error_reason, file_url
from common.lock import alive
from preprocess.config import FeatureConfig
from preprocess.manifest import VIDEO_SUFFIXES
from preprocess.nouns import NounCache, TaggerUnavailableError, caption_nouns
from preprocess.video import (
    JUMPING_FORMATS,
    DecodedFrames,
    VideoDecodeError,
    decode_frames,
    is_still_image,
    jump_problem,
    probe_video,
    reading_windows,
    timestamp_jump,
)
from train.diffusion import steps_problem
from train.speed import lower_precision_weights, sampling_channels_last, speed_up

VOCABULARY_FILE = Path(__file__).resolve().parents[1] / "preprocess" / "assets" / "vggsound_labels.txt"
# a video whose frames end this much before the container's duration is cut there (below a frame interval even at 240
# fps, and far above the rounding of timestamps: decord's are float32)
END_TOLERANCE = 0.004
NOUN_CHUNK = 16  # vocabulary nouns per Grounding DINO prompt (its text encoder takes 256 tokens at most)


def shortlist_size(max_nouns: int) -> int:
    """Vocabulary nouns CLIP shortlists for grounding: twice the nouns kept (the detector gets to overrule CLIP's
    ranking), at least one, and at most one prompt's worth so that grounding is a single pass per frame batch."""
    return max(1, min(max_nouns * 2, NOUN_CHUNK))


class GenerateError(RuntimeError):
    """One video could not be given sound; the message is one line naming the file and the reason."""


@dataclass(frozen=True)
class GenerateOptions:
    model: Path = Path("runs/demo")
    out: Path = Path("generated")
    caption: str | None = None
    seed: int = 0
    steps: int = 25
    guidance: float = 3.0
    sampler: str = "dpmsolver++"
    overlap: float = 2.0
    weights: Path = Path("weights")
    device: str = "auto"
    precision: str = "auto"  # the UNet's while sampling (common.devices): bf16 on CUDA, fp32 on the CPU
    compile: bool = False
    cuda_graphs: bool = True  # on CUDA: the guided sampler step replayed from a CUDA graph (train.denoiser)
    explain: bool = False
    ground_all: bool = False  # without a caption: ground the whole vocabulary instead of CLIP's shortlist (slow)
    window_batch: int = 8  # windows encoded, sampled and decoded together: bounds the memory a long video needs


# ----------------------------------------------------------------------------------- pure helpers
def window_starts(duration: float, window: float, overlap: float) -> list[float]:
    """Starts of the windows covering [0, duration): hop = window - overlap, the last one ends at the end."""
    if duration <= window:
        return [0.0]
    hop = window - overlap
    starts = [i * hop for i in range(math.ceil((duration - window) / hop))]
    return starts + [duration - window]


def join_windows(pieces: list[np.ndarray], starts: list[float], total: int, sample_rate: int) -> np.ndarray:
    """Place each window's audio at its start; where two overlap, an equal-power crossfade (cos/sin ramps keep
    the power of two uncorrelated signals constant) so that no click or level dip marks the seam."""
    out = np.zeros(total, np.float32)
    end_previous = 0
    for piece, start_seconds in zip(pieces, starts):
        start = round(start_seconds * sample_rate)
        piece = piece[: max(0, total - start)].astype(np.float32)
        overlap = max(0, min(end_previous - start, len(piece)))
        if overlap:
            ramp = np.linspace(0.0, np.pi / 2, overlap, dtype=np.float32)
            out[start : start + overlap] *= np.cos(ramp)
            piece = piece.copy()
            piece[:overlap] *= np.sin(ramp)
        out[start : start + len(piece)] += piece
        end_previous = start + len(piece)
    return out


def vocabulary(tagger: str) -> list[str]:
    """Objects to ground when a video comes without a caption: the distinct nouns of VGGSound's 309 class labels.

    Every label is in the reviewed table (preprocess/assets/vggsound_label_nouns.tsv), so `caption_nouns` takes
    them from there; `tagger` would only tag a label missing from it.
    """
    nouns: list[str] = []
    for label in VOCABULARY_FILE.read_text(encoding="utf-8").splitlines():
        nouns.extend(n for n in caption_nouns(label, tagger) if n not in nouns)
    return nouns


def best_similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """(V,): each text's cosine similarity to the image most like it (L2-normalised embeddings)."""
    images = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    texts = torch.nn.functional.normalize(text_embeddings.float(), dim=-1)
    return (texts @ images.T).amax(1)


def highest(scores: torch.Tensor, size: int) -> list[int]:
    """Indices (ascending) of the `size` highest of (V,) scores (all of them when there are fewer)."""
    return sorted(scores.topk(min(size, len(scores))).indices.tolist())


def shortlist(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, size: int) -> list[int]:
    """Indices (ascending) of the `size` texts most similar to any of the images: cosine similarity of the
    L2-normalised embeddings, each text scored by its best frame (an object seen in one frame counts)."""
    return highest(best_similarity(image_embeddings, text_embeddings), size)


class Windows:
    """A video's windows, decoded as they are needed: iterating gives (index, start, frames) in order, and may be
    repeated (the caption-free path reads the frames three times: CLIP's shortlist, the grounding of its nouns,
    the features). The frames of at most `keep` windows are held between passes; the others are decoded again,
    so memory does not grow with the video's length.

    The first pass lays the windows out. `duration` comes in as the container's claim, which can be more than the
    file holds: a download cut short after an intact mp4 header still announces every frame, and a container's
    duration can be its longer audio track's. The first window whose frames end before it should tells the real
    end; the windows not yet given are then laid out again over that length (`starts`, `duration`: final once a
    pass has ended), so no audio is made for seconds without a picture. A video shorter than the first sampling
    time (half a frame slot) gets its first frame in the first slot."""

    def __init__(self, video: Path, duration: float, cfg: FeatureConfig, overlap: float, keep: int = 0):
        self.video, self.duration, self.cfg, self.overlap, self.keep = video, duration, cfg, overlap, keep
        self.starts: list[float] = []
        self.planned = False
        self.kept: dict[float, DecodedFrames] = {}

    def _decode(self, start: float) -> DecodedFrames:
        cfg = self.cfg
        decoded = decode_frames(self.video, start, cfg.frame_times(), cfg.window_seconds, cfg.frame_short_side)
        if not len(decoded.frames):  # shorter than the first sampling time: its first frame stands in
            decoded = decode_frames(self.video, start, [0.0], cfg.window_seconds, cfg.frame_short_side)
        return decoded

    def _given(self, start: float, decoded: DecodedFrames) -> DecodedFrames:
        if len(self.kept) < self.keep:
            self.kept[start] = decoded
        return decoded

    def __iter__(self) -> Iterator[tuple[int, float, DecodedFrames]]:
        if self.planned:
            for index, start in enumerate(self.starts):
                yield index, start, self.kept.get(start) or self._decode(start)
            return
        window, duration = self.cfg.window_seconds, self.duration
        given: list[float] = []
        early: dict[float, DecodedFrames] = {}  # a window that ended early, kept in case the new layout keeps it
        while True:
            # the windows already given keep their places: the frames reached their ends
            todo = [start for start in window_starts(duration, window, self.overlap)
                    if not given or start > given[-1] + END_TOLERANCE]
            for start in todo:
                decoded = early.pop(start, None) or self._decode(start)
                end = start + decoded.duration
                if end < min(start + window, duration) - END_TOLERANCE:  # the frames stop at `end`
                    early[start] = decoded
                    duration = end
                    break
                given.append(start)
                yield len(given) - 1, start, self._given(start, decoded)
            else:
                self.starts, self.duration, self.planned = given, duration, True
                return


def features_meta(run: Path, train_config: Any) -> tuple[Path, dict[str, Any]]:
    """The stage-one meta.json the model was trained on (its config and its models' checksums): the run's copy,
    model/features.json, else the shards' meta.json; with the file it came from."""
    for path in (run / "model" / "features.json", Path(train_config.shards) / shards.META_FILE):
        if path.is_file():
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
                    raise ValueError("no 'config' object")
            except (OSError, ValueError) as error:
                raise GenerateError(f"{path}: unreadable ({error})") from None
            return path, meta
    raise GenerateError(f"{run}: cannot find the stage-one configuration (model/features.json or the shards' meta.json)")


def feature_config(path: Path, meta: dict[str, Any]) -> FeatureConfig:
    """The stage-one config of a `features_meta` (read from `path`)."""
    try:
        return FeatureConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as error:
        raise GenerateError(f"{path}: unreadable config ({error})") from None


def check_checkpoints(meta: dict[str, Any], found: dict[str, str], source: Path, weights: Path | None,
                      configs: dict[str, str | None] | None = None) -> None:
    """GenerateError unless each model checksum stage one recorded (`meta.json`'s models) is the one loaded here:
    another CLIP, Grounding DINO/SAM or VAE of the same shapes would load and give the model conditions (or
    latents decoded) unlike those it was trained on, with no error anywhere else. `configs`: the checksums of the
    loaded models' config, preprocessor and tokenizer files, compared where stage one recorded them (a config.json
    that changes an activation function changes the features as much)."""
    where = f"the weights in {weights}" if weights is not None else "this run's random-init models"
    for name, checksum in found.items():
        recorded = shards.recorded_model(meta, name)
        want = recorded.get("checksum")
        if want is not None and want != checksum:
            raise GenerateError(f"{source}: the model was trained on {name} features of checkpoint {str(want)[:12]}..., "
                                f"but {where} hold {checksum[:12]}...: give the --weights folder stage one used")
        if configs is not None and name in configs and shards.config_differs(recorded, configs[name]):
            raise GenerateError(f"{source}: the model was trained on {name} features made with other config, "
                                f"preprocessor or tokenizer files than {where} hold (same weights): give the --weights "
                                "folder stage one used")


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".oga", ".opus", ".wma")  # not a video's name
WEBM_VIDEO_CODECS = ("vp8", "vp9", "av1")  # all that WebM holds, with Opus or Vorbis audio
# containers that take no AAC: an input in one of them gets its copy with sound as Matroska
NO_AAC_SUFFIXES = (".mpg", ".mpeg", ".ogv", ".wmv")
# animated pictures: their muxers take no sound, and a one-frame trial copy through the image muxer passes where
# the whole copy fails ("Cannot write more than one file with the same name"), after the sound was made
PICTURE_SUFFIXES = (".gif", ".png", ".apng", ".webp")


def container_problem(codec: str, out: Path) -> str | None:
    """Why `out` cannot hold a copy of a video stream of `codec` (checked before any sound is made), else None."""
    suffix = out.suffix.lower()
    if suffix == ".webm" and codec not in WEBM_VIDEO_CODECS:
        return f"WebM holds only {', '.join(WEBM_VIDEO_CODECS)} video and this video is {codec}: name the output .mkv or .mp4"
    if suffix in NO_AAC_SUFFIXES:
        return f"{suffix} holds no AAC audio: name the output .mkv"
    return None


def partial_path(out: Path) -> Path:
    """A hidden name of this process's own beside `out` (`.<stem>.<pid>-<random>.partial<suffix>`), where `out` is
    written before it is renamed over `out`: two runs given one output folder never write into one file."""
    return out.with_name(f".{out.stem}.{os.getpid()}-{secrets.token_hex(6)}.partial{out.suffix}")


PARTIAL = re.compile(r"\..+\.(\d+)-[0-9a-f]{12}\.partial\.[^.]+")  # `partial_path`'s names


def remove_dead_partials(folder: Path) -> list[Path]:
    """Delete the partial outputs in `folder` (`partial_path`'s) whose process is gone: a run killed while ffmpeg
    wrote (SIGKILL: no cleanup ran) left a copy of the whole video stream, or a WAV. A live process's file is left
    alone. Once per run and folder (a folder of thousands of outputs is listed once, not once per video)."""
    removed = []
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            found = PARTIAL.fullmatch(path.name)
            if found and path.is_file() and not alive(int(found[1])):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def mux(video: Path, wav: Path, out: Path, video_start: float = 0.0, stream: int | None = None,
        first_frame_only: bool = False, rotation: int = 0, mirrored: bool = False) -> None:
    """Copy the video stream bit for bit, replace every audio track by `wav`: AAC, or Opus in WebM. The WAV starts
    with the first frame, whose timestamp is `video_start` (`probe_video`'s start): the input's timestamps are kept
    (-copyts) and the WAV's are moved to the picture's, so the two stay together also where the old audio
    started before the picture. `stream`: the index of the video stream to copy (`probe_video`'s index, the one
    the sound was made for), else the first. `first_frame_only`: a trial that writes (beside `wav`, a scratch
    folder's file) and deletes a copy of the first frame, to learn before any sound is made whether the container
    takes the stream (GenerateError if not), and, given the video's `rotation` and `mirrored` (`probe_video`'s),
    whether the copy keeps them (ffmpeg 5 writes no display matrix into Matroska, WebM, AVI or MPEG-TS: the copy
    would play turned or mirrored).
    Audio: AAC; Opus in WebM; 16-bit PCM in AVI, which cannot mark AAC's priming samples."""
    # a trial writes beside its WAV (a scratch folder); the copy into a hidden file of a random name beside `out`
    # (ffmpeg makes it with the user's umask), renamed over `out` when whole: never into a file of the user's
    tmp = wav.parent / f"trial{out.suffix}" if first_frame_only else partial_path(out)
    suffix = out.suffix.lower()
    # AVI cannot mark AAC's priming samples to be skipped (the sound would start 64 ms late): PCM there
    audio = (["-c:a", "libopus", "-b:a", "192k"] if suffix == ".webm" else ["-c:a", "pcm_s16le"] if suffix == ".avi"
             else ["-c:a", "aac", "-b:a", "192k"])
    command = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-copyts", "-fflags", "+genpts", "-i", file_url(video), "-itsoffset",
               f"{video_start:.6f}", "-i", file_url(wav), "-map", "0:v:0" if stream is None else f"0:{stream}", "-map", "1:a:0",
               "-c:v", "copy", *audio]
    command += ["-movflags", "+faststart"] if suffix in {".mp4", ".mov", ".m4v"} else []
    command += ["-frames:v", "1"] if first_frame_only else []
    try:
        result = subprocess.run([*command, file_url(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            raise GenerateError(f"{video}: cannot write {out} ({error_reason(result.stderr)})")
        if first_frame_only and (rotation or mirrored) and _turns(tmp) not in (None, (rotation, mirrored)):
            lost = f"{rotation}° rotation and play turned" if rotation and not mirrored else "mirroring and play mirrored"
            raise GenerateError(f"{video}: cannot write {out} (a {out.suffix} copy would lose the video's {lost}: name "
                                "the output .mp4 or .mov)")
        if not first_frame_only:
            tmp.replace(out)
    except BaseException:  # Ctrl-C or SIGTERM (ffmpeg got it too), ffmpeg's failure: its partial file goes
        tmp.unlink(missing_ok=True)
        raise
    if first_frame_only:
        tmp.unlink(missing_ok=True)


def _turns(video: Path) -> tuple[int, bool] | None:
    """`probe_video`'s (rotation, mirrored) of a file, None when it cannot tell."""
    try:
        probe = probe_video(video)
    except VideoDecodeError:
        return None
    return int(probe["rotation"]), bool(probe["mirrored"])


def writable_container(video: Path, out_video: Path, out_wav: Path, probe: dict[str, Any], silence: Path,
                       named: bool) -> Path:
    """Where the copy with sound goes, once a trial mux of the first frame (`mux(first_frame_only=True)`, with the
    short WAV `silence`) shows that its container takes the video stream: `out_video`, or, for a name taken from
    the input's (VP8 or Theora in a file named .mp4, ProRes in .mov as .mp4...), the same name as Matroska, which
    takes nearly every codec, else as MP4, which takes a raw stream without timestamps (said in a note).
    GenerateError with the first trial's reason, before any sound is made, when none does, or when the user named
    the output file (`named`)."""
    try:
        mux(video, silence, out_video, probe["start"], probe["index"], first_frame_only=True, rotation=probe["rotation"],
            mirrored=probe["mirrored"])
        return out_video
    except GenerateError as error:
        if named:
            raise
        first = error
    # Matroska takes nearly every codec; MP4 takes a raw stream without timestamps, which Matroska refuses
    for fallback in (out_video.with_suffix(suffix) for suffix in (".mkv", ".mp4") if suffix != out_video.suffix.lower()):
        if foreign_output(fallback, out_wav):
            continue
        try:
            mux(video, silence, fallback, probe["start"], probe["index"], first_frame_only=True,
                rotation=probe["rotation"], mirrored=probe["mirrored"])
        except GenerateError:
            continue
        tqdm.write(f"note: {video}: {out_video.suffix} cannot hold its {probe['codec']} video"
                   f"{' with its rotation' if probe['rotation'] or probe['mirrored'] else ''}; writing {fallback}",
                   file=sys.stderr)
        return fallback
    raise first


WAV_SOFTWARE = "vta-sam generate"  # written into each WAV's INFO chunk: what marks a WAV as this command's


def foreign_output(out_video: Path, out_wav: Path) -> str | None:
    """Why an output path holds a file this command must not overwrite (None: free, or its own unfinished work).
    The WAV is written first and carries WAV_SOFTWARE, then the copy with sound: so a WAV without that mark, or a
    copy without its WAV beside it, is someone else's file."""
    if out_video.exists() and not out_wav.exists():
        return f"{out_video} exists and is not from an earlier run of this command (no {out_wav.name} beside it)"
    if out_wav.exists():
        try:
            with soundfile.SoundFile(out_wav) as existing:
                ours = existing.software.startswith(WAV_SOFTWARE)
        except (soundfile.SoundFileError, RuntimeError, OSError):
            ours = False
        if not ours:
            return f"{out_wav} exists and was not written by this command"
    return None


def output_paths(video: Path, out: Path, many: bool) -> tuple[Path, Path]:
    """(video with sound, wav). `--out` is a folder, or with one input a file name ending in a video suffix.
    The copy keeps the input's container, except WebM (whose audio must be Vorbis/Opus), animated pictures (GIF,
    APNG, WebP) and those that take no AAC (MPEG program streams, Ogg, ASF): Matroska instead."""
    if not many and out.suffix.lower() in VIDEO_SUFFIXES:
        return out, out.with_suffix(".wav")
    suffix = ".mkv" if video.suffix.lower() in (".webm", *PICTURE_SUFFIXES, *NO_AAC_SUFFIXES) else video.suffix.lower()
    return out / f"{video.stem}{suffix}", out / f"{video.stem}.wav"


# ----------------------------------------------------------------------------------- the generator
class SoundGenerator:
    """Loads the trained model, stage one's visual encoders and the AudioLDM decoder once; then video -> audio."""

    def __init__(self, options: GenerateOptions):
        import train
        from audio_models.decoder import Decoder
        from preprocess.pipeline import Encoders

        self.options = options
        try:
            self.model, self.train_config = train.load_model(options.model)
        except FileNotFoundError as error:
            raise GenerateError(f"{error} (train a model first: make train)") from None
        except ValueError as error:  # a damaged run folder: one line naming the file
            raise GenerateError(str(error)) from None
        problem = steps_problem(self.train_config, options.steps)
        if problem:
            raise GenerateError(f"--steps {options.steps}: {problem}")
        source, meta = features_meta(Path(options.model), self.train_config)
        # compiling the detector was a speed choice of stage one's machine (minutes per shape): not for a few videos
        self.features = feature_config(source, meta).replace(device=options.device, compile=False)
        from eval.generate import spec_differences

        differs = spec_differences(self.model.spec, self.features.shard_spec())
        if differs:  # e.g. the shards' meta.json of a run without features.json, remade since with other settings
            raise GenerateError(f"{source}: the model was trained on other features ({', '.join(differs)}, trained vs "
                                "this file): give the model's own stage-one settings")
        try:
            device = resolve_device(self.features.device)
        except ValueError as error:
            raise GenerateError(f"--{error}") from None  # as stage one and evaluation say it
        try:
            self.precision = resolve_precision(options.precision, device)
        except ValueError as error:
            raise GenerateError(str(error)) from None
        tune_backends(device)
        # this model only samples, always under autocast to `precision`: its matmul weights are cast once
        lower_precision_weights(self.model.to(device), self.precision)
        speed_up(self.model, sampling_channels_last(True, device), options.compile, dynamic=None)  # windows per video vary
        weights = None if self.features.random_init else options.weights
        try:
            self.encoders = Encoders(self.features, weights, device, audio=False)
        except FileNotFoundError as error:  # a model missing from the weights folder (or no weights folder)
            raise GenerateError(str(error).splitlines()[0]) from None
        except ValueError as error:
            from preprocess.deformable import KernelError

            if not isinstance(error, KernelError):
                raise GenerateError(str(error)) from None  # a checkpoint the loaders refuse: one line naming it
            # how stage one sampled Grounding DINO's deformable attention is a speed choice of its machine (the
            # fused kernel gives the PyTorch path's numbers up to float16 rounding): here, what this one runs
            print(f"warning: {error.reason}; grounding with the PyTorch path", file=sys.stderr)
            self.features = self.features.replace(deformable_attention="pytorch")
            self.encoders = Encoders(self.features, weights, device, audio=False)
        try:
            self.decoder = Decoder(self.features.audio_models(), weights, device, self.train_config.vae_scaling_factor)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise GenerateError(str(error).splitlines()[0]) from None
        check_checkpoints(meta, {**self.encoders.checksums, "vae": self.decoder.checksum}, source, weights,
                          {**self.encoders.config_checksums, "vae": self.decoder.vae.config_checksum})
        try:  # the tagger only for a caption that needs it (without one, the nouns are VGGSound labels')
            self.nouns = NounCache(self.features.tagger, self.features.max_nouns,
                                   [options.caption] if options.caption else [])
        except TaggerUnavailableError as error:
            raise GenerateError(str(error)) from None
        self.vocabulary = vocabulary(self.features.tagger)
        self._vocabulary_embeddings: torch.Tensor | None = None  # (V, D) CLIP text embeddings, computed on first use
        self.device = device

    def vocabulary_embeddings(self) -> torch.Tensor:
        """The vocabulary nouns' CLIP text embeddings, encoded once per generator (i.e. once per process)."""
        if self._vocabulary_embeddings is None:
            self._vocabulary_embeddings = self.encoders.clip_encoder.encode_texts(self.vocabulary).float().cpu()
        return self._vocabulary_embeddings

    def _nouns(self, windows: Iterable[np.ndarray]) -> tuple[list[str], str]:
        """Without a caption: CLIP shortlists the `shortlist_size` vocabulary nouns most similar to the video's
        frames, Grounding DINO grounds them in one prompt (one pass per frame batch), and the max_nouns nouns seen
        with the highest probability are kept; the caption becomes their list. With `ground_all` the whole
        vocabulary is grounded instead, NOUN_CHUNK nouns per prompt. `windows`: each window's frames, read once per
        pass (a list, or a video's `Windows` read window by window), so only the best score of each noun is held."""
        if self.options.ground_all:
            candidates = self.vocabulary
        else:
            similar = None
            for frames in windows:
                best = best_similarity(self.encoders.clip_encoder.encode_frames(torch.from_numpy(frames)),
                                       self.vocabulary_embeddings())
                similar = best if similar is None else torch.maximum(similar, best)
            assert similar is not None, "a video has at least one window"
            candidates = [self.vocabulary[i] for i in highest(similar, shortlist_size(self.features.max_nouns))]
        chunks = [candidates[i : i + NOUN_CHUNK] for i in range(0, len(candidates), NOUN_CHUNK)]
        seen = None
        for frames in windows:
            every = torch.from_numpy(frames)
            probabilities = self.encoders.grounder.probabilities([every] * len(chunks), chunks)
            best = torch.cat([p.amax(0) for p in probabilities])  # (C,): highest probability over the frames
            seen = best if seen is None else torch.maximum(seen, best)
        assert seen is not None
        nouns = [candidates[i] for i in highest(seen, self.features.max_nouns)]
        return nouns, ", ".join(nouns)

    def audio(self, video: Path, caption: str | None,
              probe: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """The waveform for the whole video (exactly its duration) and what an --explain figure shows (thumbnails
        of the frames when --explain is on). `probe`: the video's `probe_video`, when the caller has it (it reads
        every packet of a Matroska file). The video is read a window batch at a time (`Windows`): memory does not
        grow with its length."""
        with reading_windows():  # one decord reader for all of the video's windows and passes
            return self._audio(video, caption, probe)

    def _audio(self, video: Path, caption: str | None, probe: dict[str, Any] | None) -> tuple[np.ndarray, dict[str, Any]]:
        cfg = self.features
        duration = (probe or probe_video(video))["duration"]
        if duration <= 0:
            raise GenerateError(f"{video}: zero duration")
        batch_size = self.options.window_batch
        windows = Windows(video, duration, cfg, self.options.overlap, keep=batch_size)
        if caption:
            nouns = self.nouns(caption)
        else:
            nouns, caption = self._nouns(_FramesOf(windows, video, cfg))
        import train
        from eval.generate import clip_seed

        rate = cfg.sample_rate
        pieces: list[np.ndarray] = []
        shown: list[np.ndarray] = []
        probabilities: list[dict[str, np.ndarray]] = []
        batch: list[DecodedFrames] = []

        def flush() -> None:
            # window i draws its noise from its own generator, so its audio does not depend on the window batch
            first = len(pieces)
            generators = [torch.Generator(self.device).manual_seed(clip_seed(self.options.seed, str(first + i)))
                          for i in range(len(batch))]
            features = self.encoders.visual([d.frames for d in batch], [caption] * len(batch), [nouns] * len(batch))
            latents = train.sample(self.model, self._conditions(features), steps=self.options.steps,
                                   guidance=self.options.guidance, scheduler=self.options.sampler,  # type: ignore[arg-type]
                                   generator=generators, precision=self.precision, cuda_graph=self.options.cuda_graphs)
            for wave, decoded, feature in zip(self.decoder(latents), batch, features):  # (count, samples)
                pieces.append(wave[: round(decoded.duration * rate)])
                probabilities.append({"probs.npy": feature["probs.npy"]})
                if self.options.explain:
                    shown.append(thumbnails(decoded.frames))
            batch.clear()

        for _, _, decoded in _FramesOf(windows, video, cfg).decoded():
            batch.append(decoded)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        duration, starts = windows.duration, windows.starts
        waveform = join_windows(pieces, starts, round(duration * rate), rate)
        explain = {"starts": starts, "frames": shown, "features": probabilities, "nouns": nouns, "caption": caption,
                   "frame_times": cfg.frame_times(), "duration": duration}
        return waveform, explain

    def _conditions(self, features: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Each window's features -> the model's conditions, exactly as training derives them from a shard sample
        (the features carry detector.npy, so the object threshold applies to the detector score there too)."""
        threshold = self.train_config.object_threshold
        return shards.stack_conditions([shards.sample_conditions(f, threshold) for f in features], self.device)


class _FramesOf:
    """A video's `Windows` as its frames, each window's checked for a shape the detector can ground (GenerateError
    naming the video otherwise)."""

    def __init__(self, windows: Windows, video: Path, cfg: FeatureConfig):
        self.windows, self.video, self.cfg = windows, video, cfg

    def decoded(self) -> Iterator[tuple[int, float, DecodedFrames]]:
        for index, start, decoded in self.windows:
            if len(decoded.frames):
                error = self.cfg.frame_shape_error(*decoded.frames.shape[1:3])
                if error:
                    raise GenerateError(f"{self.video}: {error}")
            yield index, start, decoded

    def __iter__(self) -> Iterator[np.ndarray]:
        return (decoded.frames for _, _, decoded in self.decoded())


THUMBNAIL_SIDE = 96  # pixels, the short side of the frames an --explain figure keeps


def thumbnails(frames: np.ndarray) -> np.ndarray:
    """(T, h, w, 3) copies of (T, H, W, 3) frames with a short side near THUMBNAIL_SIDE (every s-th pixel)."""
    step = max(1, min(frames.shape[1:3]) // THUMBNAIL_SIDE) if len(frames) else 1
    return np.ascontiguousarray(frames[:, ::step, ::step])


def write_explanation(path: Path, waveform: np.ndarray, sample_rate: int, explain: dict[str, Any]) -> None:
    """Frames at the sampled times, the per-frame object probabilities and the generated spectrogram, one time axis."""
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = explain["duration"]
    # every sampled frame on the video's time axis: (seconds, frame, p_t of each noun), in time order
    samples = sorted(
        [(start + explain["frame_times"][i], frame, features["probs.npy"][i])
         for start, frames, features in zip(explain["starts"], explain["frames"], explain["features"])
         for i, frame in enumerate(frames)],
        key=lambda sample: sample[0],
    )
    fig, (ax_frames, ax_probs, ax_spec) = plt.subplots(3, 1, figsize=(12, 7), sharex=True,
                                                       gridspec_kw={"height_ratios": [1, 1.2, 1.6]})
    shown = samples[:: max(1, len(samples) // 12)]  # at most ~12 thumbnails
    width = duration / max(1, len(shown)) * 0.9
    for t, frame, _ in shown:
        height = width * frame.shape[0] / frame.shape[1]
        ax_frames.imshow(frame, extent=(t - width / 2, t + width / 2, 0, height), aspect="auto")
    ax_frames.set_ylim(0, width)
    ax_frames.set_yticks([])
    ax_frames.set_title(f"frames (caption: {explain['caption'] or '-'})")
    times = np.array([t for t, _, _ in samples])
    for k, noun in enumerate(explain["nouns"]):
        ax_probs.plot(times, [p[k] for _, _, p in samples], marker=".", label=noun)
    ax_probs.set_ylim(0, 1)
    ax_probs.set_ylabel("p(noun seen)")
    if explain["nouns"]:
        ax_probs.legend(loc="upper right", fontsize="small", ncol=min(4, len(explain["nouns"])))
    padded = np.pad(waveform, (0, max(0, 1024 - len(waveform))))  # a video shorter than one FFT (librosa warns)
    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=padded, sr=sample_rate, n_fft=1024, hop_length=160, n_mels=64))
    ax_spec.imshow(mel, origin="lower", aspect="auto", extent=(0, len(padded) / sample_rate, 0, 64), cmap="magma")
    ax_spec.set_ylabel("mel bin")
    ax_spec.set_xlabel("time (s)")
    ax_spec.set_title("generated audio")
    for start in explain["starts"][1:]:
        ax_spec.axvline(start, color="white", linestyle=":", linewidth=0.8)
    ax_spec.set_xlim(0, duration)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- command line
def expand_inputs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """(videos, problems). Files as given; folders contribute their videos (sorted); a .txt file lists one video per
    line (paths relative to the current folder; blank lines and lines starting with '#' are skipped); a file named
    twice is taken once. A list that cannot be read, and a folder or list that names no video, is one problem line
    (the other inputs still go on)."""
    videos: list[Path] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.suffix.lower() == ".txt":
            try:
                lines = path.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                reason = error.strerror if isinstance(error, OSError) else f"not UTF-8 text, byte {error.start}"
                problems.append(f"{path}: cannot read the list of videos ({reason})")
                continue
            found = [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        else:
            found = [path]
        if not found:
            kind = "folder" if path.is_dir() else "list"
            problems.append(f"{path}: this {kind} names no video (suffixes {' '.join(VIDEO_SUFFIXES)})")
        videos.extend(found)
    unique: dict[Path, Path] = {}  # the same file named twice (x.mp4 ./x.mp4, a link to it...): once
    for video in videos:
        unique.setdefault(Path(os.path.realpath(video)), video)
    return list(unique.values()), problems


def build_parser() -> argparse.ArgumentParser:
    defaults = GenerateOptions()
    parser = argparse.ArgumentParser(prog="vta-sam generate", description="Add synchronized sound to videos.")
    parser.add_argument("videos", nargs="+", type=path_argument, help="video files, folders of videos, or .txt lists of videos")
    parser.add_argument("--caption", help="what sounds (its nouns are grounded); default: ground the VGGSound nouns "
                        "CLIP finds most similar to the frames")
    parser.add_argument("--ground-all", action="store_true",
                        help="without --caption: ground all VGGSound nouns, not CLIP's shortlist (~19 prompts, not 1)")
    parser.add_argument("--model", type=path_argument, default=defaults.model, help=f"trained run folder (default {defaults.model})")
    parser.add_argument("--out", type=path_argument, default=defaults.out, help=f"output folder, or with one video an output file name (default {defaults.out})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"sampling seed (default {defaults.seed})")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"denoising steps (default {defaults.steps})")
    parser.add_argument("--guidance", type=float, default=defaults.guidance, help=f"classifier-free guidance scale (default {defaults.guidance})")
    parser.add_argument("--sampler", choices=("ddim", "ddpm", "dpmsolver++"), default=defaults.sampler,
                        help=f"sampler (default {defaults.sampler})")
    parser.add_argument("--overlap", type=float, default=defaults.overlap,
                        help=f"seconds of crossfade between windows, at most half a window (default {defaults.overlap})")
    parser.add_argument("--window-batch", type=int, default=defaults.window_batch,
                        help=f"windows of a video processed together (default {defaults.window_batch}): lower it if a long "
                             "video runs out of memory; the audio is the same")
    parser.add_argument("--weights", type=path_argument, default=defaults.weights, help=f"weights folder, for models without random init (default {defaults.weights})")
    parser.add_argument("--device", default=defaults.device, help="'auto' (cuda when there, the default), 'cpu' or 'cuda[:N]'")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="UNet precision while sampling (auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet first (pays off over many videos)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on CUDA, launch the sampler step's kernels one by one instead of replaying a CUDA graph "
                             "captured once per number of windows (about a second to capture)")
    parser.add_argument("--explain", action="store_true", help="also write <name>.explain.png: frames, object probabilities, spectrogram")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Sound for every video given. A video that fails (unreadable input, or an output that cannot be written:
    folder, WAV, muxed copy) is one line on stderr naming it and the reason, and the remaining videos are still
    tried; the exit code is 1 when any failed. Finished outputs of an earlier run are kept and skipped; a file in an
    output's place that this command did not write (`foreign_output`) is left alone and fails that video. Of two
    videos that would write the same output names (a/x.mp4 and b/x.mp4 into one folder, or x.mp4 and x.webm, which
    share x.wav), the later one fails that way and the first keeps its outputs. Bad options, a model that does not
    load and an --out that cannot be the output are exit code 2 before any video is tried; Ctrl-C is 130."""
    args = build_parser().parse_args(argv)
    options = GenerateOptions(model=args.model, out=args.out, caption=args.caption, seed=args.seed, steps=args.steps,
                              guidance=args.guidance, sampler=args.sampler, overlap=args.overlap, weights=args.weights,
                              device=args.device, precision=args.precision, compile=args.compile, explain=args.explain,
                              cuda_graphs=args.cuda_graphs, ground_all=args.ground_all, window_batch=args.window_batch)
    for flag, value, low in (("--window-batch", options.window_batch, 1), ("--steps", options.steps, 1),
                             ("--overlap", options.overlap, 0)):
        if not value >= low:  # also NaN
            print(f"error: {flag} must be at least {low} (got {value})", file=sys.stderr)
            return 2
    if not math.isfinite(options.guidance):
        print(f"error: --guidance must be a finite number (got {options.guidance})", file=sys.stderr)
        return 2
    out_suffix = options.out.suffix.lower()
    if out_suffix in AUDIO_SUFFIXES:
        print(f"error: --out {options.out}: give a video file name or a folder (the WAV is written beside the "
              f"video, as {options.out.with_suffix('.wav').name} for a video named {options.out.stem}.mp4)",
              file=sys.stderr)
        return 2
    if shutil.which("ffmpeg") is None:
        print("error: ffmpeg not found (install Debian's ffmpeg: apt-get install ffmpeg)", file=sys.stderr)
        return 2
    videos, problems = expand_inputs(args.videos)
    for unreadable in problems:
        print(f"error: {unreadable}", file=sys.stderr)
    if not videos:  # nothing to do: no model is loaded
        print(f"0 videos have sound in {options.out}; {len(problems)} input(s) named none (see above)")
        return 1
    try:
        generator = SoundGenerator(options)
    except GenerateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if options.caption and not generator.nouns(options.caption):
        print(f"warning: the caption {options.caption!r} has no noun that the tagger finds: the sound is conditioned "
              "on the frames alone (no objects are grounded)", file=sys.stderr)
    if not options.overlap <= generator.features.window_seconds / 2:  # more: windows every few frames, for hours
        print(f"error: --overlap must be at most half a window ({generator.features.window_seconds / 2:g} s; got "
              f"{options.overlap})", file=sys.stderr)
        return 2
    many = len(videos) > 1 or any(p.is_dir() for p in args.videos)
    if (many or out_suffix not in VIDEO_SUFFIXES) and options.out.exists() and not options.out.is_dir():
        print(f"error: --out {options.out}: a file, not a folder (with {'several videos' if many else 'this name'} "
              "--out is the folder the outputs go to)", file=sys.stderr)
        return 2
    failed = len(problems)
    claimed: dict[Path, Path] = {}  # output file -> the video of this call that writes it
    # SIGTERM (a job's time limit, `timeout`) as Ctrl-C: the scratch folder and a half-written copy are removed
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        failed += _generate_all(generator, videos, options, many, claimed, args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to go on (the videos that have sound in {options.out} "
              "are kept and skipped)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    done = len(videos) + len(problems) - failed
    print(f"{done} of {len(videos)} videos have sound in {options.out}" + (f"; {failed} failed (see above)" if failed else ""))
    return 1 if failed else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _generate_all(generator: SoundGenerator, videos: list[Path], options: GenerateOptions, many: bool,
                  claimed: dict[Path, Path], no_progress: bool) -> int:
    """`main`'s loop over the videos; returns how many failed (each said in one line)."""
    from eval.generate import write_wav

    failed = 0
    remove_dead_partials(options.out if many or options.out.suffix.lower() not in VIDEO_SUFFIXES else options.out.parent)
    with tempfile.TemporaryDirectory(prefix="vta-sam-generate-") as scratch:
        silence = Path(scratch) / "silence.wav"  # the sound of the trial muxes (`mux(first_frame_only=True)`)
        write_wav(silence, np.zeros(generator.features.sample_rate // 10, np.float32), generator.features.sample_rate)
        for video in tqdm(videos, unit="video", disable=no_progress, desc="generate"):
            try:
                failed += not _generate_one(generator, video, options, many, claimed, silence)
            except Exception as error:  # noqa: BLE001 - a failure no check foresaw: this video fails, the others go on
                failed += 1
                reason = " ".join(str(error).split())[:300]
                tqdm.write(f"error: {video}: failed unexpectedly ({type(error).__name__}: {reason})", file=sys.stderr)
    return failed


def _generate_one(generator: SoundGenerator, video: Path, options: GenerateOptions, many: bool,
                  claimed: dict[Path, Path], silence: Path) -> bool:
    """Sound for one video (False: it failed, said in one line)."""
    from eval.generate import write_wav

    out_video, out_wav = output_paths(video, options.out, many)
    earlier = claimed.get(out_wav) or claimed.get(out_video)
    if earlier is not None:  # a/x.mp4 and b/x.mp4, or x.mp4 and x.webm: the same output names
        tqdm.write(f"error: {video}: its output {out_wav.name} would overwrite that of {earlier}; rename one "
                   "or give them separate --out folders", file=sys.stderr)
        return False
    claimed |= {out_wav: video, out_video: video}
    if video.resolve() in (out_video.resolve(), out_wav.resolve()):  # `--out .` in the video's own folder
        tqdm.write(f"error: {video}: its output would replace the video itself; give another --out", file=sys.stderr)
        return False
    named = not many and options.out.suffix.lower() in VIDEO_SUFFIXES  # the user chose the container
    if out_video.exists() and out_wav.exists() and foreign_output(out_video, out_wav) is None:
        return True  # finished by an earlier run (one written to a fallback container is made again)
    foreign = foreign_output(out_video, out_wav)
    if foreign:  # a file of the user's where an output goes: never overwritten
        tqdm.write(f"error: {video}: {foreign}; move it or give another --out", file=sys.stderr)
        return False
    try:
        probe = probe_video(video)
        if is_still_image(probe["format"]):
            raise GenerateError(f"{video}: a still image ({probe['format']}), not a video")
        jump = timestamp_jump(video, probe["index"]) if probe["format"] in JUMPING_FORMATS else None
        if jump is not None:  # its windows would span the jump: a day of them for a jump back
            raise GenerateError(jump_problem(video, jump[0] - probe["start"], jump[1]))
        problem = container_problem(probe["codec"], out_video)
        if problem:
            raise GenerateError(f"{video}: cannot write {out_video} ({problem})")
        out_video.parent.mkdir(parents=True, exist_ok=True)
        out_video = writable_container(video, out_video, out_wav, probe, silence, named)
        if claimed.setdefault(out_video, video) != video:  # the fallback name is another input's output
            raise GenerateError(f"{video}: its output {out_video.name} would overwrite that of {claimed[out_video]}; "
                                "rename one or give them separate --out folders")
        waveform, explain = generator.audio(video, options.caption, probe)
        if not np.isfinite(waveform).all():  # a damaged checkpoint: never write (and mux) full-scale noise
            raise GenerateError(f"{video}: the model made non-finite audio (with --guidance {options.guidance:g}; "
                                f"check {options.model}/model and the VAE and vocoder weights)")
        write_wav(out_wav, waveform, generator.features.sample_rate, software=WAV_SOFTWARE, tmp=partial_path(out_wav))
        mux(video, out_wav, out_video, probe["start"], probe["index"])
        if options.explain:
            write_explanation(out_video.with_suffix(".explain.png"), waveform, generator.features.sample_rate, explain)
    except (GenerateError, VideoDecodeError) as error:
        tqdm.write(f"error: {error}", file=sys.stderr)
        return False
    except OSError as error:
        tqdm.write(f"error: {video}: cannot write {error.filename or out_video} ({error.strerror})", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":  # `python -m vta_sam.generate VIDEO ...` as `vta-sam generate VIDEO ...`
    raise SystemExit(main())
