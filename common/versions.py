"""The software versions recorded with every output (meta.json of the shards, results.json of an evaluation)."""

from __future__ import annotations

import platform
from importlib import metadata

SOFTWARE = ("vta-sam", "torch", "torchvision", "transformers", "diffusers", "open_clip_torch", "webdataset", "decord", "av",
            "numpy", "scipy", "librosa", "soxr", "soundfile", "opencv-python-headless", "h5py", "accelerate", "torchaudio",
            "timm", "hear21passt")  # the last three shape the av-benchmark metrics


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour shapes features, training and metrics."""
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
