"""`vta-sam <command> [options]`: dispatches to each stage's own `main(argv)` with the same options."""

from __future__ import annotations

import importlib
import sys

from common.signals import interruptible

# command -> (module whose main(argv) runs it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "features": ("preprocess.__main__", "stage one: videos -> feature shards (make features)"),
    "verify": ("shards.__main__", "check shards against their schema (python -m shards verify DIR)"),
    "train": ("train.__main__", "stage two: train the diffusion model on the shards (make train)"),
    "eval": ("eval.__main__", "generate audio for the test split and report FD / FAD / KL / AV-Align (make eval)"),
    "generate": ("vta_sam.generate", "add synchronized sound to videos (vta-sam generate VIDEO...)"),
    "listen": ("eval.listen", "blinded listening test in the browser, and its report (Table II)"),
    "weights": ("preprocess.weights", "fetch or check the weights folder (make weights)"),
}


def usage() -> str:
    lines = ["usage: vta-sam <command> [options]   (vta-sam <command> --help for its options; vta-sam --version)", "",
             "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in {"-h", "--help"}:
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from vta_sam import __version__

        print(f"vta-sam {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"vta-sam: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command == "verify":
        rest = ["verify", *rest]
    return interruptible(lambda: importlib.import_module(COMMANDS[command][0]).main(rest))


if __name__ == "__main__":  # `python -m vta_sam.cli ...` as `python -m vta_sam ...`
    raise SystemExit(main())
