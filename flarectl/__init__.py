"""flarectl: turn hybrid-attention AR LLMs into block-diffusion LLMs and serve AR-Trust / Diffusion-Trust."""

__version__ = "0.1.0"
