"""Pure @triton.jit kernels. This package imports triton only: no JAX, no shape policy."""
