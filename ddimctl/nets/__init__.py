"""ddimctl's own networks: a port of diffusers' ``UNet2DModel`` (:mod:`.unet2d`) and of its latent-diffusion
autoencoders ``AutoencoderKL`` / ``VQModel`` (:mod:`.autoencoders`), with the layers they share (:mod:`.layers`).
Same state-dict keys and numerics as diffusers, without importing it. The big text-to-image families' networks are
diffusers' and transformers' own classes (:mod:`ddimctl.families`)."""
