"""The local weights folder: required files and folders (one-line errors) and sha256 checksums.

No model hub is assumed at run time: every model that is not built with random weights loads from a folder the
user provides (`--weights`); its layout is in README.md (`python -m preprocess.weights check` verifies it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def missing_weights(path: Path, what: str) -> FileNotFoundError:
    """The one-line error every loader raises for an absent checkpoint file or folder."""
    return FileNotFoundError(
        f"{what} not found at {path}: see the weights layout in README.md (`make weights` fetches it)"
    )


def is_weight_file(path: Path) -> bool:
    return path.is_file() and path.suffix in WEIGHT_SUFFIXES


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """Hex sha256 over the weight files of a folder (recursively), sorted by relative path.

    Each file contributes `relative/path:sha256\\n`, so renaming or swapping a file changes the digest;
    configs and tokenizer files are not included (they are small and versioned by the checkpoint).
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if is_weight_file(p))
    if not files:
        raise missing_weights(root, f"weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(root).as_posix()}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise missing_weights(path, what)
    return path


def require_model_dir(path: Path, what: str) -> Path:
    """A Hugging Face style model folder: config.json plus at least one weight file."""
    if not (path / "config.json").is_file():
        raise missing_weights(path / "config.json", what)
    if not any(is_weight_file(p) for p in path.iterdir()):
        raise missing_weights(path, f"{what} weights ({', '.join(WEIGHT_SUFFIXES)})")
    return path


def weights_folder(weights_dir: Path | None, what: str) -> Path:
    """The weights folder a model without random init loads from; ValueError when none was given."""
    if weights_dir is None:
        raise ValueError(f"{what}: random_init is off but no weights folder was given (--weights)")
    return Path(weights_dir)
