"""The JAX side of each kernel: input checks, tiling and split heuristics, the launch."""
