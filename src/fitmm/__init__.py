"""fitmm: multimodal recommendation (FITMM and baselines) — data, training, evaluation, CLI."""

__version__ = "0.1.0"
