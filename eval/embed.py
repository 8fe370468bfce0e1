"""Per-clip audio embeddings for the metrics, batched over clips, and the set-level audio metrics (FD, FAD, KL).

One `AudioEmbedding` per clip: the Cnn14 embedding (FD), the Cnn14 class probabilities (KL) and the VGGish patch
embeddings (FAD). Waveforms are brought to the protocol first (`prepare_waveform`: mono, 16 kHz, cut or
zero-padded to the protocol's duration), so reference and generated audio are measured the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import librosa
import numpy as np
from tqdm import tqdm

from eval.metrics import frechet_distance, kl_divergence
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


def audio_metrics(reference: Mapping[str, AudioEmbedding], generated: Mapping[str, AudioEmbedding],
                  errors: dict[str, str] | None = None) -> dict[str, Any]:
    """FD (Cnn14 embeddings, one per clip), FAD (VGGish patch embeddings of each set pooled) and KL (Cnn14 class
    probabilities paired by clip id: KL(reference || generated)), with the counts they rest on.

    With `errors`, a metric whose computation raises (e.g. sqrtm with a large imaginary part) is None and
    errors[metric] says why, so the others survive; without it the exception propagates.
    """
    out: dict[str, Any] = {"n_reference": len(reference), "n_generated": len(generated)}

    def guarded(name: str, compute: Callable[[], Any]) -> Any:
        if errors is None:
            return compute()
        try:
            return compute()
        except Exception as error:  # any numerical failure of one metric: recorded, not fatal
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            return None

    out["fd"] = guarded("fd", lambda: frechet_distance(np.stack([c.cnn14_embedding for c in reference.values()]),
                                                       np.stack([c.cnn14_embedding for c in generated.values()])))
    ref_patches = np.concatenate([c.vggish for c in reference.values()])
    gen_patches = np.concatenate([c.vggish for c in generated.values()])
    out.update(n_reference_patches=len(ref_patches), n_generated_patches=len(gen_patches))
    out["fad"] = guarded("fad", lambda: frechet_distance(ref_patches, gen_patches))
    kl = guarded("kl", lambda: kl_divergence({k: c.cnn14_probs for k, c in reference.items()},
                                             {k: c.cnn14_probs for k, c in generated.items()}))
    out["kl"], out["kl_pairs"] = kl if kl is not None else (None, 0)
    return out
