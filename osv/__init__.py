"""OSV: one-step image-to-video generation by distilling Stable Video Diffusion."""

__version__ = "0.1.0"
