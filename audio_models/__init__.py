"""The audio-model layer: AudioLDM's mel front end, VAE and HiFi-GAN vocoder, their configs and loaders.

Stage one encodes audio with it (waveform -> log mel -> VAE posterior); evaluation and `vta-sam generate` decode
with it (latents -> VAE decoder -> log mel -> vocoder -> waveform). It builds on `common` alone.

- `audio_models.config`: `AudioModelConfig` (which VAE and vocoder, random or from the weights folder), mel sizes.
- `audio_models.front_end`: waveform -> AudioLDM's log mel (`audioldm_waveform`, `MelFrontEnd`, `log_mel`).
- `audio_models.vae`: `AudioVAE` (encode a mel, decode latents); `audio_models.vocoder`: `load_vocoder`.
- `audio_models.decoder`: `Decoder`, scaled latents -> waveforms (VAE decoder + vocoder).
- `audio_models.random_configs`: the toy and published architectures for random-weight builds.
"""
