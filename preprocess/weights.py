"""The local weights folder: its layout, checksums, a fetcher and a checker.

No model hub is assumed at run time: every encoder loads from a local folder (`--weights`), laid out as
`WEIGHTS_LAYOUT` says. `fetch` fills that folder from the Hugging Face Hub where a network is available;
`check` verifies it and prints the checksums that every run records in its meta.json.

    python -m preprocess.weights fetch --out weights
    python -m preprocess.weights check --weights weights --preset paper [--load]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common.config import path_argument
from common.weights import is_weight_file, require_file, require_model_dir, sha256_dir, sha256_file, weight_file_problem
from preprocess.config import PRESETS, FeatureConfig

_PAPER = PRESETS["paper"]
_CLIP_DIR = Path(_PAPER.clip_checkpoint).parent

WEIGHTS_LAYOUT = f"""\
weights/                                  the folder passed as --weights (paths are the `paper` preset's defaults)
  {_PAPER.clip_checkpoint:<40}open_clip state dict of {_PAPER.clip_model} (.safetensors/.bin/.pt, or OpenAI's JIT .pt)
  {str(_CLIP_DIR / 'open_clip_config.json'):<40}optional; its model_cfg.quick_gelu and preprocess_cfg are applied
  {_PAPER.grounding_dir + '/':<40}transformers Grounding DINO + processor (IDEA-Research/grounding-dino-tiny):
  {'':<40}config.json model.safetensors preprocessor_config.json tokenizer.json tokenizer_config.json
  {_PAPER.sam_dir + '/':<40}transformers SamModel + SamProcessor (facebook/sam-vit-base):
  {'':<40}config.json model.safetensors preprocessor_config.json
  {_PAPER.audioldm_dir + '/vae/':<40}diffusers AutoencoderKL of AudioLDM (cvssp/audioldm-s-full-v2):
  {'':<40}config.json diffusion_pytorch_model.safetensors
  {_PAPER.audioldm_dir + '/vocoder/':<40}transformers SpeechT5HifiGan of AudioLDM: config.json model.safetensors
"""

# (hub repository, destination inside the weights folder, wanted files). Each wanted entry lists alternatives,
# best first: the first one the repository has is downloaded (safetensors over pickled .bin).
_HUB_SOURCES: tuple[tuple[str, str, tuple[tuple[str, ...], ...]], ...] = (
    ("timm/vit_large_patch14_clip_224.openai", str(_CLIP_DIR),  # OpenAI's ViT-L/14 in open_clip format (QuickGELU)
     (("open_clip_config.json",), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))),
    ("IDEA-Research/grounding-dino-tiny", _PAPER.grounding_dir,
     (("config.json",), ("preprocessor_config.json",), ("tokenizer.json",), ("tokenizer_config.json",),
      ("special_tokens_map.json",), ("vocab.txt",), ("model.safetensors", "pytorch_model.bin"))),
    ("facebook/sam-vit-base", _PAPER.sam_dir,
     (("config.json",), ("preprocessor_config.json",), ("model.safetensors", "pytorch_model.bin"))),
    ("cvssp/audioldm-s-full-v2", _PAPER.audioldm_dir,
     (("vae/config.json",), ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
      ("vocoder/config.json",), ("vocoder/model.safetensors", "vocoder/pytorch_model.bin"))),
)
HUB_TIMEOUT_S = 10.0


def expected_entries(cfg: FeatureConfig) -> list[tuple[str, str, bool]]:
    """(name, path relative to the weights folder, is_folder) of everything `cfg` loads."""
    entries = [("clip", cfg.clip_checkpoint, False), ("grounding-dino", cfg.grounding_dir, True)]
    if cfg.use_sam:
        entries.append(("sam", cfg.sam_dir, True))
    entries += [("vae", f"{cfg.audioldm_dir}/vae", True), ("vocoder", f"{cfg.audioldm_dir}/vocoder", True)]
    return entries


# ----------------------------------------------------------------------------------- fetch
def _pick_files(repo_files: list[str], wanted: tuple[tuple[str, ...], ...]) -> list[str]:
    """The first available alternative of each wanted entry; entries the repository lacks are skipped."""
    available = set(repo_files)
    return [next(name for name in options if name in available) for options in wanted
            if any(name in available for name in options)]


class FetchError(RuntimeError):
    """The hub could not be reached or a download failed (one line, no traceback, in `main`)."""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def fetch(out: Path, timeout_s: float = HUB_TIMEOUT_S, endpoint: str | None = None) -> None:
    """Download the paper checkpoints into `out` (layout: WEIGHTS_LAYOUT); FetchError when that fails."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=endpoint)
    for repo, destination, wanted in _HUB_SOURCES:
        try:  # one bounded request first, so that a machine without the hub fails in seconds, not after retries
            info = api.model_info(repo, timeout=timeout_s)
        except Exception as error:  # any failure here (DNS, offline mode, HTTP status) means "no hub"
            raise FetchError(f"cannot reach the Hugging Face Hub for {repo} ({_first_line(error)})") from None
        files = _pick_files([s.rfilename for s in info.siblings or []], wanted)
        print(f"{repo} -> {out / destination}: {', '.join(files)}", flush=True)
        try:
            snapshot_download(repo, allow_patterns=files, local_dir=out / destination, endpoint=endpoint)
        except Exception as error:
            raise FetchError(f"downloading {repo} failed ({_first_line(error)})") from None
    clip_target = out / _PAPER.clip_checkpoint
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        downloaded = out / _CLIP_DIR / name
        if downloaded.exists() and not clip_target.exists() and downloaded.suffix == clip_target.suffix:
            shutil.move(downloaded, clip_target)  # the config may name the checkpoint differently
        elif downloaded.exists() and downloaded != clip_target:
            print(f"note: the CLIP checkpoint is {downloaded}; pass --clip-checkpoint {_CLIP_DIR / name} to stage one")


# ----------------------------------------------------------------------------------- check
def check(weights: Path, cfg: FeatureConfig, load: bool = False) -> bool:
    """Print one line per expected entry (checksum, MISSING or WRONG); with `load`, build every encoder from it."""
    ok = True
    for name, relative, is_folder in expected_entries(cfg):
        path = weights / relative
        try:
            checksum = sha256_dir(require_model_dir(path, name)) if is_folder else sha256_file(require_file(path, name))
            files = sorted(p for p in path.rglob("*") if is_weight_file(p)) if is_folder else [path]
            problems = [(file, weight_file_problem(file)) for file in files]
            damaged = [(file, problem) for file, problem in problems if problem]
            if damaged:
                print(f"{name:<15} WRONG  {damaged[0][0]}: {damaged[0][1]}")
                ok = False
                continue
            print(f"{name:<15} {checksum}  {path}")
        except FileNotFoundError as error:
            print(f"{name:<15} {'MISSING' if not path.exists() else 'WRONG'}  {error}")  # WRONG: e.g. a folder for a file
            ok = False
    if not ok and cfg.random_init:
        print("note: this preset builds its models with random weights (random_init) and reads none of these; the "
              "check is for its sizes' checkpoints, loaded with --no-random-init")
    if ok and load:
        import torch

        from audio_models.vae import AudioVAE  # heavy imports only when asked
        from audio_models.vocoder import load_vocoder
        from preprocess.encoders import CLIPEncoder, Grounder

        loaded = cfg.replace(random_init=False)
        device = torch.device("cpu")
        try:
            clip = CLIPEncoder.from_config(loaded, weights, device)
            Grounder.from_config(loaded, weights, device)
            AudioVAE.from_config(loaded.audio_models(), weights, device)
            load_vocoder(loaded.audio_models(), weights, device)
        except (ValueError, FileNotFoundError) as error:
            print(f"load failed: {error}")
            return False
        print(f"loaded every model (CLIP embed_dim {clip.embed_dim})")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocess.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="download the paper checkpoints from the Hugging Face Hub")
    fetch_parser.add_argument("--out", type=path_argument, default=Path("weights"), help="weights folder to fill")
    fetch_parser.add_argument("--timeout", type=float, default=HUB_TIMEOUT_S, help="seconds to wait for the hub")
    fetch_parser.add_argument("--endpoint", default=None, help="hub address (a mirror); default: huggingface_hub's")
    check_parser = commands.add_parser("check", help="verify a weights folder and print its checksums")
    check_parser.add_argument("--weights", type=path_argument, required=True, help="weights folder")
    check_parser.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="config whose paths to check")
    check_parser.add_argument("--load", action="store_true", help="also build every model from the folder")
    check_parser.add_argument("--clip-torchscript", action="store_true",
                              help="with --load: the CLIP checkpoint is an OpenAI TorchScript archive (this EXECUTES "
                                   "code from the file: only for files you trust)")
    args = parser.parse_args(argv)

    if args.command == "fetch":
        try:
            fetch(args.out, args.timeout, args.endpoint)
        except FetchError as error:
            print(f"weights fetch failed: {error}; copy the checkpoints into {args.out} by hand "
                  "following the weights layout in README.md", file=sys.stderr)
            return 1
        return 0 if check(args.out, _PAPER) else 1
    cfg = PRESETS[args.preset].replace(clip_torchscript=args.clip_torchscript)
    return 0 if check(args.weights, cfg, load=args.load) else 1


if __name__ == "__main__":
    raise SystemExit(main())
