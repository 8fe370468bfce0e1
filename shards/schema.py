"""The shard format: the one contract between stage one (writer) and stages two/three (readers).

A shard is a WebDataset tar. Each sample is a group of members sharing a key (`<key>.<ext>`):

| member            | dtype    | shape                          | meaning                                              |
|-------------------|----------|--------------------------------|------------------------------------------------------|
| `json`            | utf-8    | -                              | the sample's metadata: `SampleMeta`                  |
| `clip.npy`        | float16  | (frames, embed_dim)            | CLIP image embedding per frame (zeros past the end)  |
| `caption.npy`     | float16  | (embed_dim,)                   | CLIP text embedding of the caption                   |
| `nouns.npy`       | float16  | (nouns, embed_dim)             | CLIP text embedding e_k of each grounded noun        |
| `probs.npy`       | float16  | (frames, nouns)                | p_tk = detector_tk * iou_tk: noun k seen in frame t  |
| `detector.npy`    | float16  | (frames, nouns)                | v2: Grounding DINO's score of noun k's best box      |
| `iou.npy`         | float16  | (frames, nouns)                | v2: SAM's predicted IoU of that box in [0, 1] (ones  |
|                   |          |                                | without SAM)                                         |
| `latent_mean.npy` | float16  | (channels, latent_time, freq)  | AudioLDM VAE posterior mean                          |
| `latent_std.npy`  | float16  | (channels, latent_time, freq)  | AudioLDM VAE posterior standard deviation            |
| `flac`            | int16    | (samples,)                     | 16 kHz mono waveform of the window (true length)     |

`nouns` is 0..max_nouns per clip; per-frame arrays are zeros past the clip's end. Raw features are stored; the
model's conditions (among them the object embedding O_t = sum_k p_tk e_k, Eq. 1, with p_tk zeroed where the
detector score is under the object threshold) are derived when loading (`shards.conditions`).

Versions: stage one writes version 2. Version 1 (no `detector.npy` / `iou.npy`) is still read and validated: a
sample holds the members of its folder's version (`ShardSpec.array_keys`), and only the object threshold differs
(it then applies to `probs.npy` itself, `shards.conditions`).

Only safe formats are decoded: npy without pickle, json, flac. Anything else is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMA_VERSION = 2  # what stage one writes
READ_VERSIONS = (1, 2)  # what the readers accept
FEATURE_DTYPE = np.float16

PROBS_KEY = "probs.npy"
DETECTOR_KEY = "detector.npy"  # version 2
IOU_KEY = "iou.npy"  # version 2
ARRAY_KEYS = ("clip.npy", "caption.npy", "nouns.npy", PROBS_KEY, DETECTOR_KEY, IOU_KEY, "latent_mean.npy",
              "latent_std.npy")  # every array member a sample of any version may have
ARRAY_KEYS_BY_VERSION: dict[int, tuple[str, ...]] = {
    1: tuple(k for k in ARRAY_KEYS if k not in (DETECTOR_KEY, IOU_KEY)),
    2: ARRAY_KEYS,
}
META_KEY = "json"
AUDIO_KEY = "flac"
SAMPLE_KEYS = (META_KEY, *ARRAY_KEYS, AUDIO_KEY)  # the members a reader decodes; any other is refused
REQUIRED_KEYS = (META_KEY, *ARRAY_KEYS_BY_VERSION[1], AUDIO_KEY)  # the members every version has


class ShardFormatError(ValueError):
    """A shard member or sample that does not follow the schema."""


@dataclass(frozen=True)
class SampleMeta:
    """The `json` member of a sample: what a sample says about its clip (a window of a video)."""

    id: str  # unique clip id (names the sample key, the generated WAV and the cached embeddings)
    caption: str  # text whose nouns were grounded
    label: str  # class label (VGGSound's), may be empty
    split: str  # train / test / ...
    duration: float  # seconds of video from `start`, capped at the window (frames and audio past it are padding)
    valid_frames: int  # frames of `clip.npy` / `probs.npy` inside the video (the rest are zeros)
    nouns: tuple[str, ...]  # noun k of `nouns.npy` / `probs.npy`
    source: str  # path of the original video
    start: float = 0.0  # seconds into `source` where the window starts
    silent: bool = False  # the window's audio is silence (peak under 1e-6)
    source_stamp: str = ""  # "<size>:<mtime in ns>" of `source` when the sample was made ("" in older shards)

    @classmethod
    def from_json(cls, data: Any) -> SampleMeta:
        """From a decoded json member; ShardFormatError naming the clip when a field is missing or mistyped."""
        if not isinstance(data, dict):
            raise ShardFormatError(f"json member is a {type(data).__name__}, not an object")
        clip_id = data.get("id", "?")
        missing = [f for f in META_FIELDS if f not in data]
        if missing:
            raise ShardFormatError(f"{clip_id}: json lacks {', '.join(missing)}")
        try:
            fields = dict(id=_typed(data, "id", str), caption=_typed(data, "caption", str), label=_typed(data, "label", str),
                          split=_typed(data, "split", str), duration=float(_typed(data, "duration", (int, float))),
                          valid_frames=_typed(data, "valid_frames", int),
                          nouns=tuple(_typed(n, "nouns", str) for n in _typed(data, "nouns", list)),
                          source=_typed(data, "source", str), start=float(_typed(data, "start", (int, float), 0.0)),
                          silent=_typed(data, "silent", bool, False),
                          source_stamp=_typed(data, "source_stamp", str, ""))
        except TypeError as error:
            raise ShardFormatError(f"{clip_id}: json {error}") from None
        meta = cls(**fields)
        problem = id_problem(meta.id)
        if problem:
            raise ShardFormatError(f"{meta.id!r}: json id {problem}")
        for name in ("duration", "start"):
            value = getattr(meta, name)
            if not math.isfinite(value) or value < 0:
                raise ShardFormatError(f"{meta.id}: json {name} must be a finite number of seconds >= 0, got {value!r}")
        return meta

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"nouns": list(self.nouns)}


def _typed(data: Any, name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """data[name] (or data itself for a list item) when it has the type `kind`; TypeError otherwise."""
    value = data.get(name, default) if isinstance(data, dict) else data
    if isinstance(value, bool) and kind in (int, (int, float)) or not isinstance(value, kind):
        raise TypeError(f"field {name!r} is {value!r}, expected {getattr(kind, '__name__', 'a number')}")
    return value


# fields every json member must have (start, silent and source_stamp came later: readers default them)
META_FIELDS = tuple(f.name for f in dataclasses.fields(SampleMeta) if f.default is dataclasses.MISSING)


MAX_WINDOW_SECONDS = 3600  # a window's audio is held whole (the paper's: 10.24 s)


@dataclass(frozen=True)
class ShardSpec:
    """Shapes every sample must have; derived from the stage-one config, stored in meta.json."""

    num_frames: int
    embed_dim: int
    max_nouns: int
    latent_channels: int
    latent_time: int
    latent_freq: int
    sample_rate: int = 16000
    window_seconds: float = 10.24
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version not in READ_VERSIONS:
            raise ShardFormatError(f"shards have schema version {self.schema_version!r}; this code reads versions "
                                   f"{', '.join(map(str, READ_VERSIONS))}")
        sizes = ("num_frames", "embed_dim", "max_nouns", "latent_channels", "latent_time", "latent_freq", "sample_rate")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_nouns" else 1):
                raise ShardFormatError(f"spec {name} must be a positive integer, got {value!r}")
        window = self.window_seconds
        if not isinstance(window, (int, float)) or isinstance(window, bool) or not math.isfinite(window) or window <= 0 \
                or window > MAX_WINDOW_SECONDS:
            raise ShardFormatError(f"spec window_seconds must be a positive number of seconds up to {MAX_WINDOW_SECONDS}, "
                                   f"got {window!r}")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_time, self.latent_freq)

    @property
    def num_samples(self) -> int:
        return round(self.window_seconds * self.sample_rate)

    @property
    def array_keys(self) -> tuple[str, ...]:
        """The array members every sample of this schema version holds."""
        return ARRAY_KEYS_BY_VERSION[self.schema_version]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardSpec:
        """The spec of a meta.json; ShardFormatError for a version this code does not read (also when absent)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names} | {"schema_version": data.get("schema_version")})

    def expected_shapes(self, num_nouns: int) -> dict[str, tuple[int, ...]]:
        """Shape of each array member of a sample with `num_nouns` nouns (this version's members only)."""
        shapes = {
            "clip.npy": (self.num_frames, self.embed_dim),
            "caption.npy": (self.embed_dim,),
            "nouns.npy": (num_nouns, self.embed_dim),
            PROBS_KEY: (self.num_frames, num_nouns),
            DETECTOR_KEY: (self.num_frames, num_nouns),
            IOU_KEY: (self.num_frames, num_nouns),
            "latent_mean.npy": self.latent_shape,
            "latent_std.npy": self.latent_shape,
        }
        return {k: shapes[k] for k in self.array_keys}


def id_problem(clip_id: str) -> str | None:
    """Why `clip_id` cannot name a clip (None: it can). Ids name files and lines of files (a WAV per clip,
    clip_ids.txt, JSON-lines records): an id must be non-empty, hold no character that ends a line (\n, \r, \x85,
    \u2028...), no NUL and no lone surrogate, and not begin or end with white space (a line is stripped when read
    back)."""
    if not clip_id:
        return "is empty"
    if "\x00" in clip_id or any(len(f"x{c}x".splitlines()) > 1 for c in clip_id):
        return "holds a line break or a NUL (ids name files and lines)"
    if clip_id != clip_id.strip():
        return "begins or ends with white space"
    if any("\ud800" <= c <= "\udfff" for c in clip_id):  # a JSON escape, or a file name not in UTF-8 (surrogateescape)
        return "holds a lone surrogate (not text that files and terminals can write)"
    return None


def sample_key(clip_id: str) -> str:
    """WebDataset splits a member name at its first dot, so the key may not contain one (nor a slash)."""
    key = clip_id.replace(".", "_").replace("/", "_")
    if not key:
        raise ShardFormatError(f"clip id {clip_id!r} gives an empty sample key")
    return key


# ----------------------------------------------------------------------------------- encoding
def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _flac_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    pcm = np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0)
    soundfile.write(buffer, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def encode_sample(spec: ShardSpec, meta: dict[str, Any], arrays: dict[str, np.ndarray], waveform: np.ndarray) -> dict[str, Any]:
    """Validate and serialise one sample into the `{"__key__": ..., ext: bytes}` dict a TarWriter takes."""
    arrays = {k: np.asarray(v).astype(FEATURE_DTYPE) for k, v in arrays.items()}
    validate(spec, meta, arrays, waveform)
    sample: dict[str, Any] = {"__key__": sample_key(meta["id"]), META_KEY: json.dumps(meta, sort_keys=True).encode("utf-8")}
    for k in spec.array_keys:
        sample[k] = _npy_bytes(arrays[k])
    sample[AUDIO_KEY] = _flac_bytes(waveform, spec.sample_rate)
    return sample


# ----------------------------------------------------------------------------------- decoding
READER_FIELDS = ("__key__", "__url__")  # what a reader adds to a raw sample; never tar members


def _npy_header(name: str, data: bytes, spec: ShardSpec | None) -> None:
    """Check an npy member's header before any of its data is read: format 1.0 or 2.0, little-endian float16, a
    data length that is exactly what the shape declares, and (given the spec) a shape within the schema's. So a
    forged header can neither unpickle nor make `np.load` allocate more than the member holds."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"npy format version {version[0]}.{version[1]}")
    except ValueError as error:
        raise ShardFormatError(f"member {name!r} is not a plain npy array ({error})") from None
    if dtype != np.dtype("<f2"):
        raise ShardFormatError(f"member {name!r} is not a plain npy array of little-endian float16 "
                               f"(dtype {dtype.str})")
    held = len(data) - buffer.tell()
    if held != 2 * int(np.prod(shape, dtype=object)):
        raise ShardFormatError(f"member {name!r} declares shape {tuple(shape)} but holds {held} bytes of data")
    if spec is not None:
        bound = spec.expected_shapes(spec.max_nouns).get(name)
        if bound is None or len(shape) != len(bound) or any(n > b for n, b in zip(shape, bound)):
            raise ShardFormatError(f"member {name!r} declares shape {tuple(shape)}, the schema allows at most {bound}")


def _decode_member(name: str, data: bytes, spec: ShardSpec | None = None) -> Any:
    if name == META_KEY:
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as error:  # also nesting too deep, an integer of too many digits
            raise ShardFormatError(f"json member is not JSON ({type(error).__name__}: {error})") from None
    if name in ARRAY_KEYS:
        _npy_header(name, data, spec)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as error:  # object arrays need pickle: refused
            raise ShardFormatError(f"member {name!r} is not a plain npy array ({error})") from None
    if name == AUDIO_KEY:
        return read_flac(data, None if spec is None else spec.sample_rate)
    raise ShardFormatError(f"unknown member {name!r}: refusing to decode it (only {', '.join(SAMPLE_KEYS)})")


FLAC_MAGIC = b"fLaC"
AUDIO_MAGICS = {b"RIFF": "WAV", b"RF64": "WAV", b"OggS": "Ogg", b"ID3": "MP3", b"\xff\xfb": "MP3", b"FORM": "AIFF"}


FLAC_BLOCK = 1 << 16  # samples read at a time
FLAC_MAX_FRAMES = 1 << 24  # 17 minutes at 16 kHz: far beyond any window; a member decoding to more is refused


def read_flac(data: bytes, sample_rate: int | None) -> np.ndarray:
    """The float32 mono waveform of a `flac` member; ShardFormatError when it is not FLAC (soundfile would read a WAV
    or an Ogg file just as well: stage one writes FLAC only, so another format is a file put there by hand), not
    mono, or (given `sample_rate`) of another rate, whose samples would be read as the schema's rate."""
    import soundfile

    if not data.startswith(FLAC_MAGIC):
        kind = next((name for magic, name in AUDIO_MAGICS.items() if data.startswith(magic)), None)
        raise ShardFormatError(f"member 'flac' is not FLAC ({f'a {kind} file' if kind else 'no fLaC signature'})")
    blocks: list[np.ndarray] = []
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as file:
            if sample_rate is not None and file.samplerate != sample_rate:
                raise ShardFormatError(f"member 'flac' is {file.samplerate} Hz, the folder's schema says {sample_rate} Hz")
            if file.channels != 1:
                raise ShardFormatError(f"member 'flac' has {file.channels} channels, the schema says mono")
            # read in blocks, not at once: soundfile sizes a whole read by the header's frame count, and a forged
            # STREAMINFO claiming 2**36 frames asked for 256 GiB (MemoryError) whatever the member's few bytes hold
            total = 0
            while True:
                blocks.append(file.read(FLAC_BLOCK, dtype="float32"))
                total += len(blocks[-1])
                if len(blocks[-1]) < FLAC_BLOCK or total > FLAC_MAX_FRAMES:
                    break
    except ShardFormatError:
        raise
    except (RuntimeError, ValueError, TypeError, soundfile.SoundFileError) as error:
        raise ShardFormatError(f"member 'flac' is not readable FLAC ({error})") from None
    waveform = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if len(waveform) > FLAC_MAX_FRAMES:
        raise ShardFormatError(f"member 'flac' holds more than {FLAC_MAX_FRAMES} samples")
    return waveform


def decode_sample(raw: dict[str, Any], spec: ShardSpec | None = None) -> dict[str, Any]:
    """Decode one raw WebDataset sample (member bytes) into numpy arrays, json and a waveform.

    Never unpickles: `.pyd`, `.pickle`, `.pth`, object arrays, other `__*` names than the reader's `__key__` and
    `__url__`, and unknown members raise ShardFormatError. npy headers are checked before their data is read
    (against the spec's shapes when given).
    """
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name in READER_FIELDS:
            out[name] = value
            continue
        out[name] = _decode_member(name, value, spec)
    missing = [k for k in REQUIRED_KEYS if k not in out]  # a version's own members: `validate`
    if missing:
        where = raw.get("__url__", "?")
        raise ShardFormatError(f"sample {raw.get('__key__')!r} in {where} lacks {', '.join(missing)}")
    return out


def validate(spec: ShardSpec, meta: dict[str, Any], arrays: dict[str, np.ndarray], waveform: np.ndarray) -> None:
    """Raise ShardFormatError unless the sample matches the spec exactly."""
    checked = SampleMeta.from_json(meta)
    clip_id = checked.id
    num_nouns = len(checked.nouns)
    if num_nouns > spec.max_nouns:
        raise ShardFormatError(f"{clip_id}: {num_nouns} nouns > max_nouns {spec.max_nouns}")
    for key, shape in spec.expected_shapes(num_nouns).items():
        if key not in arrays:
            raise ShardFormatError(f"{clip_id}: missing {key} (schema version {spec.schema_version} requires it)")
        array = arrays[key]
        if array.dtype != FEATURE_DTYPE:
            raise ShardFormatError(f"{clip_id}: {key} has dtype {array.dtype}, expected {np.dtype(FEATURE_DTYPE)}")
        if tuple(array.shape) != shape:
            raise ShardFormatError(f"{clip_id}: {key} has shape {tuple(array.shape)}, expected {shape}")
        if not np.isfinite(array).all():
            raise ShardFormatError(f"{clip_id}: {key} has non-finite values")
    for key in (PROBS_KEY, DETECTOR_KEY, IOU_KEY):
        values = arrays[key] if key in spec.array_keys else None  # present: checked above
        if values is not None and values.size and (values.min() < 0 or values.max() > 1):
            raise ShardFormatError(f"{clip_id}: {key} outside [0, 1]")
    if "latent_std.npy" in arrays and arrays["latent_std.npy"].size and arrays["latent_std.npy"].min() < 0:
        raise ShardFormatError(f"{clip_id}: latent_std.npy has negative values (a standard deviation is >= 0)")
    if DETECTOR_KEY in spec.array_keys:
        product = arrays[DETECTOR_KEY].astype(np.float32) * arrays[IOU_KEY].astype(np.float32)
        # each factor and the product are float16: 2e-3 covers their rounding (half an ulp at 1 is 2.4e-4)
        if not np.allclose(arrays[PROBS_KEY].astype(np.float32), product, rtol=0, atol=2e-3):
            raise ShardFormatError(f"{clip_id}: {PROBS_KEY} is not {DETECTOR_KEY} * {IOU_KEY}")
    if not 0 <= meta["valid_frames"] <= spec.num_frames:
        raise ShardFormatError(f"{clip_id}: valid_frames {meta['valid_frames']} outside [0, {spec.num_frames}]")
    if waveform.ndim != 1 or waveform.shape[0] > spec.num_samples:
        raise ShardFormatError(f"{clip_id}: waveform shape {waveform.shape}, expected (<= {spec.num_samples},)")


def validate_decoded(spec: ShardSpec, sample: dict[str, Any]) -> None:
    arrays = {k: sample[k] for k in spec.array_keys if k in sample}
    validate(spec, sample[META_KEY], arrays, np.asarray(sample[AUDIO_KEY]))
