"""The memory bank's refresh before a chunk (architecture s.3): the staged frame fills the bank,
then the bank policy's scores choose what stays (NAM's, the paper's, by default)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import LayerCache
from .config import MemFlowConfig
from .context_parallel import HeadShard
from .policies import BankCandidates, BankPolicy, bank_policy_named, top_k_in_time_order


def bank_slot_for_commit(chunk_index: int, record_interval: int, bank_frames: int) -> int | None:
    """Slot that the frame staged by chunk ``chunk_index - 1`` overwrites while the bank fills.

    The commit happens at the start of chunk ``chunk_index`` (>= 1). Consecutive
    ``record_interval`` commits share a slot, so the slot ends up with the last of them. Returns
    ``None`` once the pointer has passed the bank: from then on every commit runs the selection.
    """
    if chunk_index < 1:
        raise ValueError(
            f"chunk_index must be >= 1 (chunk 0 has nothing to commit), got {chunk_index}"
        )
    pointer = (chunk_index - 1) // record_interval + 1
    return pointer - 1 if pointer <= bank_frames else None


class MemoryBank:
    """The memory banks of a session's layers: the policy that refreshes them, which chunks stage
    a frame for them, and the refresh before each chunk.

    Args:
        config: the session's config (``nam=True``).
        head_shard: under context parallelism, the heads this rank's caches hold.
    """

    def __init__(self, config: MemFlowConfig, head_shard: HeadShard | None = None) -> None:
        self.config = config
        self.head_shard = head_shard
        self.policy = bank_policy_named(config.bank_policy)
        # chunks that start in the sink stage nothing when the policy refuses the sink's frames
        self.unstaged_chunks = 0
        if not self.policy.admits_sink_frames:
            self.unstaged_chunks = -(-config.sink_frames // config.frames_per_chunk)

    def stages(self, start_frame: int) -> bool:
        """Whether the chunk starting at latent frame ``start_frame`` stages its first frame:
        as the config's ``bank_staging`` says, unless the policy refuses the sink's frames."""
        if not self.config.stages_bank_frame(start_frame):
            return False
        return self.policy.admits_sink_frames or start_frame >= self.config.sink_frames

    def refresh(
        self,
        layers: Sequence[LayerCache],
        chunk_index: int,
        text_keys: Sequence[torch.Tensor] | None,
    ) -> None:
        """Before chunk ``chunk_index``, every layer commits its staged frame (``update_bank``).

        Args:
            text_keys: one ``[B, L_text, H, D]`` tensor per layer, the coming prompt's keys
                (every head's under context parallelism); checked at every chunk.
        """
        text_keys = local_text_keys(text_keys, layers, self.head_shard)
        commit_index = chunk_index - self.unstaged_chunks
        if commit_index < 1:
            return
        for cache, keys in zip(layers, text_keys, strict=True):
            # with bank_staging="interval" the previous chunk may have staged nothing
            if cache.has_staged_frame:
                update_bank(cache, commit_index, self.policy, keys, self.head_shard)


def update_bank(
    cache: LayerCache,
    commit_index: int,
    policy: BankPolicy,
    text_keys: torch.Tensor | None,
    head_shard: HeadShard | None = None,
) -> None:
    """Commit the staged frame before a chunk (architecture s.3, steps 1-2).

    While the bank fills, the frame goes to the slot the pointer names (``bank_staging=
    "every_chunk"``) or to the next free slot (``"interval"``); afterwards the bank keeps the
    ``bank_frames - 1`` frames ``policy`` scores highest, in time order, and appends the staged
    frame.

    Args:
        cache: the layer's cache, with a staged frame.
        commit_index: the chunk about to be generated (>= 1), counted from the first chunk that
            staged a frame: its index, less the chunks that start in the sink when ``policy``
            refuses the sink's frames.
        policy: scores the bank's frames once the bank is full.
        text_keys: ``[B, L_text, H, D]`` keys of the prompt that chunk will be generated with;
            needed only once the bank is full.
        head_shard: under context parallelism, the heads ``cache`` and ``text_keys`` hold: the
            scores are summed over the ranks, so that every rank keeps the same frames.
    """
    config = cache.config
    if config.bank_staging == "every_chunk":
        slot = bank_slot_for_commit(commit_index, config.record_interval, config.bank_frames)
    else:  # "interval": only some chunks stage; each staged frame takes the next free slot
        slot = cache.bank_filled if cache.bank_filled < config.bank_frames else None
    if slot is not None:
        cache.commit_staged_to_slot(slot)
        return
    if text_keys is None:
        raise ValueError("text_keys are required to select bank frames once the bank is full")
    num_heads = None if head_shard is None else head_shard.num_heads
    scores = policy.score(BankCandidates(cache, text_keys, num_heads))
    expected = (cache.geometry.batch_size, cache.bank_filled)
    if tuple(scores.shape) != expected:
        raise ValueError(
            f"bank policy {type(policy).__name__} returned scores of shape "
            f"{tuple(scores.shape)}, expected [B, C] = {list(expected)}"
        )
    if head_shard is not None:
        scores = head_shard.sum(scores)
    cache.commit_staged_after(top_k_in_time_order(scores, config.bank_frames - 1))


def local_text_keys(
    text_keys: Sequence[torch.Tensor] | None,
    layers: Sequence[LayerCache],
    head_shard: HeadShard | None = None,
) -> list[torch.Tensor]:
    """``text_keys`` checked to hold one ``[B, L_text, H, D]`` tensor per layer that fits its
    cache, and narrowed to this rank's heads under context parallelism (where every head's keys
    are expected)."""
    num_heads = None if head_shard is None else head_shard.num_heads
    if text_keys is None or len(text_keys) != len(layers):
        got = "None" if text_keys is None else f"{len(text_keys)} tensors"
        raise ValueError(
            f"text_keys must hold one [B, L_text, H, D] tensor per layer ({len(layers)}) "
            f"when nam=True, got {got}"
        )
    for layer, (keys, cache) in enumerate(zip(text_keys, layers, strict=True)):
        if not isinstance(keys, torch.Tensor) or keys.ndim != 4:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"text_keys[{layer}] must be [B, L_text, H, D], got {shape}")
        if num_heads is not None and keys.shape[2] != num_heads:
            raise ValueError(
                f"text_keys[{layer}] has {keys.shape[2]} heads, expected every head of the "
                f"model ({num_heads}): each rank takes its own"
            )
        geometry = cache.geometry
        if geometry is None:
            continue
        heads = geometry.num_heads if num_heads is None else num_heads
        if (keys.shape[0], keys.shape[2], keys.shape[3]) != (
            geometry.batch_size, heads, geometry.head_dim
        ):
            raise ValueError(
                f"text_keys[{layer}] has shape {tuple(keys.shape)}, expected [B="
                f"{geometry.batch_size}, L_text, H={heads}, D={geometry.head_dim}]"
            )
    if head_shard is None:
        return list(text_keys)
    return [head_shard.local(keys) for keys in text_keys]
