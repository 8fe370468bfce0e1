"""The local weights folder: required files and folders (one-line errors) and sha256 checksums.

No model hub is assumed at run time: every model that is not built with random weights loads from a folder the
user provides (`--weights`); its layout is in README.md (`python -m preprocess.weights check` verifies it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
    """`path` if it is a file; a one-line error if it is absent or is something else (a folder)."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise FileNotFoundError(f"{what} at {path} is {kind}, not a checkpoint file: see the weights layout in README.md")
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


def _load_error(folder: Path, what: str, error: BaseException) -> ValueError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return ValueError(f"{folder}: cannot load {what} ({reason[:300]})")


def load_pretrained_parts(load: Callable[..., Any], folder: Path, what: str) -> Any:
    """`load(folder, local_files_only=True)`: a transformers processor's or tokenizer's from_pretrained, with a
    damaged folder (a config.json that is not JSON or of the wrong shape, an unreadable file) as one ValueError
    line naming the folder."""
    try:
        return load(folder, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - from_pretrained raises OSError, JSONDecodeError, TypeError, ...
        raise _load_error(folder, what, error) from None


def load_pretrained_model(load: Callable[..., Any], folder: Path, what: str) -> Any:
    """`load(folder, local_files_only=True)`: a transformers or diffusers model's from_pretrained, with a damaged
    or incomplete folder as one ValueError line naming it: an unreadable or truncated weight file, a config.json
    that is not JSON or of the wrong shape, tensors whose shapes differ from the config's, and learnt tensors
    (parameters) that the weights lack, which from_pretrained would leave at random values with a note. Buffers
    the weights lack and tensors the model does not use are logged as warnings."""
    try:
        model, info = load(folder, local_files_only=True, output_loading_info=True)
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, JSONDecodeError, RuntimeError (shapes)...
        raise _load_error(folder, what, error) from None
    parameters = {name for name, _ in model.named_parameters()}
    missing = sorted(info.get("missing_keys") or ())
    absent = [key for key in missing if key in parameters]
    mismatched = [str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in info.get("mismatched_keys") or ()]
    if absent or mismatched:
        shown = (absent or mismatched)[:3]
        kind = "lack" if absent else "have other shapes for"
        raise ValueError(f"{folder}: the {what} weights {kind} {len(absent or mismatched)} of the model's tensors "
                         f"({', '.join(shown)}{', ...' if len(absent or mismatched) > 3 else ''}): a damaged or "
                         "different checkpoint")
    if set(missing) - set(absent):
        log.warning("%s: %s weights lack buffers %s (model defaults used)", folder, what, sorted(set(missing) - set(absent))[:3])
    if info.get("unexpected_keys"):
        log.warning("%s: %s weights hold tensors the model does not use: %s", folder, what, sorted(info["unexpected_keys"])[:3])
    return model
