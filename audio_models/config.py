"""What builds AudioLDM's VAE and HiFi-GAN vocoder (`AudioModelConfig`), and the size of their mel.

The models come from one of two places, chosen by `random_init`:
- a config with random weights seeded by `seed`: toy widths (`random_size="tiny"`: tests, the demo, CI) or the
  published architectures (`"paper"`: speed and memory benchmarks without the checkpoints); or
- the weights folder, `<weights>/<audioldm_dir>/vae/` and `vocoder/` in diffusers/transformers format.

Stage one's `FeatureConfig` carries the same fields and stores them in the shards' meta.json, so evaluation and
generation rebuild the very VAE and vocoder that made the latents (`AudioModelConfig.from_features`). Their random-weight configs are in `audio_models.random_configs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MEL_FRAMES = 1024  # AudioLDM's mel: 10.24 s at hop 160 -> 1024 frames
MEL_BINS = 64


@dataclass(frozen=True)
class AudioModelConfig:
    """The AudioLDM VAE and vocoder of one set of features (field names as in stage one's FeatureConfig)."""

    random_init: bool = True
    random_size: str = "tiny"
    seed: int = 0
    audioldm_dir: str = "audioldm"
    latent_channels: int = 8
    vae_downsample: int = 4
    sample_rate: int = 16000
    window_seconds: float = 10.24
    half: bool = True  # float16 on CUDA where the VAE allows it
    batch_clips: int = 4  # clips per VAE forward pass

    @classmethod
    def from_features(cls, features: Mapping[str, Any]) -> AudioModelConfig:
        """From a stage-one config as a dict (a FeatureConfig's `to_dict`, or the "config" of a meta.json); TypeError
        naming the field whose value has another type than the field's (a "16000" for the sample rate)."""
        kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in features:
                continue
            value, allowed = features[field.name], kinds[str(field.type)]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise TypeError(f"field {field.name!r} is {value!r}, expected {field.type}")
            values[field.name] = value
        return cls(**values)

    @property
    def hop(self) -> int:
        """Samples per mel frame: 160 at 16 kHz."""
        return round(self.sample_rate * self.window_seconds / MEL_FRAMES)


