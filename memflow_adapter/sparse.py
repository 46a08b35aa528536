"""Sparse Memory Activation: per head, attend only to the memory frames relevant to the queries
(architecture s.4).

Memory frames are the sink and bank frames; the local window is always attended. Token tensors use
diffusers' layout ``[B, frames * T_f, H, D]``.
"""

from __future__ import annotations

import torch

from .attention import attention
from .policies import ActivationPolicy, top_k_in_time_order


def select_memory_frames(
    policy: ActivationPolicy,
    query: torch.Tensor,
    memory_keys: torch.Tensor,
    tokens_per_frame: int,
    top_k: int,
) -> torch.Tensor:
    """Pick, per batch element and head, the ``top_k`` memory frames ``policy`` scores highest.

    Args:
        policy: scores the frames (SMA's reference: mean query x mean key).
        query: ``[B, N, H, D]`` post-RoPE queries of the current pass.
        memory_keys: ``[B, C * T_f, H, D]`` candidate frames' cached keys.
        tokens_per_frame: ``T_f``.
        top_k: frames to keep; all ``C`` are kept when ``top_k >= C``.

    Returns:
        ``[B, H, min(top_k, C)]`` int64 candidate indices, ascending (temporal order kept).
    """
    frames = memory_keys.unflatten(1, (-1, tokens_per_frame))  # [B, C, T_f, H, D]
    scores = policy.score(query, frames)
    expected = (query.shape[0], query.shape[2], frames.shape[1])
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"activation policy {type(policy).__name__} returned scores of shape "
            f"{tuple(scores.shape)}, expected [B, H, C] = {list(expected)}"
        )
    return top_k_in_time_order(scores, min(top_k, frames.shape[1]))


def gather_frames_per_head(
    tokens: torch.Tensor, selected: torch.Tensor, tokens_per_frame: int
) -> torch.Tensor:
    """Per-head selection of frames.

    Args:
        tokens: ``[B, C * T_f, H, D]``.
        selected: ``[B, H, k]`` frame indices into the ``C`` frames.

    Returns:
        ``[B, H, k * T_f, D]`` (head-major, ready to be concatenated per head).
    """
    frames, index = _head_major_frames(tokens, selected, tokens_per_frame)
    return torch.gather(frames, 2, index).flatten(2, 3)


def _head_major_frames(
    tokens: torch.Tensor, selected: torch.Tensor, tokens_per_frame: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` ``[B, C * T_f, H, D]`` as a ``[B, H, C, T_f, D]`` view, and ``selected``
    ``[B, H, k]`` as the ``gather`` index along its frame axis."""
    frames = tokens.unflatten(1, (-1, tokens_per_frame)).permute(0, 3, 1, 2, 4)
    return frames, selected[..., None, None].expand(-1, -1, -1, *frames.shape[3:])


class SparseKeySet:
    """One layer's SMA key set, preallocated and reused from pass to pass: per head its selected
    memory frames then the local tokens, head-major ``[B, H, k * T_f + L, D]`` for keys and for
    values. ``assemble`` gathers the selection straight into the buffer (``index_select(out=)``) and
    copies the local tokens after it, so a pass neither allocates nor concatenates. Scratch
    only: what it holds is valid until the next ``assemble``.

    The local tokens start with the cache's window, which changes once per chunk. Once an
    ``assemble`` has copied it (``window_tokens``), the next passes copy only their own tokens,
    until the session calls ``release_window`` (the window changed: a commit, a recache, a
    re-base). Compiled code copies every local token (one graph for every pass of a chunk).

    Args:
        capacity: tokens of the largest key set the layout makes (``(sma_top_k + local_frames) *
            T_f``): the buffer is made that size at the first pass and never changes, so a
            compiled model sees one buffer shape. ``None`` (an unbounded window): the buffer
            grows when a pass needs more tokens and is reused otherwise.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        # (selected tokens, window tokens) where the buffer holds the cache's current window
        self.window_held: tuple[int, int] | None = None

    def release_window(self) -> None:
        """The cache's window changed: the next ``assemble`` copies it again."""
        self.window_held = None

    def assemble(
        self,
        memory_keys: torch.Tensor,
        memory_values: torch.Tensor,
        local_keys: torch.Tensor,
        local_values: torch.Tensor,
        selected: torch.Tensor,
        tokens_per_frame: int,
        window_tokens: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The key set of ``sparse_memory_attention``'s arguments, as ``[B, k * T_f + L, H, D]``
        views of the buffer (keys, values); the first ``window_tokens`` local tokens are the
        cache's window (0: none of them is)."""
        batch, local, heads, head_dim = local_keys.shape
        chosen = selected.shape[2] * tokens_per_frame
        shape = (batch, heads, chosen + local, head_dim)
        self._reserve(shape, local_keys)
        copied = 0  # local tokens the buffer already holds
        if not window_tokens or torch.compiler.is_compiling():
            self.window_held = None
        elif self.window_held == (chosen, window_tokens):
            copied = window_tokens
        else:
            self.window_held = (chosen, window_tokens)
        sets = []
        for buffer, memory, local_tokens in (
            (self.keys, memory_keys, local_keys), (self.values, memory_values, local_values)
        ):
            key_set = buffer[:, :, : chosen + local]
            frames, index = _head_major_frames(memory, selected, tokens_per_frame)
            chosen_frames = key_set[:, :, :chosen].unflatten(2, (-1, tokens_per_frame))
            if torch.compiler.is_compiling():
                # inductor fuses the gather into the copy; ``out=`` has no symbolic-shape meta
                chosen_frames.copy_(torch.gather(frames, 2, index))
            else:
                # one index_select of whole frames per batch element and head: a copy of
                # [T_f, D] blocks, 5x faster on CPU than a gather reading one index per element
                for b in range(batch):
                    for h in range(heads):
                        torch.index_select(frames[b, h], 0, selected[b, h],
                                           out=chosen_frames[b, h])
            key_set[:, :, chosen + copied :].copy_(local_tokens[:, copied:].transpose(1, 2))
            sets.append(key_set.transpose(1, 2))
        return sets[0], sets[1]

    def _reserve(self, shape: tuple[int, int, int, int], like: torch.Tensor) -> None:
        """Buffers holding at least ``shape`` ``[B, H, tokens, D]`` of ``like``'s dtype/device."""
        current = self.keys
        if (
            current is not None
            and current.shape[:2] + current.shape[3:] == shape[:2] + shape[3:]
            and current.shape[2] >= shape[2]
            and current.dtype == like.dtype
            and current.device == like.device
        ):
            return
        self.window_held = None
        if self.capacity is not None:
            if shape[2] > self.capacity:
                raise ValueError(
                    f"a key set of {shape[2]} tokens exceeds this layout's capacity of "
                    f"{self.capacity}"
                )
            shape = (*shape[:2], self.capacity, shape[3])
        self.keys, self.values = (
            torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(2)
        )


def sparse_memory_attention(
    query: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    selected: torch.Tensor,
    tokens_per_frame: int,
    backend: str = "sdpa",
    key_set: SparseKeySet | None = None,
    window_tokens: int = 0,
) -> torch.Tensor:
    """One softmax over ``[selected memory frames ; local tokens]``; the selection differs per head.

    Args:
        query: ``[B, N, H, D]``.
        memory_keys, memory_values: ``[B, C * T_f, H, D]``.
        local_keys, local_values: ``[B, L, H, D]`` (window frames and the pass's own tokens).
        selected: ``[B, H, k]`` from ``select_memory_frames``.
        key_set: the layer's ``SparseKeySet`` to assemble the key set in without allocating;
            ignored (a fresh concatenation) when a gradient must flow through the tensors.
        window_tokens: the first local tokens that are the cache's window (``key_set`` keeps
            them from pass to pass until the window changes).

    Returns:
        ``[B, N, H, D]``.
    """
    tensors = (memory_keys, memory_values, local_keys, local_values)
    if key_set is not None and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    ):
        keys, values = key_set.assemble(*tensors, selected, tokens_per_frame, window_tokens)
        return attention(query, keys, values, backend)
    keys = torch.cat(
        [
            gather_frames_per_head(memory_keys, selected, tokens_per_frame),
            local_keys.transpose(1, 2),
        ],
        dim=2,
    )
    values = torch.cat(
        [
            gather_frames_per_head(memory_values, selected, tokens_per_frame),
            local_values.transpose(1, 2),
        ],
        dim=2,
    )
    return attention(query, keys.transpose(1, 2), values.transpose(1, 2), backend)
