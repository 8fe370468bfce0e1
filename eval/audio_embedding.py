"""Per-clip audio embeddings for the metrics (FD, FAD, KL, IS), batched over clips.

One `AudioEmbedding` per clip: the Cnn14 embedding (FD), the Cnn14 class probabilities and logits (KL with
softmax and with sigmoid, the Inception score) and the VGGish patch embeddings (FAD). Waveforms are brought to
the audio protocol first (`prepare_waveform`), so reference and generated audio are measured the same way:

- mean-cut (the default): channels averaged, resampled to 16 kHz, cut or zero-padded to the protocol's duration;
- audioldm-eval: as audioldm_eval's WaveDataset.read_from_file (haoheliu/audioldm_eval,
  audioldm_eval/datasets/load_mel.py): the first channel, its mean (DC offset) subtracted, resampled to 16 kHz,
  the full length kept and zero-padded at the end to at least 32000 samples (2 s at 16 kHz);
- av-benchmark: as av-benchmark's AudioDataset.read_from_file (hkchengrex/av-benchmark, av_bench/data/
  audio_dataset.py): channels averaged, the mean subtracted, resampled with torchaudio's windowed-sinc resampler
  (torchaudio.transforms.Resample's defaults), cut to the duration and never padded.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import librosa
import numpy as np
import torch
from tqdm import tqdm

from eval.config import AUDIO_PROTOCOLS, AudioProtocol
from eval.panns import Cnn14
from eval.vggish import VGGish, waveform_to_patches

RESAMPLER = "soxr_hq"  # librosa.resample's res_type (its default, and librosa.load's): named so results record it
# audioldm_eval pads shorter audio to 32000 samples at its 16 kHz evaluation rate (pad_short_audio, min_samples)
AUDIOLDM_EVAL_MIN_SECONDS = 2.0


@dataclass(frozen=True)
class AudioEmbedding:
    cnn14_embedding: np.ndarray  # (cnn14 embed_dim,) relu(fc1): FD
    cnn14_probs: np.ndarray  # (classes,) softmax of the AudioSet logits: KL
    vggish: np.ndarray  # (n_patches, 128): FAD, one per 0.96 s patch
    cnn14_logits: np.ndarray  # (classes,) the AudioSet logits fc_audioset: KL with sigmoid, Inception score


def prepare_waveform(waveform: np.ndarray, sample_rate: int, target_rate: int, duration: float | None,
                     protocol: AudioProtocol = "mean-cut") -> np.ndarray:
    """(L,) or (channels, L) -> (L',) float32 at `target_rate` (resampled with librosa soxr_hq), by `protocol`:

    - mean-cut: channels averaged, resampled, then cut or zero-padded to round(duration * target_rate) samples
      unless `duration` is None;
    - audioldm-eval: channel 0, minus its mean, resampled, zero-padded at the end to at least
      round(2.0 * target_rate) samples, never cut (`duration` must be None: that protocol keeps the full length);
    - av-benchmark: channels averaged, minus the mean, resampled with torchaudio.transforms.Resample (its
      defaults: sinc_interp_hann, lowpass_filter_width 6, rolloff 0.99), then cut to int(target_rate * duration)
      samples (None: not cut), never padded.
    """
    if protocol not in AUDIO_PROTOCOLS:
        raise ValueError(f"audio protocol must be one of {AUDIO_PROTOCOLS}, got {protocol!r}")
    y = np.asarray(waveform, dtype=np.float32)
    if y.ndim not in (1, 2):
        raise ValueError(f"expected an (L,) or (channels, L) waveform, got shape {np.shape(waveform)}")
    if protocol == "audioldm-eval":
        if duration is not None:
            raise ValueError(f"the audioldm-eval audio protocol keeps the full length; got duration {duration}")
        y = y[0] if y.ndim == 2 else y
        if y.size:  # the DC offset goes before resampling, as in the reference
            y = y - np.float32(y.mean(dtype=np.float64))
    elif y.ndim == 2:
        y = y.mean(axis=0)
    if protocol == "av-benchmark":
        return av_benchmark_waveform(y, sample_rate, target_rate, duration)
    if sample_rate != target_rate:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=target_rate, res_type=RESAMPLER)
    if protocol == "audioldm-eval":
        y = np.pad(y, (0, max(0, round(AUDIOLDM_EVAL_MIN_SECONDS * target_rate) - y.size)))
    elif duration is not None:
        length = round(duration * target_rate)
        y = np.pad(y[:length], (0, max(0, length - y.size)))
    return np.ascontiguousarray(y, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _resampler(sample_rate: int, target_rate: int) -> torch.nn.Module:
    """torchaudio.transforms.Resample(sample_rate, target_rate), built once per pair of rates: the reference's
    resampler (not torchaudio.functional.resample, whose kernel is computed another way and differs by ~1e-6)."""
    import torchaudio.transforms  # only the av-benchmark protocol needs torchaudio

    return torchaudio.transforms.Resample(sample_rate, target_rate)


def av_benchmark_waveform(waveform: np.ndarray, sample_rate: int, target_rate: int, duration: float | None) -> np.ndarray:
    """(L,) mono -> (L',) float32: minus its mean, torchaudio-resampled to `target_rate`, cut to
    int(target_rate * duration) samples (av-benchmark's AudioDataset.read_from_file; `duration` None: not cut)."""
    y = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    y = y - y.mean()
    if sample_rate != target_rate:
        y = _resampler(sample_rate, target_rate)(y)
    if duration is not None:
        y = y[:int(target_rate * duration)]
    return np.ascontiguousarray(y.numpy(), dtype=np.float32)


def embed_clips(
    clips: Iterable[tuple[str, np.ndarray]],
    cnn14: Cnn14,
    vggish: VGGish,
    sample_rate: int,
    duration: float | None,
    batch_size: int = 8,
    total: int | None = None,
    progress: bool = True,
    audio_protocol: AudioProtocol = "mean-cut",
) -> Iterator[tuple[str, AudioEmbedding | str]]:
    """Embed (clip id, waveform at `sample_rate`) pairs, `batch_size` clips per Cnn14 forward pass; yields
    (id, AudioEmbedding) in input order, or (id, why it cannot be embedded): shorter, once prepared, than Cnn14
    takes (the protocols that never pad: av-benchmark, and mean-cut without a duration), or an output that is not
    finite (samples so far outside [-1, 1] that the log-mel overflows, or damaged embedder weights). Waveforms go
    through `prepare_waveform(..., duration, audio_protocol)`. Clips of different lengths (duration None) are
    batched by length, since padding would change Cnn14's time pooling."""
    if cnn14.config.sample_rate != vggish.config.sample_rate:
        raise ValueError("Cnn14 and VGGish must share a sample rate")
    rate = cnn14.config.sample_rate
    shortest = cnn14.config.min_samples
    iterator = iter(clips)
    with tqdm(total=total, disable=not progress, unit="clip", desc="embedding audio") as bar:
        while batch := list(islice(iterator, batch_size)):
            prepared = [(clip_id, prepare_waveform(w, sample_rate, rate, duration, audio_protocol)) for clip_id, w in batch]
            for clip_id, wave in prepared:
                if wave.size < shortest:
                    yield clip_id, (f"too short for Cnn14 under the {audio_protocol} audio protocol ({wave.size} "
                                    f"samples at {rate} Hz; it takes at least {shortest}, {shortest / rate:.2f} s)")
            batch = [(clip_id, wave) for clip_id, wave in prepared if wave.size >= shortest]
            bar.update(len(prepared) - len(batch))
            if not batch:
                continue
            waves = [wave for _, wave in batch]
            embeddings: list[np.ndarray] = [np.empty(0)] * len(batch)
            probs: list[np.ndarray] = [np.empty(0)] * len(batch)
            logits: list[np.ndarray] = [np.empty(0)] * len(batch)
            for length in dict.fromkeys(w.size for w in waves):
                index = [i for i, w in enumerate(waves) if w.size == length]
                e, p, lg = cnn14.embed_probs_logits(np.stack([waves[i] for i in index]))
                for row, i in enumerate(index):
                    embeddings[i], probs[i], logits[i] = e[row], p[row], lg[row]
            # VGGish: all patches of the batch in one pass, split back per clip
            patches = [waveform_to_patches(w, rate, vggish.config) for w in waves]
            flat = vggish.embed_log_mel_patches(np.concatenate(patches))
            splits = np.cumsum([len(p) for p in patches])[:-1]
            for (clip_id, wave), e, p, lg, v in zip(batch, embeddings, probs, logits, np.split(flat, splits)):
                if all(np.isfinite(x).all() for x in (e, p, lg, v)):
                    yield clip_id, AudioEmbedding(cnn14_embedding=e, cnn14_probs=p, vggish=v, cnn14_logits=lg)
                else:
                    peak = float(np.abs(wave).max())
                    why = "far outside [-1, 1]" if peak > 1 else "within [-1, 1]: damaged embedder weights?"
                    yield clip_id, f"the Cnn14/VGGish output for it is not finite (its peak sample is {peak:.3g}, {why})"
            bar.update(len(batch))
