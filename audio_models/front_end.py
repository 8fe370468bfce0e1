"""AudioLDM's audio front end: waveform -> the log mel (1024, 64) its VAE encodes and its vocoder inverts.

`audioldm_waveform` + `MelFrontEnd` reproduce the input of the AudioLDM VAE, i.e. AudioLDM's `audio/tools.py`
(read_wav_file, wav_to_fbank, _pad_spec) and `audio/stft.py` (TacotronSTFT): 16 kHz mono, normalised, cut or
zero-padded to 10.24 s = 163840 samples; STFT n_fft 1024, hop 160, periodic Hann window of 1024, centred with
reflect padding; magnitude (not power); 64 Slaney mel bins over 0-8000 Hz; log(clamp(mel, min=1e-5)); 1024 frames
-> log mel (1024, 64). AudioLDM's own float32 and float64 runs differ by up to 2e-3 on the log mel: compare front
ends with a tolerance.
Deliberate deviation from AudioLDM: a silent clip (peak under 1e-6 after mean removal) gives zeros (AudioLDM
divides by a zero peak and gives NaN). Stage one downmixes all channels before this (AudioLDM keeps the first).
"""

from __future__ import annotations

import functools

import librosa
import numpy as np
import torch

from audio_models.config import MEL_BINS, MEL_FRAMES

SAMPLE_RATE = 16000
AUDIOLDM_NUM_SAMPLES = 163840  # 10.24 s at 16 kHz = 1024 frames of hop 160
# Below this peak (-120 dBFS, under one 16-bit step) a mean-removed clip is silence, not a signal to normalise.
_SILENCE = 1e-6


def audioldm_waveform(waveform: np.ndarray, num_samples: int = AUDIOLDM_NUM_SAMPLES) -> np.ndarray:
    """AudioLDM's read_wav_file normalisation of a mono waveform, as float32 (num_samples,).

    x = (x - mean(x)) / (max|x - mean(x)| + 1e-8) * 0.5   (normalize_wav, on the whole clip)
    x = x[:num_samples], zero-padded to num_samples      (pad_wav)
    x = x / max|x| * 0.5                                  (read_wav_file)
    Deviation: AudioLDM gives NaN for a silent clip (0 / 0), and blows the float rounding left by the mean
    removal of a constant clip up to a +-0.5 signal; we return zeros for any clip that is silent after the mean
    removal (peak below 1e-6, i.e. -120 dBFS, under one 16-bit step), or empty (AudioLDM asserts > 100 samples).
    """
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a mono waveform (samples,), got shape {x.shape}")
    out = np.zeros(num_samples, dtype=np.float64)
    centred = x - x.mean() if x.size else x
    kept = centred[:num_samples]
    if kept.size == 0 or np.abs(kept).max() < _SILENCE:  # silent (at least until the cut): AudioLDM's NaN
        return out.astype(np.float32)
    out[: kept.size] = kept / (np.abs(centred).max() + 1e-8) * 0.5
    return (out / np.abs(out).max() * 0.5).astype(np.float32)


class MelFrontEnd(torch.nn.Module):
    """AudioLDM's TacotronSTFT.mel_spectrogram + wav_to_fbank: waveform (B, samples) -> log mel (B, frames, n_mels).

    |STFT| with a periodic Hann window, centred with reflect padding (torch.stft equals TacotronSTFT's conv1d
    Fourier basis up to float rounding); mel = Slaney filters (librosa, htk=False, norm='slaney') @ |STFT|;
    log(clamp(mel, 1e-5)). The waveform is clipped to [-1, 1] first (get_mel_from_wav). Time axis cut to
    `frames`, or padded with ZEROS after the log like AudioLDM's _pad_spec (ZeroPad2d). With AudioLDM's
    163840-sample input there are 1025 frames and the padding never happens.
    """

    mel_basis: torch.Tensor  # buffers, declared for type checkers
    window: torch.Tensor

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = 1024,
        hop: int = 160,
        win: int = 1024,
        n_mels: int = MEL_BINS,
        fmin: float = 0.0,
        fmax: float = 8000.0,
        frames: int = MEL_FRAMES,
    ) -> None:
        super().__init__()
        if win > n_fft:
            raise ValueError(f"window {win} longer than n_fft {n_fft}")
        self.sample_rate, self.n_fft, self.hop, self.win = sample_rate, n_fft, hop, win
        self.n_mels, self.frames = n_mels, frames
        mel = librosa.filters.mel(
            sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=False, norm="slaney"
        )
        self.register_buffer("mel_basis", torch.from_numpy(mel).float())  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("window", torch.hann_window(win, periodic=True), persistent=False)

    @property
    def num_samples(self) -> int:
        """Waveform length that gives exactly `frames` frames after the cut (AudioLDM: 1024 * 160)."""
        return self.frames * self.hop

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"expected a batch of waveforms (B, samples), got shape {tuple(waveform.shape)}")
        x = waveform.float().clamp(-1.0, 1.0)
        spec = torch.stft(
            x, self.n_fft, hop_length=self.hop, win_length=self.win, window=self.window,
            center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True,
        ).abs()  # (B, n_fft // 2 + 1, T)
        mel = torch.log(torch.clamp(self.mel_basis @ spec, min=1e-5)).transpose(1, 2)  # (B, T, n_mels)
        missing = self.frames - mel.shape[1]
        if missing > 0:
            mel = torch.nn.functional.pad(mel, (0, 0, 0, missing))  # zeros after the log, as AudioLDM
        return mel[:, : self.frames]


@functools.lru_cache(maxsize=1)
def _default_front_end() -> MelFrontEnd:
    return MelFrontEnd().eval()


def log_mel(waveform: np.ndarray, front_end: MelFrontEnd | None = None) -> np.ndarray:
    """One clip: audioldm_waveform then MelFrontEnd -> float32 log mel (frames, n_mels), (1024, 64) by default."""
    front_end = front_end if front_end is not None else _default_front_end()
    x = audioldm_waveform(waveform, front_end.num_samples)
    device = front_end.mel_basis.device
    with torch.inference_mode():
        mel = front_end(torch.from_numpy(x).to(device)[None])
    return mel[0].float().cpu().numpy()

