"""A streaming session's state between two chunks, as a flat dict of tensors: safetensors-
compatible and readable with ``torch.load(..., weights_only=True)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import LayerCache
from .config import MemFlowConfig

_REQUIRED = ("config_json", "tokens_per_frame", "num_layers", "chunk_index", "next_frame",
             "position_base")


@dataclass(frozen=True)
class SessionState:
    """What continues a video: the session's identity (config, ``tokens_per_frame``, the heads
    it holds as ``(rank, degree)`` under context parallelism), its counters and one cache per
    layer."""

    config: MemFlowConfig
    tokens_per_frame: int
    head_shard: tuple[int, int]
    chunk_index: int
    next_frame: int
    position_base: int
    layers: list[LayerCache]

    def to_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "session.config_json": _encode(self.config.to_json_string()),
            "session.tokens_per_frame": torch.tensor(self.tokens_per_frame),
            "session.num_layers": torch.tensor(len(self.layers)),
            "session.chunk_index": torch.tensor(self.chunk_index),
            "session.next_frame": torch.tensor(self.next_frame),
            "session.position_base": torch.tensor(self.position_base),
            "session.head_shard": torch.tensor(self.head_shard),
        }
        for index, cache in enumerate(self.layers):
            for name, tensor in cache.state_dict().items():
                state[f"layers.{index}.{name}"] = tensor
        return state

    @classmethod
    def from_dict(
        cls,
        state: dict[str, torch.Tensor],
        config: MemFlowConfig,
        tokens_per_frame: int,
        num_layers: int,
        head_shard: tuple[int, int],
    ) -> SessionState:
        """``to_dict``'s state, checked against the session that loads it (its config,
        ``tokens_per_frame``, layers and heads): raises unless the whole state is valid."""
        missing = [f"session.{name}" for name in _REQUIRED if f"session.{name}" not in state]
        if missing:
            raise KeyError(f"session state is missing {missing}")
        saved_config = MemFlowConfig.from_json_string(_decode(state["session.config_json"]))
        if saved_config != config:
            raise ValueError(
                f"session state was saved with config {saved_config}, this session has {config}"
            )
        for name, expected in (("tokens_per_frame", tokens_per_frame), ("num_layers", num_layers)):
            saved = int(state[f"session.{name}"])
            if saved != expected:
                raise ValueError(f"session state has {name}={saved}, this session has {expected}")
        # states saved before context parallelism hold every head: rank 0 of 1
        saved_shard = tuple(state.get("session.head_shard", torch.tensor((0, 1))).tolist())
        if saved_shard != head_shard:
            raise ValueError(
                f"session state holds the heads of rank {saved_shard[0]} of {saved_shard[1]} "
                f"(context parallelism), this session those of rank {head_shard[0]} of "
                f"{head_shard[1]}: each rank loads its own"
            )
        layers = [LayerCache(config, tokens_per_frame) for _ in range(num_layers)]
        for index, cache in enumerate(layers):
            prefix = f"layers.{index}."
            cache.load_state_dict(
                {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
            )
        position_base = int(state["session.position_base"])
        if any(cache.position_base != position_base for cache in layers):
            raise ValueError(
                f"session state has position_base={position_base} but layer caches re-based to "
                f"{sorted({cache.position_base for cache in layers})}"
            )
        return cls(
            config,
            tokens_per_frame,
            head_shard,
            int(state["session.chunk_index"]),
            int(state["session.next_frame"]),
            position_base,
            layers,
        )


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode(tensor: torch.Tensor) -> str:
    return bytes(tensor.tolist()).decode("utf-8")
