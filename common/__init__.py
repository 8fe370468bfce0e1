"""The bottom layer: plumbing every stage shares and no stage owns.

- `common.config`: command-line flags derived from a frozen config dataclass, and back; the dataclass helpers
  (`replace`, `to_dict`, `from_dict`, `to_json`) every stage's config shares.
- `common.devices`: device choice (`auto` = the local CUDA device of this rank, else the CPU) and the UNet's
  sampling precision (`auto` = bf16 on CUDA).
- `common.weights`: the local weights folder (required files, one-line errors) and sha256 checksums.
- `common.frozen`: the base of every frozen model (always in eval mode, no gradients) and seeded random init.
- `common.versions`: the software versions recorded with every output.

It imports nothing of this project but `shards` (the file contract), so stages, model families and fronts can all
build on it.
"""
