"""The local weights folder: required files and folders (one-line errors) and sha256 checksums.

No model hub is assumed at run time: every model that is not built with random weights loads from a folder the
user provides (`--weights`); its layout is in README.md (`python -m preprocess.weights check` verifies it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

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


def one_line(error: BaseException, limit: int = 300) -> str:
    """The error's type and message on one line (its lines joined: load_state_dict's first line alone says only
    'Error(s) in loading state_dict'), cut at `limit` characters. A file refused by torch's restricted unpickler
    (`torch.load(weights_only=True)`) gives the reason for the refusal, which its message puts after a paragraph of
    advice longer than the limit."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch bolds part of its advice with terminal escapes
    if text.startswith("Weights only load failed"):
        # the reason is after "WeightsUnpickler error:" (torch 2.6+) or in the paragraph after the advice (others)
        paragraphs = text.split("WeightsUnpickler error:", 1)[1:] or text.split("\n\n")[1:]
        reasons = [part for part in paragraphs if part.strip() and not part.strip().startswith("Check the documentation")]
        reason = reasons[0].strip().split("\n\n")[0].split(" Please use `torch.serialization")[0] if reasons else ""
        text = f"the restricted unpickler refused the file: {reason.strip() or text}"
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def weight_file_problem(path: Path) -> str | None:
    """What a quick look finds wrong with a weight file, without loading it (None: nothing found): an empty file, a
    safetensors file whose header does not read or does not fit the file, a torch zip archive with a damaged
    member. A legacy (non-zip) torch file is only loaded, never opened here."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    if size == 0:
        return "empty file"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (OSError, SafetensorError) as error:
            return f"not a readable safetensors file ({' '.join(str(error).split())[:200]})"
        return None
    with open(path, "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"  # torch.save's archive
    if zipped and not zipfile.is_zipfile(path):  # its directory is at the end: a file cut short has none
        return "a torch zip archive cut short (no central directory)"
    if zipped:
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            return f"a damaged torch zip archive ({error})"
        if damaged is not None:
            return f"a damaged torch zip archive (member {damaged} fails its CRC)"
    return None


CONFIG_SUFFIXES = (".json", ".txt", ".model")  # config.json, preprocessor and tokenizer files (vocab.txt, spm .model)


def sha256_configs(path: str | Path) -> str | None:
    """Hex sha256 over the files of a model folder (or one file) that shape the model or its inputs without being
    weights: config.json, the preprocessor's and tokenizer's files (`CONFIG_SUFFIXES`, recursively, hidden ones
    left out), each JSON file canonicalised (key order and spacing do not count); None when there are none.

    The weights' checksum (`sha256_dir`) leaves these out, and a config.json that changes an activation function or
    a tokenizer that splits otherwise gives other features from the same weights: stage one records this digest
    beside the weights' (`meta.json` "config_checksum"), and generation and evaluation compare it."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in CONFIG_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        data = file.read_bytes()
        if file.suffix == ".json":
            try:
                data = json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
            except (ValueError, RecursionError):
                pass  # not JSON: its bytes
        name = file.name if file == root else file.relative_to(root).as_posix()
        digest.update(f"{name}:{hashlib.sha256(data).hexdigest()}\n".encode())
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
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"{what} at {path} is a file, not a model folder: see the weights layout in README.md")
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


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
    """transformers' and diffusers' own output while loading off: their progress bar ('Loading weights') and their
    load report (a paragraph per missing, unexpected or mismatched tensor), which `load_pretrained_model` says in
    its one line or its warnings instead."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = [(module, module.get_verbosity(), module.is_progress_bar_enabled())
             for module in (transformers_logging, diffusers_logging)]
    for module, _, _ in saved:
        module.set_verbosity(module.CRITICAL)  # diffusers says a missing .safetensors as an ERROR before .bin
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, verbosity, bar in saved:
            module.set_verbosity(verbosity)
            if bar:
                module.enable_progress_bar()


def _config_problem(load: Callable[..., Any], folder: Path) -> str | None:
    """A config.json of another kind of model than the class `load` belongs to (transformers' model_type,
    diffusers' _class_name), which from_pretrained would build anyway: None when it agrees, or says nothing."""
    owner = getattr(load, "__self__", None)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # from_pretrained says what is wrong with it
    if not isinstance(config, dict) or owner is None:
        return None
    expected = getattr(getattr(owner, "config_class", None), "model_type", None)
    if isinstance(expected, str) and expected and "model_type" in config and config["model_type"] != expected:
        return f"model_type {config['model_type']!r}, where {owner.__name__} needs {expected!r}"
    diffusers_model = expected is None and hasattr(owner, "config_name")
    if diffusers_model and "_class_name" in config and config["_class_name"] != owner.__name__:
        return f"_class_name {config['_class_name']!r}, where {owner.__name__} is loaded"
    return None


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, from its header alone (no tensor data is read); the
    dtype as safetensors names it ("F32", "BF16", "I32"...). OSError or safetensors.SafetensorError when the file
    does not read."""
    from safetensors import safe_open

    header: dict[str, tuple[str, tuple[int, ...]]] = {}
    with open(path, "rb"):  # safetensors says FileNotFoundError for every failure to open (a permission denied too)
        pass
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            piece = handle.get_slice(name)
            header[name] = (str(piece.get_dtype()), tuple(piece.get_shape()))
    return header


def is_float_dtype(dtype: str) -> bool:
    """Whether a dtype name is a floating one: safetensors' ("F16", "BF16") or torch's ("float16", "bfloat16")."""
    return dtype.startswith(("F", "BF", "float", "bfloat"))


def non_finite_tensor(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating tensor of (name, tensor) pairs holding NaN or an infinity, or None."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


# the single weight files from_pretrained reads (transformers', diffusers'), safetensors first
STANDARD_WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                         "diffusion_pytorch_model.bin")


def read_weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder that from_pretrained reads: the first standard single file there
    (`STANDARD_WEIGHT_FILES`), else the shards its index (`*.index.json`) lists, else every weight file (a folder of other
    names, which from_pretrained refuses itself). Another file beside them (a stale copy) is not one of them."""
    for name in STANDARD_WEIGHT_FILES:
        if (folder / name).is_file():  # from_pretrained takes a single file before an index beside it
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                listed = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
                return sorted({folder / str(shard) for shard in listed if (folder / str(shard)).is_file()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                break  # every weight file: from_pretrained says what is wrong with the index
    return sorted(p for p in folder.iterdir() if is_weight_file(p))


def _folder_headers(folder: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]] | None:
    """{file name: `safetensors_header`} of the safetensors files from_pretrained reads in a model folder
    (`read_weight_files`; {} without any), read once for the checks before and after from_pretrained; None when
    one does not read (from_pretrained says why)."""
    from safetensors import SafetensorError

    try:
        return {file.name: safetensors_header(file) for file in read_weight_files(folder) if file.suffix == ".safetensors"}
    except (OSError, SafetensorError):
        return None


def _shape_problem(load: Callable[..., Any], folder: Path,
                   headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] | None) -> str | None:
    """A tensor whose shape in the folder's safetensors files (`headers`) differs from the one config.json gives
    it, found with the model built on the meta device (no memory) before from_pretrained builds it for real: a
    config.json with absurd sizes (block_out_channels 10**9) would otherwise take their memory first; also a
    config.json that builds no model. A tensor that from_pretrained renames while loading is compared with the
    model's tensor of the new name (`loading_names`). None when they agree, or when this cannot be told here (no
    safetensors file, or one that does not read)."""
    owner = getattr(load, "__self__", None)
    stored = {name: shape for header in (headers or {}).values() for name, (_, shape) in header.items()}
    if owner is None or not stored:
        return None
    try:
        with _quiet_loaders(), torch.device("meta"):
            config_class = getattr(owner, "config_class", None)
            if config_class is not None:  # transformers
                model = owner(config_class.from_pretrained(folder, local_files_only=True))
            else:  # diffusers
                model = owner.from_config(owner.load_config(folder, local_files_only=True))
    except Exception as error:  # noqa: BLE001 - from_pretrained builds the same model: it would fail as well, or
        # first take the memory of absurd sizes ("Storage size calculation overflowed", or tens of GB)
        return f"config.json describes no model that can be built ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    built = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    renamed = loading_names(model, stored)
    for name, shape in sorted(stored.items()):
        target, as_stored = renamed.get(name, (name, True))
        if as_stored and target in built and built[target] != shape:
            return f"{name} is {list(shape)} in the weights, {list(built[target])} by config.json"
    return None


def loading_names(model: Any, names: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """{name of a tensor in a checkpoint: (the name of the model's tensor from_pretrained loads it into, whether it
    loads as it is stored)} for the checkpoint names from_pretrained renames while loading, computed the way it
    does: transformers' checkpoint conversion mapping of the model class and its sub-models (Grounding DINO's
    checkpoints store its Swin backbone's `...conv_encoder.model.encoder.layers.0.blocks.0.attention.self.query.weight`,
    loaded as `...conv_encoder.model.swin.encoder.layers.0.blocks.0.attention.q_proj.weight`; a base-model prefix
    added or dropped), diffusers' renaming of deprecated attention blocks (`query.weight` as `to_q.weight`). A name loaded by a weight converter
    (tensors split, fused or stacked into the model's) is not loaded as stored: its shape differs by design. Names
    loaded under their own name are left out, as are all of them when the loader's renaming cannot be asked."""
    names = list(names)
    renamed: dict[str, tuple[str, bool]] = {}
    try:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            transforms = get_model_conversion_mapping(model, None, None)
            renamings = [entry for entry in transforms if isinstance(entry, WeightRenaming)]
            converters = [entry for entry in transforms if isinstance(entry, WeightConverter)]
            own = model.state_dict()
            prefix = model.base_model_prefix
            for name in names:
                target, converter = rename_source_key(name, renamings, converters, prefix, own)
                if target not in own and name in own:  # as from_pretrained: a name of the model's own stays
                    target, converter = rename_source_key(name, [], [], prefix, own)
                if target != name or converter is not None:
                    renamed[name] = (target, converter is None)
        elif callable(getattr(model, "_fix_state_dict_keys_on_load", None)):  # diffusers
            from collections import OrderedDict

            fixed = OrderedDict((name, name) for name in names)
            model._fix_state_dict_keys_on_load(fixed)  # renames the keys in place, each keeping its value
            renamed = {name: (target, True) for target, name in fixed.items() if target != name}
    except (ImportError, AttributeError, TypeError, ValueError, KeyError):  # another loader version: names as stored
        return {}
    return renamed


def _layer_pattern(name: str) -> str:
    """A tensor's name with its layer indices blanked ('encoder.layers.3.fc1.weight' -> 'encoder.layers.#.fc1.weight')."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "#", name)


def _unbuilt_layers(model: Any, unexpected: Iterable[str]) -> list[str]:
    """The unused tensors of a checkpoint that belong to more layers of the model's own kinds than its config builds
    (a config.json with fewer layers or blocks than the weights: loading used the first ones and dropped the rest),
    sorted; tensors of other names (what a checkpoint may carry beside the model) are not among them."""
    built = {_layer_pattern(name) for name in model.state_dict()}
    return sorted(key for key in unexpected if re.search(r"\.\d+\.", key) and _layer_pattern(key) in built)


def load_pretrained_model(load: Callable[..., Any], folder: Path, what: str) -> Any:
    """`load(folder, local_files_only=True)`: a transformers or diffusers model's from_pretrained, with a damaged
    or incomplete folder as one ValueError line naming it: an unreadable or truncated weight file, a config.json
    that is not JSON, of the wrong shape or of another kind of model (`_config_problem`), tensors whose shapes
    differ from the config's (named), learnt tensors (parameters) that the weights lack, which from_pretrained
    would leave at random values with a note, and weights that loaded but are no trained model's
    (`loaded_weights_problem`). Buffers the weights lack and tensors the model does not use are logged as
    warnings; the loaders' own progress bar and report stay off (`_quiet_loaders`)."""
    problem = _config_problem(load, folder)
    if problem:
        raise ValueError(f"{folder / 'config.json'}: {problem}: not a {what} folder")
    for file in read_weight_files(folder):  # empty, cut short: named as such (from_pretrained says "Unable to load")
        problem = weight_file_problem(file)
        if problem:
            raise ValueError(f"{file}: {problem}")
    headers = _folder_headers(folder)
    problem = _shape_problem(load, folder, headers)
    if problem:
        raise ValueError(f"{folder}: the {what} weights do not fit its config.json ({problem})")
    try:
        with _quiet_loaders():
            # mismatched sizes are named below from the loading info, instead of a "see the report above" error
            model, info = load(folder, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True)
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
    problem = loaded_weights_problem(model, folder, headers)
    if problem:
        raise ValueError(f"{folder}: the {what} weights are not a trained model's ({problem}): a damaged checkpoint")
    if set(missing) - set(absent):
        log.warning("%s: %s weights lack buffers %s (model defaults used)", folder, what, sorted(set(missing) - set(absent))[:3])
    extra = _unbuilt_layers(model, info.get("unexpected_keys") or ())
    if extra:
        raise ValueError(f"{folder}: the {what} weights hold {len(extra)} tensors of layers its config.json does not "
                         f"build ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): config.json describes a "
                         "smaller model than its weights")
    if info.get("unexpected_keys"):
        log.warning("%s: %s weights hold tensors the model does not use: %s", folder, what, sorted(info["unexpected_keys"])[:3])
    return model


def state_dict_problem(model: torch.nn.Module, state: Mapping[str, Any]) -> str | None:
    """What makes `state` not a checkpoint of `model`, found before anything is loaded (None: nothing): a tensor
    of another shape (which helpers such as open_clip's would interpolate into place, and load_state_dict would
    refuse in a paragraph), integers or booleans where the model has float weights (load_state_dict casts them
    without a word), NaN or infinite values. Missing and unexpected names are left to a strict load_state_dict."""
    own = model.state_dict()
    for name, tensor in state.items():
        target = own.get(name)
        if target is None or not isinstance(tensor, torch.Tensor):
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            return f"{name} is {list(tensor.shape)}, the model's {list(target.shape)}"
        if target.is_floating_point() and not tensor.is_floating_point():
            return f"{name} is stored as {tensor.dtype}, where the model has float weights"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN or infinite values"
    return None


def _stored_dtypes(folder: Path, headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] | None
                   ) -> dict[str, dict[str, str]]:
    """{file name: {tensor name: dtype}} of the weight files from_pretrained reads in `folder`: its safetensors
    files (their `headers`), else its torch .bin files (memory-mapped, with the restricted unpickler); a file that
    cannot be read this way is left out (it loaded: read by other means)."""
    if headers is None:  # a safetensors file that does not read: from_pretrained refused it before this is asked
        return {}
    if headers:
        return {file: {name: dtype for name, (dtype, _) in header.items()} for file, header in headers.items()}
    found: dict[str, dict[str, str]] = {}
    for file in (file for file in read_weight_files(folder) if file.suffix == ".bin"):
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be memory-mapped: not looked into
            continue
        if isinstance(state, dict):
            found[file.name] = {str(name): str(tensor.dtype).removeprefix("torch.") for name, tensor in state.items()
                                if isinstance(tensor, torch.Tensor)}
    return found


def loaded_weights_problem(model: torch.nn.Module, folder: Path,
                           headers: dict[str, dict[str, tuple[str, tuple[int, ...]]]] | None) -> str | None:
    """What makes a model loaded by from_pretrained from `folder` unusable although it loaded (None: nothing): a
    floating tensor holding NaN or infinities, or a float weight that a weight file of the folder (safetensors,
    whose `headers` were read before loading, or a torch .bin without them) stores as integers or booleans
    (from_pretrained casts them without a word). A stored name is matched to the model's under the name
    from_pretrained loads it as (`loading_names`: Grounding DINO's Swin backbone is stored under older names),
    then exactly or by suffix (a base-model prefix more or less)."""
    state = model.state_dict()
    bad = non_finite_tensor(state.items())
    if bad:
        return f"{bad} holds NaN or infinite values"
    floating = {name for name, tensor in state.items() if tensor.is_floating_point()}
    for file, dtypes in _stored_dtypes(folder, headers).items():
        integers = sorted(name for name, dtype in dtypes.items() if not is_float_dtype(dtype))
        renamed = loading_names(model, integers)
        for name in integers:
            target = renamed.get(name, (name, True))[0]
            if target in floating or any(key.endswith("." + target) or target.endswith("." + key) for key in floating):
                return f"{file}: {name} is stored as {dtypes[name]}, where the model has float weights"
    return None
