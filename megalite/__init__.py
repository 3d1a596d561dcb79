"""megalite: a tensor/pipeline/data-parallel GPT training stack on DeepSpeed with Triton kernels."""

__version__ = "0.1.0"
