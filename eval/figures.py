"""The evaluation figure: per clip, generated and ground-truth mel spectrograms on one time axis, with the
per-frame object probabilities p_tk (probs.npy, one row per caption noun) underneath.

Both mels use AudioLDM's front end (`audio_models.front_end.log_mel`: peak-normalised, 1024 frames of
10 ms), so the two panels are directly comparable; frame t of probs.npy covers [t, t+1) * window / frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from audio_models.front_end import MelFrontEnd, log_mel  # noqa: E402


@dataclass(frozen=True)
class FigureClip:
    id: str
    generated: np.ndarray  # (samples,) at sample_rate
    reference: np.ndarray  # (samples,) at sample_rate
    probs: np.ndarray  # (frames, nouns) p_tk
    nouns: tuple[str, ...]
    caption: str = ""


def mel_figure(path: str | Path, clips: list[FigureClip], sample_rate: int, window_seconds: float) -> Path:
    """Write a PNG with three panels per clip (generated mel, ground-truth mel, object probabilities)."""
    if not clips:
        raise ValueError("mel_figure needs at least one clip")
    front_end = MelFrontEnd(sample_rate=sample_rate, hop=round(sample_rate * window_seconds / 1024)).eval()
    seconds = front_end.frames * front_end.hop / sample_rate
    figure, axes = plt.subplots(3 * len(clips), 1, sharex=True, figsize=(10, 4.2 * len(clips)),
                                gridspec_kw={"height_ratios": [2, 2, 1] * len(clips)}, squeeze=False)
    for index, clip in enumerate(clips):
        gen_ax, ref_ax, obj_ax = axes[3 * index : 3 * index + 3, 0]
        for ax, waveform, name in ((gen_ax, clip.generated, "generated"), (ref_ax, clip.reference, "ground truth")):
            mel = log_mel(np.asarray(waveform, dtype=np.float32), front_end)  # (frames, 64)
            ax.imshow(mel.T, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[1]), cmap="magma")
            ax.set_ylabel("mel bin")
            ax.set_title(f"{clip.id}: {name}" + (f" ({clip.caption})" if clip.caption and name == "generated" else ""),
                         fontsize=9, loc="left")
        probs = np.asarray(clip.probs, dtype=np.float32)
        if probs.ndim == 2 and probs.shape[1] > 0:
            obj_ax.imshow(probs.T, aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="viridis",
                                  extent=(0, window_seconds, probs.shape[1] - 0.5, -0.5))
            obj_ax.set_yticks(range(probs.shape[1]), labels=list(clip.nouns)[: probs.shape[1]], fontsize=8)
        else:
            obj_ax.text(0.5, 0.5, "no caption noun", ha="center", va="center", transform=obj_ax.transAxes)
            obj_ax.set_yticks([])
        obj_ax.set_ylabel("p_tk (0-1)")  # no colour bar: it would narrow this panel off the shared time axis
    axes[-1, 0].set_xlabel("time (s)")
    axes[-1, 0].set_xlim(0, max(seconds, window_seconds))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
