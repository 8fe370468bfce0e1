"""Per-clip audio embeddings for the metrics (FD, FAD, KL), batched over clips.

One `AudioEmbedding` per clip: the Cnn14 embedding (FD), the Cnn14 class probabilities (KL) and the VGGish patch
embeddings (FAD). Waveforms are brought to the protocol first (`prepare_waveform`: mono, 16 kHz, cut or
zero-padded to the protocol's duration), so reference and generated audio are measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import librosa
import numpy as np
from tqdm import tqdm

from eval.panns import Cnn14
from eval.vggish import VGGish, waveform_to_patches

RESAMPLER = "soxr_hq"  # librosa.resample's res_type (its default, and librosa.load's): named so results record it


@dataclass(frozen=True)
class AudioEmbedding:
    cnn14_embedding: np.ndarray  # (cnn14 embed_dim,) relu(fc1): FD
    cnn14_probs: np.ndarray  # (classes,) softmax of the AudioSet logits: KL
    vggish: np.ndarray  # (n_patches, 128): FAD, one per 0.96 s patch


def prepare_waveform(waveform: np.ndarray, sample_rate: int, target_rate: int, duration: float | None) -> np.ndarray:
    """(L,) or (channels, L) -> (L',) float32 at `target_rate`: channels averaged, resampled (librosa soxr_hq),
    then cut or zero-padded to round(duration * target_rate) samples unless `duration` is None."""
    y = np.asarray(waveform, dtype=np.float32)
    if y.ndim == 2:
        y = y.mean(axis=0)
    if y.ndim != 1:
        raise ValueError(f"expected an (L,) or (channels, L) waveform, got shape {np.shape(waveform)}")
    if sample_rate != target_rate:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=target_rate, res_type=RESAMPLER)
    if duration is not None:
        length = round(duration * target_rate)
        y = np.pad(y[:length], (0, max(0, length - y.size)))
    return np.ascontiguousarray(y, dtype=np.float32)


def embed_clips(
    clips: Iterable[tuple[str, np.ndarray]],
    cnn14: Cnn14,
    vggish: VGGish,
    sample_rate: int,
    duration: float | None,
    batch_size: int = 8,
    total: int | None = None,
    progress: bool = True,
) -> Iterator[tuple[str, AudioEmbedding]]:
    """Embed (clip id, waveform at `sample_rate`) pairs, `batch_size` clips per Cnn14 forward pass; yields
    (id, AudioEmbedding) in input order. Clips of different lengths (duration None) are batched by length, since
    padding would change Cnn14's time pooling."""
    if cnn14.config.sample_rate != vggish.config.sample_rate:
        raise ValueError("Cnn14 and VGGish must share a sample rate")
    rate = cnn14.config.sample_rate
    iterator = iter(clips)
    with tqdm(total=total, disable=not progress, unit="clip", desc="embedding audio") as bar:
        while batch := list(islice(iterator, batch_size)):
            waves = [prepare_waveform(w, sample_rate, rate, duration) for _, w in batch]
            embeddings: list[np.ndarray] = [np.empty(0)] * len(batch)
            probs: list[np.ndarray] = [np.empty(0)] * len(batch)
            for length in dict.fromkeys(w.size for w in waves):
                index = [i for i, w in enumerate(waves) if w.size == length]
                e, p = cnn14.embed_and_probs(np.stack([waves[i] for i in index]))
                for row, i in enumerate(index):
                    embeddings[i], probs[i] = e[row], p[row]
            # VGGish: all patches of the batch in one pass, split back per clip
            patches = [waveform_to_patches(w, rate, vggish.config) for w in waves]
            flat = vggish.embed_log_mel_patches(np.concatenate(patches))
            splits = np.cumsum([len(p) for p in patches])[:-1]
            for (clip_id, _), e, p, v in zip(batch, embeddings, probs, np.split(flat, splits)):
                yield clip_id, AudioEmbedding(cnn14_embedding=e, cnn14_probs=p, vggish=v)
            bar.update(len(batch))
