"""Stage one of VTA-SAM: videos -> per-frame CLIP, Grounding-DINO/SAM and AudioLDM-VAE features in shards."""
