"""flashmla_jax: Triton kernels for DeepSeek-style Multi-head Latent Attention, called from JAX."""
from flashmla_jax.ops.decode import mla_decode
from flashmla_jax.ops.prefill import mla_prefill
from flashmla_jax.cache import LatentCache
from flashmla_jax.fp8 import dequantize_latent, quantize_latent

__all__ = ["mla_decode", "mla_prefill", "LatentCache", "quantize_latent", "dequantize_latent"]
__version__ = "0.1.0"
