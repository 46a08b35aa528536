"""Streaming across several devices with diffusers' Ulysses context parallelism, the memory
sharded by heads (architecture s.6).

``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` splits each
pass's token sequence over ``N`` ranks (the model's ``_cp_plan``: the tokens entering the first
block, RoPE's tables, gathered again at ``proj_out``). Inside a self-attention, Ulysses trades
the sequence split for a head split with one all-to-all, so each rank holds every token of
``H / N`` heads; MemFlow's session then caches only those heads. What crosses ranks per layer and
pass is the all-to-all of Q, K, V and back (diffusers' own exchange); per chunk, NAM's relevance
score (a mean over heads) is summed over ranks before the top-k, so every rank keeps the same
bank frames. SMA's selection is per head and stays local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["HeadShard", "enable_diffusers_context_parallel", "head_shard_of"]


@dataclass(frozen=True)
class HeadShard:
    """The heads one rank holds under Ulysses context parallelism.

    Attributes:
        group: the Ulysses process group (every rank of the model's context-parallel mesh).
        rank: this rank in ``group``; it holds heads ``rank * H/N .. (rank + 1) * H/N - 1``.
        degree: ``N``, the ranks of ``group``.
        num_heads: ``H``, the model's heads.
    """

    group: Any
    rank: int
    degree: int
    num_heads: int

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.degree

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's heads of ``[B, S, H, D]`` -> ``[B, S, H/N, D]``."""
        return tensor.narrow(2, self.rank * self.local_heads, self.local_heads)

    def to_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, S/N, H, D]`` (this rank's tokens, every head) -> ``[B, S, H/N, D]`` (every
        token, this rank's heads): one all-to-all."""
        return _exchange(tensor, scatter_dim=2, gather_dim=1, group=self.group)

    def to_sequence(self, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_heads``: ``[B, S, H/N, D]`` -> ``[B, S/N, H, D]``."""
        return _exchange(tensor, scatter_dim=1, gather_dim=2, group=self.group)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (the same bits on every rank)."""
        torch.distributed.all_reduce(tensor, group=self.group)
        return tensor


def _exchange(tensor: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any) -> torch.Tensor:
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    return _all_to_all_dim_exchange(tensor.contiguous(), scatter_dim, gather_dim, group)


def context_parallel_config(model: nn.Module) -> Any:
    """The ``ContextParallelConfig`` diffusers' ``enable_parallelism`` set on ``model``, or
    ``None``."""
    parallel = getattr(model, "_parallel_config", None)
    return None if parallel is None else parallel.context_parallel_config


def head_shard_of(model: nn.Module, num_heads: int, tokens_per_frame: int) -> HeadShard | None:
    """The heads this rank holds of ``model``'s ``num_heads`` under its context parallelism
    (``None`` without it), for passes of ``tokens_per_frame`` tokens a frame.

    Raises:
        ValueError: ring attention (``ring_degree > 1``) or ``ulysses_anything``, which MemFlow's
            streaming attention does not support, or heads or frame tokens the degree does not
            divide.
    """
    config = context_parallel_config(model)
    if config is None:
        return None
    if config.ring_degree != 1:
        raise ValueError(
            f"ContextParallelConfig ring_degree must be 1 for MemFlow streaming, got "
            f"{config.ring_degree}: the session's memory is sharded by heads, which only Ulysses "
            "attention gives (use ulysses_degree)"
        )
    if config.ulysses_anything:
        raise ValueError(
            "ContextParallelConfig ulysses_anything must be False for MemFlow streaming: every "
            "pass holds whole frames, split evenly (tokens per frame divisible by ulysses_degree)"
        )
    degree = config.ulysses_degree
    check_heads_divisible(num_heads, degree)
    if tokens_per_frame % degree:
        raise ValueError(
            f"ulysses_degree={degree} must divide the tokens of one latent frame "
            f"({tokens_per_frame}): choose a height and width whose latent patches split evenly"
        )
    group = config._ulysses_mesh.get_group()  # the group diffusers' Ulysses attention uses
    return HeadShard(group, torch.distributed.get_rank(group), degree, num_heads)


def check_heads_divisible(num_heads: int, degree: int) -> None:
    if num_heads % degree:
        raise ValueError(
            f"ulysses_degree={degree} must divide the model's {num_heads} attention heads "
            "(each rank holds num_heads / ulysses_degree of them)"
        )


def enable_diffusers_context_parallel(
    model: nn.Module, ulysses_degree: int, num_heads: int
) -> None:
    """Shard ``model``'s passes over ``ulysses_degree`` ranks with diffusers' Ulysses context
    parallelism (``model.enable_parallelism``, the model's own ``_cp_plan``), on every rank,
    inside an initialised ``torch.distributed`` group of exactly ``ulysses_degree`` processes.
    MemFlow's entry is ``MemFlowAttachment.enable_context_parallel``, after ``apply_memflow``
    (RoPE's split must wrap MemFlow's RoPE offset).

    Raises:
        ValueError: a degree below 2, a head count it does not divide, or a world of another size.
        RuntimeError: ``torch.distributed`` is not initialised (launch with ``torchrun``).
    """
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or (
        ulysses_degree < 2
    ):
        raise ValueError(f"ulysses_degree must be an int >= 2, got {ulysses_degree!r}")
    check_heads_divisible(num_heads, ulysses_degree)
    if getattr(model, "_cp_plan", None) is None:
        raise ValueError(
            f"ulysses_degree={ulysses_degree}: diffusers' {type(model).__name__} declares no "
            "context-parallel plan (_cp_plan), so its passes cannot be split across ranks"
        )
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            f"ulysses_degree={ulysses_degree} needs torch.distributed initialised on every rank: "
            f"launch with torchrun --nproc_per_node {ulysses_degree}"
        )
    world = torch.distributed.get_world_size()
    if world != ulysses_degree:
        raise ValueError(
            f"ulysses_degree={ulysses_degree} must equal the number of processes ({world}): "
            "every rank of the launch takes part in each pass"
        )
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=ulysses_degree)
    if torch.accelerator.device_count() == 0:
        # diffusers 0.42 picks the rank's device as `rank % torch.accelerator.device_count()`,
        # which divides by zero on a machine without an accelerator; CPU ranks (gloo) need no
        # device index, so the lookup is told of one device while the mesh is built.
        from unittest import mock

        with mock.patch("torch.accelerator.device_count", return_value=1):
            model.enable_parallelism(config=config)
    else:
        model.enable_parallelism(config=config)


def shared_generator(device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded alike on every rank (rank 0 draws the seed): ranks
    that stream one video must draw the same noise."""
    seed = torch.randint(2**62, (1,), dtype=torch.int64, device=device)
    torch.distributed.broadcast(seed, src=0)
    return torch.Generator(device).manual_seed(int(seed))


def check_same_on_every_rank(tensor: torch.Tensor, name: str) -> None:
    """Raise on every rank unless ``tensor`` has the same values on every rank (the ranks of a
    context-parallel stream compute one video: different inputs would silently mix two)."""
    reference = tensor.detach().clone()
    torch.distributed.broadcast(reference, src=0)
    differs = torch.tensor([float(not torch.equal(reference, tensor))], device=tensor.device)
    torch.distributed.all_reduce(differs)
    if differs.item():
        raise ValueError(
            f"{name} differs between ranks: under context parallelism every rank streams the "
            "same video, so seed every rank's generator alike (or pass the same latents)"
        )
