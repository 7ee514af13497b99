"""Where a kernel runs: compiled by Triton on a GPU, interpreted anywhere else."""

from __future__ import annotations

import jax


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: compiled on a GPU, interpret mode elsewhere."""
    return jax.default_backend() != "gpu" if interpret is None else interpret


def triton_params(num_warps: int, num_stages: int):
    """Triton launch parameters. Passing them also selects the Triton lowering, which works on
    JAX 0.10 and 0.11 (Mosaic GPU would otherwise be chosen); the interpreter ignores them."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
