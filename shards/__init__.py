"""The shard format shared by every stage: schema, writer, reader and derived features."""

from shards.io import (
    FAILURES_FILE,
    META_FILE,
    ShardWriter,
    append_jsonl,
    iterate_samples,
    list_shards,
    read_jsonl,
    read_meta,
    read_spec,
    remove_partial,
    shard_keys,
    shard_name,
)
from shards.objects import object_embedding
from shards.schema import (
    ARRAY_KEYS,
    AUDIO_KEY,
    FEATURE_DTYPE,
    META_KEY,
    SAMPLE_KEYS,
    SCHEMA_VERSION,
    ShardFormatError,
    ShardSpec,
    decode_sample,
    encode_sample,
    sample_key,
    validate,
    validate_decoded,
)

__all__ = [
    "ARRAY_KEYS", "AUDIO_KEY", "FAILURES_FILE", "FEATURE_DTYPE", "META_FILE", "META_KEY", "SAMPLE_KEYS",
    "SCHEMA_VERSION", "ShardFormatError", "ShardSpec", "ShardWriter", "append_jsonl", "decode_sample",
    "encode_sample", "iterate_samples", "list_shards", "object_embedding", "read_jsonl", "read_meta",
    "read_spec", "remove_partial", "sample_key", "shard_keys", "shard_name", "validate", "validate_decoded",
]
