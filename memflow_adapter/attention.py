"""Attention backends behind one function, routed through diffusers' ``dispatch_attention_fn``.

Every tensor here uses diffusers' layout ``[batch, sequence, heads, head_dim]``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

#: Our backend names and the diffusers backend each one runs.
ATTENTION_BACKENDS: dict[str, AttentionBackendName] = {
    # torch SDPA; picks flash / memory-efficient / math kernels by itself.
    "sdpa": AttentionBackendName.NATIVE,
    # torch SDPA restricted to the math kernel: slow, but the reference for exactness checks.
    "math": AttentionBackendName._NATIVE_MATH,
    # torch flex attention (compiled on CUDA; an unfused eager fallback elsewhere).
    "flex": AttentionBackendName.FLEX,
    # xformers memory-efficient attention; CUDA only.
    "xformers": AttentionBackendName.XFORMERS,
}


def check_attention_backend(backend: str, device: torch.device) -> None:
    """Raise a clear error when ``backend`` cannot run on ``device`` in this environment."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}, got {backend!r}"
        )
    if backend == "xformers":
        if not _xformers_importable():
            raise ImportError(
                "attention_backend='xformers' needs the xformers package: "
                "pip install 'memflow-adapter[xformers]' (CUDA only), "
                "or use attention_backend='sdpa'"
            )
        if device.type != "cuda":
            raise ValueError(
                f"attention_backend='xformers' runs on CUDA tensors only, got tensors on "
                f"{device.type!r}; use attention_backend='sdpa' there"
            )


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Unmasked softmax attention ``softmax(q k^T / sqrt(D)) v``.

    Args:
        query: ``[B, Sq, H, D]``.
        key, value: ``[B, Sk, H, D]``; may be non-contiguous views (e.g. per-head gathered keys
            permuted from ``[B, H, Sk, D]``).
        backend: a name from ``ATTENTION_BACKENDS``.

    Returns:
        ``[B, Sq, H, D]``.
    """
    check_attention_backend(backend, query.device)
    return dispatch_attention_fn(query, key, value, backend=ATTENTION_BACKENDS[backend])


@functools.cache
def _xformers_importable() -> bool:
    return importlib.util.find_spec("xformers") is not None
