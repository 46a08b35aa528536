"""One layer's self-attention in a pass, with the memory (architecture s.2, s.4, s.4b). It reads
top to bottom::

    candidates -> activation policy -> attention -> write

The candidates are memory frames (sink and bank: what the activation policy may cut) and local
tokens (the window and the pass's own, always attended). Without SMA every candidate is attended
in one dense softmax; with it, per head, only the ``sma_top_k`` memory frames the activation
policy scores highest, gathered with the local tokens (``sparse``). Token tensors use diffusers'
layout ``[B, tokens, H, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attention
from .cache import LayerCache
from .config import MemFlowConfig
from .introspection import MemoryTrace
from .passes import PassKind, PassPlan
from .policies import activation_policy_named
from .sparse import SparseKeySet, select_memory_frames, sparse_memory_attention


@dataclass(frozen=True)
class KeySet:
    """What a pass's queries may attend to.

    Attributes:
        local_keys, local_values: ``[B, L, H, D]``, always attended.
        memory_keys, memory_values: ``[B, C * T_f, H, D]`` memory frames, attended before the
            local tokens and cut by the activation policy (``None``: no memory apart from them).
        memory_frames: ``[B, C]`` absolute frame indices of the memory frames (for the trace).
        window_tokens: the first local tokens that are the cache's window (SMA's key set keeps
            them from pass to pass until the window changes).
    """

    local_keys: torch.Tensor
    local_values: torch.Tensor
    memory_keys: torch.Tensor | None = None
    memory_values: torch.Tensor | None = None
    memory_frames: torch.Tensor | None = None
    window_tokens: int = 0


class MemoryAttention:
    """The attention of one session's layers under its config's activation policy (``None``
    without SMA: dense). Owns per layer SMA's reused key-set buffers, and per pass what the
    session commits or traces when the pass ends: a context pass's own K/V where the caches'
    pass slots do not hold them (``pending``) and SMA's activated frames (``activated``).

    Args:
        config: the session's config.
        tokens_per_frame: ``T_f``.
        num_layers: the session's layers.
        record_trace: keep SMA's activated frames for the trace.
    """

    def __init__(
        self, config: MemFlowConfig, tokens_per_frame: int, num_layers: int, record_trace: bool
    ) -> None:
        self.config = config
        self.tokens_per_frame = tokens_per_frame
        self.record_trace = record_trace
        self.activation = activation_policy_named(config.activation_policy) if config.sma else None
        capacity = None
        if config.local_frames is not None:
            capacity = (config.sma_top_k + config.local_frames) * tokens_per_frame
        self.key_sets = [SparseKeySet(capacity) for _ in range(num_layers)]
        self.start_pass()

    def start_pass(self) -> None:
        """Forget the last pass's pending K/V and activated frames."""
        layers = len(self.key_sets)
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers
        self.activated: list[torch.Tensor | None] = [None] * layers

    def trace_pass(self, trace: MemoryTrace, kind: PassKind) -> None:
        """Record the frames SMA activated in the pass that ended."""
        for layer, activated in enumerate(self.activated):
            if activated is not None:
                trace.record_activation(layer, kind.value, activated)

    def release_windows(self) -> None:
        """The caches' windows changed: SMA's key sets copy them again at their next pass."""
        for key_set in self.key_sets:
            key_set.release_window()

    def attend(
        self,
        plan: PassPlan,
        layer: int,
        cache: LayerCache,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, n * T_f, H, D]`` output of the layer's pass over ``n`` frames, whose post-RoPE
        queries and keys and values (``[B, n * T_f, H, D]``) the session has checked."""
        key_set = self._candidates(plan, cache, key, value)
        output = self._attend(layer, query, key_set)
        if plan.recache_frames:
            cache.overwrite_newest(key, value, plan.protect_sink)
        # own_in_slot first: once it holds, the pass kind is never read, so a compiled model
        # does not guard on it and every pass kind runs one graph (architecture s.2d)
        elif not plan.own_in_slot and plan.kind is PassKind.CONTEXT:
            self.pending[layer] = (key.detach(), value.detach())
        return output

    def _candidates(
        self, plan: PassPlan, cache: LayerCache, key: torch.Tensor, value: torch.Tensor
    ) -> KeySet:
        if plan.recache_frames:
            return self._recache_candidates(cache, key, value, plan.protect_sink)
        if not plan.cached:  # the first chunk attends to itself only
            return KeySet(key, value)
        if self.activation is None:  # every frame attended: [sink | bank | window | own]
            return KeySet(*cache.context_with(key, value))
        return KeySet(
            *cache.window_with(key, value),
            *cache.memory(include_sink=True),
            window_tokens=cache.window_count * self.tokens_per_frame,
        )

    def _recache_candidates(
        self, cache: LayerCache, key: torch.Tensor, value: torch.Tensor, protect_sink: bool
    ) -> KeySet:
        """The recache pass's candidates (architecture s.4b): its frames attend, in both
        directions, to the memory and to the recached frames the cache keeps. With a protected
        sink the pass covers ``local_attn_size`` frames whose first ``sink_frames`` would land on
        the sink's slots and are discarded: computed, but no keys; the sink is memory with its
        old keys. An unprotected sink is re-encoded in this pass, so its new keys are memory
        (SMA candidates together with the bank), and the rest of the pass is always attended."""
        t = self.tokens_per_frame
        if protect_sink:
            kept = key.shape[1] // t - self.config.local_frames  # the first frame kept
            memory = cache.memory(include_sink=True)
            return KeySet(key[:, kept * t :], value[:, kept * t :], *memory)
        bank_keys, bank_values, bank_frames = cache.memory(include_sink=False)
        if self.activation is None:
            return KeySet(key, value, bank_keys, bank_values, bank_frames)
        # An unprotected recache starts at frame 0, so its first frames are the sink's.
        sink = cache.sink_count * t
        sink_frames = torch.arange(cache.sink_count, device=bank_frames.device)
        return KeySet(
            key[:, sink:],
            value[:, sink:],
            torch.cat([key[:, :sink], bank_keys], dim=1),
            torch.cat([value[:, :sink], bank_values], dim=1),
            torch.cat([sink_frames.expand(bank_frames.shape[0], -1), bank_frames], dim=1),
        )

    def _attend(self, layer: int, query: torch.Tensor, key_set: KeySet) -> torch.Tensor:
        backend = self.config.attention_backend
        memory_keys, memory_values = key_set.memory_keys, key_set.memory_values
        if self.activation is None or memory_keys is None or memory_keys.shape[1] == 0:
            keys, values = key_set.local_keys, key_set.local_values
            if memory_keys is not None:
                keys = torch.cat([memory_keys, keys], dim=1)
                values = torch.cat([memory_values, values], dim=1)
            return attention(query, keys, values, backend)
        selected = select_memory_frames(
            self.activation, query, memory_keys, self.tokens_per_frame, self.config.sma_top_k
        )  # [B, H, k]
        if self.record_trace:
            frames = key_set.memory_frames
            self.activated[layer] = torch.gather(
                frames[:, None, :].expand(-1, selected.shape[1], -1), 2, selected
            )
        return sparse_memory_attention(
            query,
            memory_keys,
            memory_values,
            key_set.local_keys,
            key_set.local_values,
            selected,
            self.tokens_per_frame,
            backend,
            self.key_sets[layer],
            key_set.window_tokens,
        )
