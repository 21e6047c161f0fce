"""One registry per op: which implementation runs a call, chosen in one place.

Each implementation is one object: its name, what it can run (`unsupported(call)`: None, or why not), its
tiling config (typed, frozen) and its launch. The op's `implementation=` names map to an ordered list of these
objects; the first that can run the call runs it. When none can, the error says why each cannot and which
other names could. `None` means "triton" on a CUDA GPU and "xla" elsewhere: never a silent fallback to "xla"
on a GPU.
"""
from __future__ import annotations

import abc
from typing import Generic, Mapping, Sequence, TypeVar

from flashmla_jax._backend import has_cuda_gpu
from flashmla_jax._extras import runner_missing

Call = TypeVar("Call")


class Implementation(abc.ABC, Generic[Call]):
    """One way to run an op. Subclasses define `name`, `unsupported` and the op's launch method."""
    name: str
    # False for implementations that host-callback (Triton's interpreter): they must not run inside
    # custom_partitioning (a callback there segfaults, jax PR #23620) and are left unwrapped.
    partitionable: bool = True

    @abc.abstractmethod
    def unsupported(self, call: Call) -> str | None:
        """None when this implementation can run `call` on this machine, else the reason it cannot."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class TritonRunner:
    """For implementations that run tl kernels, by jax-triton on a CUDA GPU (runner "triton") or by Triton's
    interpreter on the CPU ("interpret", which host-callbacks: not partitionable). Put it before the
    Implementation base."""

    def __init__(self, runner: str):
        self.name = runner
        self.partitionable = runner != "interpret"

    def runner_unsupported(self) -> str | None:
        """Why the runner cannot run here (None when it can): no CUDA GPU for "triton", or a module it imports
        missing (the message says which extra installs it)."""
        if self.name == "triton" and not has_cuda_gpu():
            return ("the Triton kernels need a CUDA GPU as JAX's default backend (\"interpret\" runs them on the CPU "
                    "through Triton's interpreter)")
        return runner_missing(self.name)


class Registry(Generic[Call]):
    """An op's implementations by the names its `implementation=` argument takes."""

    def __init__(self, op: str, names: Mapping[str, Sequence[Implementation[Call]]]):
        self.op = op
        self.names = {name: tuple(impls) for name, impls in names.items()}

    def check_name(self, implementation) -> str | None:
        """`implementation` as given (None or one of the names): TypeError / ValueError otherwise."""
        if implementation is not None and not isinstance(implementation, str):
            raise TypeError(f"implementation must be one of {tuple(self.names)} or None, got "
                            f"{type(implementation).__name__}")
        if implementation is not None and implementation not in self.names:
            raise ValueError(f"implementation must be one of {tuple(self.names)} or None, got {implementation!r}")
        return implementation

    def select(self, implementation: str | None, call: Call) -> Implementation[Call]:
        """The implementation that runs `call` for the user's `implementation` (None: "triton" on a CUDA GPU,
        "xla" elsewhere)."""
        name = self.check_name(implementation)
        if name is None:
            name = "triton" if has_cuda_gpu() else "xla"
        reasons = []
        for impl in self.names[name]:
            reason = impl.unsupported(call)
            if reason is None:
                return impl
            reasons.append(reason)
        others = [other for other, impls in self.names.items()
                  if other != name and any(impl.unsupported(call) is None for impl in impls)]
        can = f"; {' or '.join(repr(o) for o in others)} can" if others else ""
        raise ValueError(f"{self.op}: implementation={name!r} cannot run this call: {'; '.join(reasons)}{can}")
