"""Pieces the decode and prefill kernels share: the base-2 softmax constants and its epilogue."""
import triton
import triton.language as tl

from flashmla_jax import reference

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)    # softmax runs in base 2: scores scaled by log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)      # and the LSE goes back to natural log
# The LSE a decode kernel gives a row (or a split's partial) that saw keys whose scores were all -inf, its output
# NaN: reference.py's ALL_NEG_INF_LSE (`mergeable_rows`), which the merges keep and the op turns into NaN.
ALL_NEG_INF_LSE: tl.constexpr = tl.constexpr(reference.ALL_NEG_INF_LSE)

# The epilogue of an online softmax with running max m_i [M] (base 2) and row sums l_i [M]: the output is
# acc / row_divisor(l_i)[:, None] and the LSE row_lse(m_i, l_i). A row that saw no key (l_i 0, acc 0) gets
# output 0 and LSE -inf, never NaN; a row whose scores met a NaN or inf (l_i NaN) gets NaN in both, so that a
# NaN in anything a row reads reaches its result (the row max, a maxnum, skips NaN: the row sum does not). Two
# helpers, so that each kernel computes the LSE where it did before (after its output stores in the prefill
# forward, which keeps its registers where they were).


@triton.jit
def row_divisor(l_i):
    """l_i where a row saw a key (NaN included), else 1."""
    return tl.where(l_i != 0, l_i, 1.0)


@triton.jit
def row_lse(m_i, l_i):
    """(m_i + log2 l_i) * ln 2, the natural-log LSE, where a row saw a key (NaN for a NaN row sum), else -inf."""
    has_keys = l_i != 0
    return tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
