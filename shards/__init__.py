"""The shard format shared by every stage: schema, writer, readers and the conditions derived from samples.

This package is the only door to shard files: stage one writes through `ShardWriter`, training, evaluation and
the listening test read through `shards.read` (and `iterate_samples`). It imports nothing else of this project.
"""

from shards.conditions import CONDITION_NAMES, CONDITIONS, Condition, object_embedding, sample_conditions, stack_conditions
from shards.io import (
    FAILURES_FILE,
    META_FILE,
    ShardWriter,
    append_jsonl,
    config_differs,
    iterate_samples,
    list_shards,
    orphan_records,
    read_jsonl,
    read_meta,
    read_spec,
    recorded_model,
    remove_partial,
    shard_name,
    unrecorded_shards,
)
from shards.read import iter_member, iter_meta, iter_split, range_stream, read_split, shard_index, split_shards
from shards.schema import (
    ARRAY_KEYS,
    AUDIO_KEY,
    DETECTOR_KEY,
    FEATURE_DTYPE,
    IOU_KEY,
    META_FIELDS,
    META_KEY,
    PROBS_KEY,
    READ_VERSIONS,
    SAMPLE_KEYS,
    SCHEMA_VERSION,
    SampleMeta,
    ShardFormatError,
    ShardSpec,
    decode_sample,
    encode_sample,
    id_problem,
    read_flac,
    sample_key,
    validate,
    validate_decoded,
)
from shards.stream import read_record

__all__ = [
    "ARRAY_KEYS", "AUDIO_KEY", "CONDITIONS", "CONDITION_NAMES", "Condition", "DETECTOR_KEY", "FAILURES_FILE",
    "FEATURE_DTYPE", "IOU_KEY", "META_FIELDS", "META_FILE", "META_KEY", "PROBS_KEY", "READ_VERSIONS", "SAMPLE_KEYS",
    "SCHEMA_VERSION", "SampleMeta", "ShardFormatError", "ShardSpec", "ShardWriter", "append_jsonl", "config_differs", "decode_sample",
    "encode_sample", "id_problem", "iter_member", "iter_meta", "iter_split", "iterate_samples", "list_shards", "object_embedding",
    "orphan_records", "range_stream", "read_flac", "read_jsonl", "read_meta", "read_record", "read_spec", "read_split", "recorded_model", "remove_partial", "sample_conditions", "sample_key",
    "shard_index", "shard_name", "split_shards", "stack_conditions", "unrecorded_shards", "validate",
    "validate_decoded",
]
