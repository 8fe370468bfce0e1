"""`python -m train` / `accelerate launch -m train ...` / `torchrun --nproc_per_node N -m train ...`."""

from __future__ import annotations

import argparse
import os
import sys

from train.config import PRESETS
from vta_sam.configuration import add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train the VTA-SAM latent diffusion model on stage-one shards. Run the same command again to resume.",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")
    add_config_arguments(parser, PRESETS, "tiny", "training configuration (overrides the preset)")
    args = parser.parse_args(argv)
    config = config_from_args(PRESETS, args)
    if config is None:
        return 2
    if args.dry_run:
        print(config.to_json(), end="")
        return 0

    from train.data import DataError
    from train.trainer import ConfigError, train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        return train(config, log=print if main_rank else lambda *_: None)
    except (DataError, ConfigError) as error:
        if main_rank:
            print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
