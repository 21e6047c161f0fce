"""Small kernels that exercise the launch seam: device-side tensor descriptors in plain tl, a tl kernel that calls
a @triton.jit helper, and a Gluon kernel with TMA, an mbarrier and warp specialization (so its compiled warp count
exceeds the launch's num_warps)."""
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma


@triton.jit
def descriptor_scale_kernel(x_ptr, y_ptr, M: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """y = 2 x through device-side tensor descriptors: x, y [M, N], one [BLOCK_M, BLOCK_N] tile per program."""
    m, n = tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N
    src = tl.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    dst = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    dst.store([m, n], src.load([m, n]) * 2)


@triton.jit
def _doubled(x):
    return x * 2


@triton.jit
def helper_scale_kernel(x_ptr, y_ptr, N: tl.constexpr):
    """y = 2 x through a @triton.jit helper: x, y [N], one program."""
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, _doubled(tl.load(x_ptr + offs)))


@gluon.jit
def _load_tile(src, tile, ready, m, n):
    mbarrier.expect(ready, tile.shape[0] * tile.shape[1] * 2)        # bf16 bytes
    tma.async_copy_global_to_shared(src, [m, n], ready, tile)


@gluon.jit
def _scale_tile(dst, tile, ready, scale, m, n):
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    mbarrier.wait(ready, 0)
    y = tile.load(layout) * scale
    tile.store(y.to(tile.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dst, [m, n], tile)
    tma.store_wait(0)


@gluon.jit
def gluon_scale_kernel(x_ptr, scale, y_ptr, M: gl.constexpr, N: gl.constexpr, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr):
    """y = scale * x (bf16 [M, N]): a 1-warp partition loads each [BLOCK_M, BLOCK_N] tile by TMA, the launch's
    warps scale it and store it by TMA."""
    m, n = gl.program_id(0) * BLOCK_M, gl.program_id(1) * BLOCK_N
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    src = tma.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N],
                                     layout=layout)
    dst = tma.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N],
                                     layout=layout)
    tile = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, BLOCK_N], layout)
    ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(ready, count=1)
    gl.warp_specialize([(_scale_tile, (dst, tile, ready, scale, m, n)), (_load_tile, (src, tile, ready, m, n))],
                       [1], [24])
