"""`python -m shards verify DIR`: check every sample of a stage-one output folder against its schema."""

from __future__ import annotations

import argparse
import collections
import sys
import tarfile
from pathlib import Path

import shards
from shards.io import SHARD_PATTERN
from shards.stream import decode_checked, read_raw

MAX_SHOWN = 100  # problem lines printed; the count says how many there are


def verify(directory: Path, ids: set[str] | None = None) -> tuple[dict[str, int], list[str]]:
    """Counts of valid samples per split, and one line per problem found (a bad sample is one line and the shard is
    read on; a bad member or a shard that disagrees with its record ends that shard's reading). `ids`, when given,
    receives the clip id of every valid sample."""
    problems: list[str] = []
    counts: collections.Counter[str] = collections.Counter()
    try:
        spec = shards.read_spec(directory)
    except (shards.ShardFormatError, OSError, ValueError, KeyError) as error:
        return {}, [f"{directory}: {error}"]
    seen: dict[str, str] = {}
    paths = shards.list_shards(directory)
    if not paths:
        problems.append(f"{directory}: no complete shard")
    for leftover in sorted(directory.glob("*.tar.tmp")):
        problems.append(f"{leftover}: partial shard of an interrupted run (the next run deletes it)")
    for leftover in shards.orphan_records(directory):
        problems.append(f"{leftover}: record of a shard an interrupted run never completed (the next run deletes it)")
    for path in paths:
        named = SHARD_PATTERN.match(path.name)  # list_shards keeps only stage one's names
        try:
            for raw in read_raw(path, spec):
                try:
                    sample = decode_checked(raw, spec)
                except shards.ShardFormatError as error:
                    problems.append(str(error))
                    continue
                clip_id = sample[shards.META_KEY]["id"]
                if clip_id in seen:
                    problems.append(f"{path.name}: clip {clip_id} also in {seen[clip_id]}")
                seen[clip_id] = path.name
                split = sample[shards.META_KEY]["split"]
                if named and split != named["split"]:  # readers take a split's shards by name: never read
                    problems.append(f"{path.name}: clip {clip_id} says split {split!r} in a {named['split']!r} shard "
                                    f"(training and evaluation read a split's shards by their name: it would never "
                                    f"be read as {split!r})")
                    continue
                counts[split] += 1
        except (shards.ShardFormatError, tarfile.TarError, OSError, ValueError) as error:
            problems.append(str(error) if str(error).startswith(str(path)) else f"{path.name}: {error}")
    if ids is not None:
        ids.update(seen)
    return dict(counts), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description="Tools for VTA-SAM feature shards.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check every sample against the schema in DIR/meta.json and print counts")
    check.add_argument("directory", type=Path, help="a stage-one output folder (meta.json and its shards)")
    args = parser.parse_args(argv)
    try:
        return _verify_command(args.directory)
    except OSError as error:  # a folder or failures.jsonl it may not read, a folder where a file should be
        print(f"error: {error.filename or args.directory}: unreadable ({error.strerror or error})", file=sys.stderr)
        return 1


def _verify_command(directory: Path) -> int:
    """`python -m shards verify DIR`: the problems, counts, notes and recorded failures; 1 when there are problems."""
    made: set[str] = set()
    counts, problems = verify(directory, made)
    # a clip's last record, unless it was made since (a clip whose video file was missing, tried again)
    last = {r.get("id"): r for r in shards.read_jsonl(directory / shards.FAILURES_FILE) if isinstance(r, dict)}
    failures = [record for clip_id, record in last.items() if clip_id not in made]
    for line in problems[:MAX_SHOWN]:
        print(f"problem: {line}")
    if len(problems) > MAX_SHOWN:  # a meta.json of another preset makes every sample a problem: 200k lines
        print(f"problem: ... and {len(problems) - MAX_SHOWN} more (the first {MAX_SHOWN} are shown)")
    for split, n in sorted(counts.items()):
        print(f"{split}: {n} samples")
    unrecorded = shards.unrecorded_shards(directory)
    if unrecorded:
        print(f"note: {len(unrecorded)} shard(s) without records (written before shards carried them): their sample "
              "count and checksum cannot be checked")
    ignored = sorted(path.name for path in directory.glob("*.tar") if not SHARD_PATTERN.match(path.name))
    if ignored:  # a renamed shard ("x copy.tar") is read by no stage: its samples are not trained
        print(f"note: {len(ignored)} .tar file(s) not named like shards ({{split}}-{{rank}}-{{index}}.tar) are read by no "
              f"stage: {', '.join(ignored[:3])}{' ...' if len(ignored) > 3 else ''}")
    if counts:  # the spec was read
        version = shards.read_spec(directory).schema_version
        print(f"schema version {version}" + ("" if version == shards.SCHEMA_VERSION else
              f" (read; stage one now writes {shards.SCHEMA_VERSION}: the object threshold applies to probs.npy)"))
    by_stage = collections.Counter(record.get("stage", "?") for record in failures)
    print(f"valid samples: {sum(counts.values())}; problems: {len(problems)}; recorded failures: {len(failures)}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(by_stage.items()))})" if failures else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
