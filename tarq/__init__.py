"""tarq: tail-aware post-training quantization (TARQ) for speech recognition models.

Kept free of heavy imports so that the API process can use the torch-free modules
(config, audio, errors, formats) without loading torch."""

__version__ = "0.1.0"
