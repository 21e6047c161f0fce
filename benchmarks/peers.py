"""The CUDA peers, timed on the same data in the same run: DeepSeek's FlashMLA (dense decode, sparse decode and
sparse prefill) and FlashInfer's MLA decode.

Both are PyTorch libraries and measuring sticks only (the library never imports them). They run when they
import: FlashMLA as `flash_mla` on PYTHONPATH, FlashInfer as `flashinfer` (../shared/peers/README.md says how to
carry them to the GPU machine). Our arrays reach torch through DLPack (no copy where the layouts agree).
Timing: CUDA events around a burst of 7 calls after one warm-up call, which reads like CUPTI's kernel time on
the JAX side (a long timing loop reads the matrix units ~13% lower as the clocks drop under sustained load).
"""
from __future__ import annotations

import functools

BURST = 7


NAMES = ("flashmla", "flashinfer")


@functools.lru_cache(maxsize=None)
def available() -> dict[str, object]:
    """{"flashmla": module, "flashinfer": module} for the peers that import here."""
    found = {}
    try:
        import flash_mla
        found["flashmla"] = flash_mla
    except Exception:           # noqa: BLE001 (any import failure: the peer is absent)
        pass
    try:
        import flashinfer
        found["flashinfer"] = flashinfer
    except Exception:           # noqa: BLE001
        pass
    return found


def burst_ms(fn) -> float:
    """GPU ms per call of fn: CUDA events around BURST calls after one warm-up call."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(BURST):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / BURST


def _torch(x):
    import torch

    return torch.from_dlpack(x)


def paged_view(kv, seqlens, table, page_size: int):
    """(pages [P, page_size, 576], block_table [B, max_blocks]) as torch tensors: a paged cache as it is, a
    contiguous [B, N, 576] one viewed as B * N / page_size pages in order."""
    import torch

    kv_t = _torch(kv)
    if table is not None:
        return kv_t, _torch(table)
    b, n, d = kv_t.shape
    per_seq = n // page_size
    pages = kv_t.reshape(b * per_seq, page_size, d)
    return pages, torch.arange(b * per_seq, dtype=torch.int32, device=pages.device).reshape(b, per_seq)


def flashmla_decode_ms(q, kv, seqlens, table, softmax_scale: float, page_size: int = 64) -> float | None:
    """FlashMLA's dense decode (`flash_mla_with_kvcache`, bf16 paged cache) on our inputs: q [B, S_q, H, 576],
    kv [B, N, 576] or pages with table; causal when S_q > 1 (our convention). None when FlashMLA is absent."""
    flash_mla = available().get("flashmla")
    if flash_mla is None:
        return None
    pages, block_table = paged_view(kv, seqlens, table, page_size)
    q_t, lens = _torch(q), _torch(seqlens)
    kcache = pages.unsqueeze(2)                               # [P, page, 1 kv head, 576]
    meta, _ = flash_mla.get_mla_metadata()
    return burst_ms(lambda: flash_mla.flash_mla_with_kvcache(q_t, kcache, block_table, lens, 512, meta, None,
                                                             softmax_scale=softmax_scale, causal=q.shape[1] > 1))


def flashinfer_decode_ms(q, kv, seqlens, table, softmax_scale: float, page_size: int = 64) -> float | None:
    """FlashInfer's `BatchMLAPagedAttentionWrapper` (fa3 backend) on the same values: its separate c_kv / k_pe
    page tensors and query halves are copied out of ours (outside the timing). None when FlashInfer is absent."""
    flashinfer = available().get("flashinfer")
    if flashinfer is None:
        return None
    import torch

    pages, block_table = paged_view(kv, seqlens, table, page_size)
    q_t, lens = _torch(q), _torch(seqlens).to(torch.int32)
    b, s_q, h, _ = q_t.shape
    ckv, kpe = pages[..., :512].contiguous(), pages[..., 512:].contiguous()
    q_nope = q_t[..., :512].reshape(b * s_q, h, 512).contiguous()
    q_pe = q_t[..., 512:].reshape(b * s_q, h, 64).contiguous()
    pages_per = (lens + page_size - 1) // page_size
    kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device=q_t.device)
    kv_indptr[1:] = torch.cumsum(pages_per, 0)
    columns = torch.arange(block_table.shape[1], device=q_t.device)[None, :]
    kv_indices = block_table[columns < pages_per[:, None]].to(torch.int32)     # each sequence's pages, in order
    qo_indptr = torch.arange(0, b + 1, dtype=torch.int32, device=q_t.device) * s_q
    workspace = torch.empty(512 * 1024 * 1024, dtype=torch.int8, device=q_t.device)
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="fa3")
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, h, 512, 64, page_size, s_q > 1, softmax_scale,
                 torch.bfloat16, torch.bfloat16)
    return burst_ms(lambda: wrapper.run(q_nope, q_pe, ckv, kpe))


def flashmla_sparse_decode(q, pool, indices, softmax_scale: float):
    """FlashMLA's sparse FP8 decode (`flash_mla_with_kvcache` with indices) on our inputs: q [B, S_q, H, 576],
    pool uint8 [pages, page_size, 656] (fp8_blockscale, FlashMLA's V3.2 token), indices [B, S_q, topk] int32.
    (GPU ms per call, its out [B, S_q, H, 512] as a torch tensor), or None when FlashMLA is absent."""
    flash_mla = available().get("flashmla")
    if flash_mla is None:
        return None
    import torch

    q_t, pool_t, idx_t = _torch(q), _torch(pool), _torch(indices)
    kcache = pool_t.view(torch.float8_e4m3fn).unsqueeze(2)          # [pages, page, 1 kv head, 656]
    meta, _ = flash_mla.get_mla_metadata()
    call = lambda: flash_mla.flash_mla_with_kvcache(q_t, kcache, None, None, 512, meta, None,  # noqa: E731
                                                    softmax_scale=softmax_scale, causal=False, is_fp8_kvcache=True,
                                                    indices=idx_t)[0]
    return burst_ms(call), call()


def flashmla_sparse_prefill(q, kv, indices, softmax_scale: float):
    """FlashMLA's sparse prefill (`flash_mla_sparse_fwd`) on our inputs: q [T, H, 576], kv [N, 576] bf16, indices
    [T, topk] int32. (GPU ms per call, its out [T, H, 512] as a torch tensor), or None when FlashMLA is absent."""
    flash_mla = available().get("flashmla")
    if flash_mla is None:
        return None
    q_t, kv_t, idx_t = _torch(q), _torch(kv).unsqueeze(1), _torch(indices).unsqueeze(1)
    call = lambda: flash_mla.flash_mla_sparse_fwd(q_t, kv_t, idx_t, softmax_scale, 512)[0]  # noqa: E731
    return burst_ms(call), call()
