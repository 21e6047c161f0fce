"""flashmla_jax: Triton kernels for DeepSeek-style Multi-head Latent Attention, called from JAX."""
from flashmla_jax.ops.decode import mla_decode
from flashmla_jax.ops.prefill import mla_prefill
from flashmla_jax.cache import LatentCache

__all__ = ["mla_decode", "mla_prefill", "LatentCache"]
__version__ = "0.1.0"
