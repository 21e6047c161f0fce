"""flashmla_jax: Triton kernels for DeepSeek-style Multi-head Latent Attention, called from JAX."""
from flashmla_jax.ops.decode import mla_decode

__all__ = ["mla_decode"]
__version__ = "0.1.0"
