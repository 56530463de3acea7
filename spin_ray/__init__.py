"""spin-ray: SPIN-Diffusion (self-play fine-tuning of diffusion models) on Ray."""

__version__ = "0.1.0"
