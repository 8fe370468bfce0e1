"""`python -m eval.weights list|fetch|check --out weights/eval`: the evaluation embedders' official checkpoint
files, where each comes from, and whether the folder has them.

Nothing in evaluation downloads at run time: the embedders load these files from `--embedder-weights`
(`eval.embed.load_embedders`). `fetch` downloads the missing ones where the network allows it (each file
written to `<name>.partial` and renamed when whole; a failure is one line and the other files are still tried);
`check` prints each file's size and sha256.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import urllib.request
from pathlib import Path

from common.config import path_argument
from common.weights import sha256_file, weight_file_problem
from eval.embed import CHECKPOINTS

# embedder -> where its official file is published (the address its reference code downloads it from)
SOURCES: dict[str, str] = {
    "cnn14": "https://zenodo.org/record/3987831/files/Cnn14_16k_mAP%3D0.438.pth?download=1",
    "vggish": "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
    "passt": "https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/passt-s-f128-p16-s10-ap.476-swa.pt",
    "imagebind": "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth",
    "synchformer": "https://github.com/hkchengrex/MMAudio/releases/download/v0.1/synchformer_state_dict.pth",
}
# the metrics each file serves
SERVES: dict[str, str] = {
    "cnn14": "FD / FD-PANNs, KL, KL-sigmoid, KL-PANNs, IS / IS-PANNs",
    "vggish": "FAD / FD-VGG",
    "passt": "FD-PaSST, KL-PaSST, IS-PaSST",
    "imagebind": "IB-score",
    "synchformer": "DeSync",
}
TIMEOUT_S = 30.0


def listing(folder: Path) -> str:
    """One line per file: present or missing, its path, what it serves, where it comes from."""
    lines = []
    for name, (file, description) in CHECKPOINTS.items():
        path = folder / file
        state = "present" if path.is_file() else "MISSING"
        lines.append(f"{state:8} {path}  ({description}; {SERVES[name]})\n         from {SOURCES[name]}")
    return "\n".join(lines)


def fetch(folder: Path, timeout_s: float = TIMEOUT_S) -> int:
    """Download every missing file; returns how many could not be fetched."""
    folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, (file, _) in CHECKPOINTS.items():
        path = folder / file
        if path.is_file():
            print(f"present  {path}")
            continue
        partial = path.with_name(path.name + ".partial")
        try:
            with urllib.request.urlopen(SOURCES[name], timeout=timeout_s) as response, open(partial, "wb") as out:
                expected = response.headers.get("Content-Length")
                while block := response.read(1 << 20):
                    out.write(block)
            size = partial.stat().st_size
            if expected is not None and size != int(expected):
                raise OSError(f"got {size} of {expected} bytes")
            os.replace(partial, path)
            print(f"fetched  {path} ({size} bytes, sha256 {sha256_file(path)})")
        except (OSError, http.client.HTTPException, ValueError) as error:  # network, HTTP, truncation, a full disk
            partial.unlink(missing_ok=True)
            failed += 1
            print(f"error: {path}: could not fetch {SOURCES[name]} ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); fetch it by hand", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.weights", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("list", "fetch", "check"))
    parser.add_argument("--out", type=path_argument, default=Path("weights/eval"), help="the embedder weights folder (default weights/eval)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for each server")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(listing(args.out))
        return 0
    if args.command == "fetch":
        return 1 if fetch(args.out, args.timeout) else 0
    missing = 0
    for file, _ in CHECKPOINTS.values():
        path = args.out / file
        problem = weight_file_problem(path) if path.is_file() else "a folder, not a file" if path.is_dir() else None
        if problem:
            missing += 1
            print(f"{path}: WRONG, {problem}")
        elif path.is_file():
            print(f"{path}: {path.stat().st_size} bytes, sha256 {sha256_file(path)}")
        else:
            missing += 1
            print(f"{path}: missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
