"""The memory-policy interface: a policy is one score; the engine owns the rest.

Two kinds (architecture s.3-s.4, kvpress-style):

- a **bank policy** scores the memory bank's frames before a chunk; the engine keeps the
  ``bank_frames - 1`` best in time order, appends the newest chunk's staged first frame and
  records the bank in the trace (``memory.update_bank``);
- an **activation policy** scores, per head, the memory frames (sink and bank) a pass may attend
  to; the engine keeps the ``sma_top_k`` best in time order, gathers them and attends to them with
  the local window (``memory_attention``).

A policy is registered under a name, and ``MemFlowConfig.bank_policy`` /
``MemFlowConfig.activation_policy`` name the ones a stream uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

if TYPE_CHECKING:
    from ..cache import LayerCache


def top_k_in_time_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring candidates along the last dimension, in candidate (temporal)
    order.

    Args:
        scores: ``[..., C]``.

    Returns:
        ``[..., k]`` int64 candidate indices, ascending.
    """
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


class BankCandidates:
    """What a bank policy may read about one layer before a chunk: the frames of the full bank
    (its candidates), the staged frame that joins it after the selection, and the prompt the
    chunk is generated with. Tensors are read from the cache only when a policy asks for them.

    Args:
        cache: the layer's cache, with a full bank and a staged frame.
        text_keys: ``[B, L_text, H, D]`` the layer's cross-attention keys of the coming prompt.
        num_heads: the heads a mean over heads divides by: ``H``, or every head of the model
            when ``cache`` holds one rank's heads under context parallelism (the engine then sums
            the scores over the ranks, so a score must be a sum of per-head terms, or the same
            on every rank).
    """

    def __init__(self, cache: LayerCache, text_keys: torch.Tensor, num_heads: int) -> None:
        self._cache = cache
        self.text_keys = text_keys
        self.num_heads = num_heads

    @property
    def frames(self) -> torch.Tensor:
        """``[B, C]`` int64 absolute latent frames of the bank's slots, oldest first."""
        return self._cache.bank_frame_index[:, : self._cache.bank_filled]

    @property
    def staged_frame(self) -> int:
        """The frame that joins the bank after the selection (the newest chunk's first)."""
        return self._cache.staged_frame

    @property
    def sink_frames(self) -> int:
        """Frames ``0 .. sink_frames - 1`` are the sink's."""
        return self._cache.config.sink_frames

    @cached_property
    def keys(self) -> torch.Tensor:
        """``[B, C, T_f, H, D]`` post-RoPE keys of the bank's frames."""
        return self._cache.bank_by_frame()

    @cached_property
    def newest_keys(self) -> torch.Tensor:
        """``[B, n, T_f, H, D]`` keys of the newest chunk's frames that the local window holds
        (``n <= frames_per_chunk``), or of the staged frame alone when the window holds none of
        them (``local_frames == frames_per_chunk``)."""
        return self._cache.newest_chunk_keys()


class BankPolicy(ABC):
    """Which frames the memory bank keeps. Subclasses implement ``score``; registered with
    ``register_bank_policy`` they are named by ``MemFlowConfig.bank_policy``."""

    #: Whether a chunk whose first frame lies in the sink may stage it for the bank (the sink
    #: holds it already; the reference allows it).
    admits_sink_frames: ClassVar[bool] = True

    @abstractmethod
    def score(self, candidates: BankCandidates) -> torch.Tensor:
        """``[B, C]`` scores of the bank's frames; the ``bank_frames - 1`` highest are kept."""


class ActivationPolicy(ABC):
    """Which memory frames a pass attends to under Sparse Memory Activation. Subclasses
    implement ``score``; registered with ``register_activation_policy`` they are named by
    ``MemFlowConfig.activation_policy``."""

    @abstractmethod
    def score(self, query: torch.Tensor, memory_keys: torch.Tensor) -> torch.Tensor:
        """Per batch element and head, the relevance of each memory frame to the pass.

        Args:
            query: ``[B, N, H, D]`` post-RoPE queries of the pass.
            memory_keys: ``[B, C, T_f, H, D]`` cached keys of the ``C`` sink and bank frames.

        Returns:
            ``[B, H, C]`` scores; the ``sma_top_k`` highest are attended.
        """


#: Registered policies by name: what ``MemFlowConfig`` accepts.
BANK_POLICIES: dict[str, type[BankPolicy]] = {}
ACTIVATION_POLICIES: dict[str, type[ActivationPolicy]] = {}

Policy = TypeVar("Policy", bound=type)


def _registrar(
    registry: dict[str, type], base: type, kind: str
) -> Callable[[str], Callable[[Policy], Policy]]:
    def register(name: str) -> Callable[[Policy], Policy]:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a {kind} name must be an identifier string, got {name!r}")

        def decorate(policy: Policy) -> Policy:
            if not (isinstance(policy, type) and issubclass(policy, base)):
                raise TypeError(f"a {kind} must be a subclass of {base.__name__}, got {policy!r}")
            if registry.get(name, policy) is not policy:
                raise ValueError(
                    f"{kind} {name!r} is already registered ({registry[name].__qualname__})"
                )
            registry[name] = policy
            return policy

        return decorate

    return register


#: Class decorators: ``@register_bank_policy("recency")`` makes ``bank_policy="recency"`` valid.
register_bank_policy = _registrar(BANK_POLICIES, BankPolicy, "bank policy")
register_activation_policy = _registrar(ACTIVATION_POLICIES, ActivationPolicy, "activation policy")


def bank_policy_named(name: str) -> BankPolicy:
    """A new instance of the bank policy registered as ``name``."""
    return registered_policy(BANK_POLICIES, name, "bank_policy")()


def activation_policy_named(name: str) -> ActivationPolicy:
    """A new instance of the activation policy registered as ``name``."""
    return registered_policy(ACTIVATION_POLICIES, name, "activation_policy")()


def registered_policy(registry: dict[str, type], name: str, parameter: str) -> type:
    """The class registered as ``name`` in ``registry`` (``BANK_POLICIES`` or
    ``ACTIVATION_POLICIES``); errors name ``parameter``."""
    if not isinstance(name, str):
        raise TypeError(f"{parameter} must be a str, got {name!r}")
    if name not in registry:
        register = f"register_{parameter}"
        raise ValueError(
            f"{parameter} must be one of {sorted(registry)} (a policy of your own: register it "
            f"with memflow_adapter.policies.{register} before a config naming it is made or "
            f"loaded), got {name!r}"
        )
    return registry[name]
