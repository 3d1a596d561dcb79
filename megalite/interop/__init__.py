"""Import and export of model weights in other formats (Hugging Face)."""

from megalite.interop.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
