"""flashmla_jax: Triton kernels for DeepSeek-style Multi-head Latent Attention, called from JAX."""
from flashmla_jax.ops.decode import mla_decode
from flashmla_jax.ops.prefill import mla_prefill
from flashmla_jax.ops.sparse import mla_decode_sparse, mla_prefill_sparse
from flashmla_jax.cache import LatentCache
from flashmla_jax.fp8 import dequantize_latent, quantize_latent

__all__ = ["mla_decode", "mla_prefill", "mla_decode_sparse", "mla_prefill_sparse", "LatentCache", "quantize_latent",
           "dequantize_latent"]
__version__ = "0.1.0"
from flashmla_jax.ops.indexer import indexer_scores, indexer_topk
from flashmla_jax.fp8 import dequantize_index_keys, quantize_index_keys

__all__ += ["indexer_scores", "indexer_topk", "quantize_index_keys", "dequantize_index_keys"]
