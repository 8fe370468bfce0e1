"""`python -m train` / `accelerate launch -m train ...` / `torchrun --nproc_per_node N -m train ...`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.config import config_main, os_error_line
from train.config import PRESETS, TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train the VTA-SAM latent diffusion model on stage-one shards. Run the same command again to resume.",
    )
    return config_main(parser, PRESETS, "tiny", "training configuration (overrides the preset)", argv, run)


def run(config: TrainConfig, args: argparse.Namespace) -> int:
    from train.data import DataError
    from train.trainer import ConfigError, latest_checkpoint, train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        return train(config, log=print if main_rank else lambda *_: None)
    except (DataError, ConfigError) as error:
        if main_rank or getattr(error, "own_rank", False):  # what every rank finds alike, rank 0 alone says
            print(f"error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not peer_lost(error):
            raise
        # another rank stopped on an error of its own (said above by that rank): one line here, not gloo's traceback
        print(f"error: rank {os.environ.get('RANK', '0')}: another process of this run stopped, and this one lost its "
              "connection to it (its error is above); run the same command again once that is fixed", file=sys.stderr)
        return 1
    except OSError as error:  # a run folder it may not write, shards it may not read
        if main_rank:
            print(os_error_line(error, config.output), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # complete checkpoints are kept; one cut short is never loaded
        if main_rank:
            saved = latest_checkpoint(Path(config.output))
            print("\ninterrupted: run the same command again to " + (f"resume from {saved}" if saved else
                  "start again (no checkpoint was written yet)"), file=sys.stderr)
        return 130


def peer_lost(error: BaseException) -> bool:
    """Whether a collective failed because another rank of the run exited (gloo: 'Connection closed by peer')."""
    import torch.distributed

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "remote worker crash"))


if __name__ == "__main__":
    from common.signals import exit_with

    exit_with(main)
