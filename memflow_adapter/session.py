"""StreamingSession: all memory state of one streaming video, and its chunk lifecycle.

A chunk goes through::

    session.begin_chunk(text_keys)          # NAM commits the staged frame into the bank
    with session.switch_prompt() as window: # only after a prompt switch: the KV recache pass
        model(clean_frames[window.start_frame:window.stop_frame], t=0)
    with session.denoise_pass():            # any number of read-only passes
        model(noisy_chunk, t)
    with session.context_pass():            # writes the chunk's K/V, stages its first frame
        model(clean_chunk, t=0)

Inside a pass, each attention layer calls ``session.attend(layer, q, k, v)`` with its post-RoPE
queries and keys; the session decides what they attend to and what gets written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch

from .attention import attention
from .cache import LayerCache
from .config import MemFlowConfig
from .introspection import ChunkMemory, MemoryTrace
from .memory import update_bank
from .positions import RopeTable
from .sparse import SparseKeySet, select_memory_frames, sparse_memory_attention


class PassKind(str, Enum):
    DENOISE = "denoise"
    CONTEXT = "context"
    RECACHE = "recache"


@dataclass(frozen=True)
class RecacheWindow:
    """Frames ``start_frame .. stop_frame - 1`` to re-encode under the new prompt.

    ``protect_sink``: the video is longer than the cache, so the sink keeps its old keys and the
    recached frames that are no longer cached are computed and discarded.
    """

    start_frame: int
    stop_frame: int
    protect_sink: bool

    @property
    def num_frames(self) -> int:
        return self.stop_frame - self.start_frame


class SessionStateError(RuntimeError):
    """A session method was called out of the chunk lifecycle's order."""


class StreamingSession:
    """Owns every layer's frame cache for one video.

    Args:
        config: memory layout and switches.
        num_layers: self-attention layers that will call ``attend`` (numbered ``0 .. n-1``).
        tokens_per_frame: ``T_f``, tokens of one latent frame.
        record_trace: keep the per-chunk memory trace (see ``trace()``).
        trace_chunks: keep the trace of the most recent chunks only (``None``: every chunk), so
            that a long stream's trace stays bounded.
        rope: the model's RoPE positions (``MemFlowAttachment.create_session`` builds it from the
            integration's ``rope_frames`` and ``rotate_keys``); a stream longer than
            ``rope.frames`` latent frames is re-based to fit (architecture s.2b). ``None``: no
            table, positions are always the absolute frames.
    """

    def __init__(
        self,
        config: MemFlowConfig,
        num_layers: int,
        tokens_per_frame: int,
        record_trace: bool = True,
        trace_chunks: int | None = None,
        rope: RopeTable | None = None,
    ) -> None:
        if not isinstance(config, MemFlowConfig):
            raise TypeError(f"config must be a MemFlowConfig, got {type(config).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        self.config = config
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        if trace_chunks is not None and (
            isinstance(trace_chunks, bool) or not isinstance(trace_chunks, int) or trace_chunks < 1
        ):
            raise ValueError(f"trace_chunks must be None or an int >= 1, got {trace_chunks!r}")
        if rope is not None:
            if not isinstance(rope, RopeTable):
                raise TypeError(f"rope must be a RopeTable or None, got {type(rope).__name__}")
            span = config.position_span
            if span is not None and span > rope.frames:
                raise ValueError(
                    f"the model's RoPE table holds {rope.frames} latent frames, but this layout "
                    f"needs {span} positions at once (a recache of sink_frames + local_frames = "
                    f"{config.cache_frames} frames, then a chunk of frames_per_chunk="
                    f"{config.frames_per_chunk}): use a smaller sink_frames or local_frames"
                )
        self.record_trace = record_trace
        self.trace_chunks = trace_chunks
        self.rope = rope
        self.layers = [LayerCache(config, tokens_per_frame) for _ in range(num_layers)]
        self.reset()

    def reset(self) -> None:
        """Forget the video: every cache tensor is dropped and every counter zeroed."""
        for cache in self.layers:
            cache.reset()
        self.chunk_index = 0  # chunks committed so far
        self.next_frame = 0  # absolute index of the next chunk's first frame
        self.position_base = 0  # RoPE position of frame f is f - position_base (architecture s.2b)
        self._trace = MemoryTrace(self.trace_chunks)
        # per layer, SMA's reused key-set buffers (scratch, never saved)
        self._sparse_key_sets = [SparseKeySet() for _ in self.layers]
        self._chunk_open = False
        self._chunk_passes = 0
        self._chunk_frames: int | None = None
        self._pass: PassKind | None = None
        self._pass_layers: set[int] = set()
        self._recache: RecacheWindow | None = None
        self._broken: str | None = None

    # ----------------------------------------------------------------------------- the lifecycle
    def begin_chunk(self, text_keys: Sequence[torch.Tensor] | None = None) -> None:
        """Open the next chunk; NAM commits the previous chunk's staged first frame to the bank.

        Args:
            text_keys: one ``[B, L_text, H, D]`` tensor per layer, the keys that layer's
                cross-attention computes for the prompt this chunk is generated with (key
                projection and its norm, padding included). Required when ``config.nam``.
        """
        self._require_usable()
        if self._chunk_open:
            raise SessionStateError(
                f"chunk {self.chunk_index} is still open: finish it with a context pass "
                "before begin_chunk"
            )
        if self.config.nam:
            self._check_text_keys(text_keys)
        shift = self._rebase_shift()
        if self.config.nam and self.chunk_index >= 1:
            for layer, cache in enumerate(self.layers):
                # with bank_staging="interval" the previous chunk may have staged nothing
                if cache.has_staged_frame:
                    update_bank(cache, self.chunk_index, text_keys[layer])
        if shift:
            for cache in self.layers:
                cache.rebase(shift, self.config.position_overflow, self.rope.rotate)
            self.position_base += shift
        self._chunk_open = True
        self._chunk_passes = 0
        self._chunk_frames = None
        if self.record_trace:
            self._trace.start_chunk(self.chunk_index, self.next_frame)
            for layer, cache in enumerate(self.layers):
                if cache.bank_frame_index is not None:
                    self._trace.record_bank(layer, cache.bank_frame_index[:, : cache.bank_filled])

    def _rebase_shift(self) -> int:
        """How far every RoPE position must move before the next chunk so that it fits in the
        table (0: it fits). A re-base moves the oldest frame a recache may re-encode to position
        0, so that as many chunks as possible follow before the next one (architecture s.2b)."""
        if self.rope is None:
            return 0
        if self.next_frame + self.config.frames_per_chunk - self.position_base <= self.rope.frames:
            return 0
        if self.config.cache_frames is None:
            raise ValueError(
                f"the video has reached the end of the model's RoPE table ({self.rope.frames} "
                "latent frames) and an unbounded local window (local_frames=None) keeps every "
                "frame, so its positions cannot be re-based: use a bounded local_frames"
            )
        return self.next_frame - self.config.cache_frames - self.position_base

    def recache_window(self) -> RecacheWindow:
        """The frames a recache pass started now would re-encode (architecture s.4b)."""
        cache_frames = self.config.cache_frames
        generated = self.next_frame
        count = generated if cache_frames is None else min(cache_frames, generated)
        protect_sink = cache_frames is not None and generated > cache_frames
        return RecacheWindow(generated - count, generated, protect_sink)

    @contextmanager
    def switch_prompt(self) -> Iterator[RecacheWindow]:
        """The recache pass after a prompt switch: run the yielded window's clean frames at
        timestep 0 under the new prompt. Its frames attend to each other in both directions and to
        the memory; their K/V replace the cached ones. Call right after ``begin_chunk``."""
        self._require_usable()
        if not self._chunk_open or self._chunk_passes:
            raise SessionStateError(
                "switch_prompt must come right after begin_chunk, before any pass of the chunk"
            )
        if self.next_frame == 0:
            raise SessionStateError("nothing to recache: no frame has been generated yet")
        self._recache = self.recache_window()
        try:
            with self._pass_scope(PassKind.RECACHE):
                yield self._recache
        finally:
            self._recache = None

    @contextmanager
    def denoise_pass(self) -> Iterator[None]:
        """A read-only pass over the open chunk (one denoising step)."""
        self._require_chunk_open("denoise_pass")
        with self._pass_scope(PassKind.DENOISE):
            yield

    @contextmanager
    def context_pass(self) -> Iterator[None]:
        """The pass that commits the open chunk: every layer writes its K/V and stages the
        chunk's first frame; the chunk is closed when the pass ends."""
        self._require_chunk_open("context_pass")
        with self._pass_scope(PassKind.CONTEXT):
            yield
        self.chunk_index += 1
        self.next_frame += self._chunk_frames
        self._chunk_open = False

    @contextmanager
    def _pass_scope(self, kind: PassKind) -> Iterator[None]:
        if self._pass is not None:
            raise SessionStateError(f"a {self._pass.value} pass is already running")
        self._pass = kind
        self._pass_layers = set()
        try:
            yield
        except BaseException:
            if kind is not PassKind.DENOISE and self._pass_layers:
                self._broken = (
                    f"a {kind.value} pass failed after layers {sorted(self._pass_layers)} wrote "
                    "to their caches"
                )
            raise
        else:
            missing = sorted(set(range(self.num_layers)) - self._pass_layers)
            if kind is not PassKind.DENOISE and missing:
                self._broken = f"a {kind.value} pass ended without layers {missing} attending"
                raise SessionStateError(self._broken)
        finally:
            self._pass = None
        self._chunk_passes += 1

    @property
    def cache_bytes(self) -> int:
        """Bytes held by every layer's cache tensors, quantization scales and the pass slot
        included (bounded unless the window is unbounded)."""
        return sum(cache.nbytes + cache.pass_nbytes for cache in self.layers)

    @property
    def current_pass(self) -> PassKind | None:
        """The pass running now, if any."""
        return self._pass

    @property
    def pass_start_frame(self) -> int:
        """Absolute latent frame of the running pass's first frame (the RoPE offset)."""
        if self._pass is None:
            raise SessionStateError("no pass is running, so there is no frame offset")
        if self._pass is PassKind.RECACHE:
            return self._recache.start_frame
        return self.next_frame

    @property
    def pass_start_position(self) -> int:
        """RoPE position of the running pass's first frame: ``pass_start_frame`` until the
        video outgrows the model's RoPE table, then re-based (architecture s.2b)."""
        return self.pass_start_frame - self.position_base

    # ------------------------------------------------------------------------------- attention
    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """Self-attention of one layer in the running pass, with the memory.

        Args:
            layer: the layer's index, ``0 .. num_layers - 1``.
            query, key, value: ``[B, n * T_f, H, D]`` for the pass's ``n`` frames; query and key
                after RoPE at the pass's positions (``pass_start_position`` onwards).

        Returns:
            ``[B, n * T_f, H, D]`` attention output.
        """
        kind = self._pass
        if kind is None:
            raise SessionStateError(
                "attend was called outside a pass: use denoise_pass, context_pass or switch_prompt"
            )
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if layer in self._pass_layers:
            raise SessionStateError(f"layer {layer} attended twice in one {kind.value} pass")
        cache = self.layers[layer]
        num_frames = cache.check_frames(key, value, "key")
        if query.shape != key.shape:
            raise ValueError(
                f"query must have the key's shape {tuple(key.shape)}, got {tuple(query.shape)}"
            )
        self._check_pass_frames(kind, num_frames)
        self._pass_layers.add(layer)

        if kind is PassKind.RECACHE:
            window = self._recache
            output = self._attend_recache(layer, query, key, value, window)
            cache.overwrite(key, value, window.start_frame, protect_sink=window.protect_sink)
            return output

        if cache.frames_written == 0:
            output = attention(query, key, value, self.config.attention_backend)
        elif self.config.sma:
            local_keys, local_values = cache.window_with(key, value)
            output = self._attend_memory_and(
                layer, kind, query, cache.memory(include_sink=True), local_keys, local_values
            )
        else:
            keys, values = cache.context_with(key, value)
            output = attention(query, keys, values, self.config.attention_backend)
        if kind is PassKind.CONTEXT:
            cache.append(key, value, self.next_frame)
            if self.config.stages_bank_frame(self.next_frame):
                t = self.tokens_per_frame
                cache.stage(key[:, :t], value[:, :t], self.next_frame)
        return output

    def _attend_recache(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        window: RecacheWindow,
    ) -> torch.Tensor:
        """The recache pass's attention (architecture s.4b). Its queries attend, in both
        directions, to the memory and to the recached frames the cache keeps. With a protected
        sink the pass covers ``local_attn_size`` frames whose first ``sink_frames`` would land on
        the sink's slots and are discarded: they are computed but take no part as keys, and the
        sink is memory with its old keys. An unprotected sink is re-encoded in this pass, so its
        new keys are memory (SMA candidates together with the bank, architecture s.4), and the
        rest of the pass is always attended.

        Args:
            query, key, value: ``[B, n * T_f, H, D]`` for the window's ``n`` frames.
        """
        cache, t = self.layers[layer], self.tokens_per_frame
        if window.protect_sink:
            kept = window.num_frames - self.config.local_frames  # the first frame kept
            return self._attend_memory_and(
                layer, PassKind.RECACHE, query, cache.memory(include_sink=True),
                key[:, kept * t :], value[:, kept * t :],
            )
        bank_keys, bank_values, bank_frames = cache.memory(include_sink=False)
        if not self.config.sma:
            return attention(
                query,
                torch.cat([bank_keys, key], dim=1),
                torch.cat([bank_values, value], dim=1),
                self.config.attention_backend,
            )
        # An unprotected recache starts at frame 0, so its first frames are the sink's.
        sink = cache.sink_count * t
        sink_frames = torch.arange(cache.sink_count, device=bank_frames.device)
        memory = (
            torch.cat([key[:, :sink], bank_keys], dim=1),
            torch.cat([value[:, :sink], bank_values], dim=1),
            torch.cat([sink_frames.expand(bank_frames.shape[0], -1), bank_frames], dim=1),
        )
        return self._attend_memory_and(
            layer, PassKind.RECACHE, query, memory, key[:, sink:], value[:, sink:]
        )

    def _attend_memory_and(
        self,
        layer: int,
        kind: PassKind,
        query: torch.Tensor,
        memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        local_keys: torch.Tensor,
        local_values: torch.Tensor,
    ) -> torch.Tensor:
        """Attention over ``[memory ; local]``, the memory cut by SMA when it is on.

        Args:
            memory: the candidate frames' keys and values ``[B, C * T_f, H, D]`` and absolute
                frame indices ``[B, C]`` (sink then bank frames).
            local_keys, local_values: ``[B, L, H, D]`` tokens that are always attended.
        """
        backend = self.config.attention_backend
        memory_keys, memory_values, memory_frames = memory
        if memory_keys.shape[1] == 0 or not self.config.sma:
            return attention(
                query,
                torch.cat([memory_keys, local_keys], dim=1),
                torch.cat([memory_values, local_values], dim=1),
                backend,
            )
        selected = select_memory_frames(
            query, memory_keys, self.tokens_per_frame, self.config.sma_top_k
        )
        if self.record_trace:
            activated = torch.gather(
                memory_frames[:, None, :].expand(-1, selected.shape[1], -1), 2, selected
            )
            self._trace.record_activation(layer, kind.value, activated)
        return sparse_memory_attention(
            query,
            memory_keys,
            memory_values,
            local_keys,
            local_values,
            selected,
            self.tokens_per_frame,
            backend,
            self._sparse_key_sets[layer],
        )

    # ---------------------------------------------------------------------------- introspection
    def trace(self) -> list[ChunkMemory]:
        """Per chunk: the bank's frames per layer and SMA's activated frames per layer and pass."""
        return self._trace.chunks()

    def last_chunk_memory(self) -> ChunkMemory | None:
        """The trace of the latest chunk begun (``None`` before any, or without a trace)."""
        return self._trace.last()

    # ----------------------------------------------------------------------------- save/restore
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole state between two chunks, as a flat dict of tensors (safetensors-compatible).

        Loading it into a session with the same config, layer count and ``tokens_per_frame``
        continues the video bit-identically. The memory trace is not part of the state.
        """
        self._require_between_chunks("state_dict")
        state = {
            "session.config_json": _encode(self.config.to_json_string()),
            "session.tokens_per_frame": torch.tensor(self.tokens_per_frame),
            "session.num_layers": torch.tensor(self.num_layers),
            "session.chunk_index": torch.tensor(self.chunk_index),
            "session.next_frame": torch.tensor(self.next_frame),
            "session.position_base": torch.tensor(self.position_base),
        }
        for index, cache in enumerate(self.layers):
            for name, tensor in cache.state_dict().items():
                state[f"layers.{index}.{name}"] = tensor
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a ``state_dict()``, replacing everything (an open chunk is abandoned).
        Nothing changes unless the whole state is valid."""
        if self._pass is not None:
            raise SessionStateError(f"load_state_dict cannot run inside a {self._pass.value} pass")
        required = [
            "session.config_json",
            "session.tokens_per_frame",
            "session.num_layers",
            "session.chunk_index",
            "session.next_frame",
            "session.position_base",
        ]
        missing = [name for name in required if name not in state]
        if missing:
            raise KeyError(f"session state is missing {missing}")
        saved_config = MemFlowConfig.from_json_string(_decode(state["session.config_json"]))
        if saved_config != self.config:
            raise ValueError(
                f"session state was saved with config {saved_config}, this session has "
                f"{self.config}"
            )
        for name, expected in (
            ("tokens_per_frame", self.tokens_per_frame),
            ("num_layers", self.num_layers),
        ):
            saved = int(state[f"session.{name}"])
            if saved != expected:
                raise ValueError(f"session state has {name}={saved}, this session has {expected}")
        staging = [LayerCache(self.config, self.tokens_per_frame) for _ in range(self.num_layers)]
        for index, cache in enumerate(staging):
            prefix = f"layers.{index}."
            cache.load_state_dict(
                {
                    key[len(prefix) :]: value
                    for key, value in state.items()
                    if key.startswith(prefix)
                }
            )
        position_base = int(state["session.position_base"])
        if any(cache.position_base != position_base for cache in staging):
            raise ValueError(
                f"session state has position_base={position_base} but layer caches re-based to "
                f"{sorted({cache.position_base for cache in staging})}"
            )
        self.reset()
        self.layers = staging
        self.chunk_index = int(state["session.chunk_index"])
        self.next_frame = int(state["session.next_frame"])
        self.position_base = position_base

    # ------------------------------------------------------------------------------- validation
    def _check_text_keys(self, text_keys: Sequence[torch.Tensor] | None) -> None:
        if text_keys is None or len(text_keys) != self.num_layers:
            got = "None" if text_keys is None else f"{len(text_keys)} tensors"
            raise ValueError(
                f"text_keys must hold one [B, L_text, H, D] tensor per layer ({self.num_layers}) "
                f"when nam=True, got {got}"
            )
        for layer, (keys, cache) in enumerate(zip(text_keys, self.layers, strict=True)):
            if not isinstance(keys, torch.Tensor) or keys.ndim != 4:
                shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
                raise ValueError(f"text_keys[{layer}] must be [B, L_text, H, D], got {shape}")
            geometry = cache.geometry
            if geometry is not None and (keys.shape[0], keys.shape[2], keys.shape[3]) != (
                geometry.batch_size,
                geometry.num_heads,
                geometry.head_dim,
            ):
                raise ValueError(
                    f"text_keys[{layer}] has shape {tuple(keys.shape)}, expected [B="
                    f"{geometry.batch_size}, L_text, H={geometry.num_heads}, D={geometry.head_dim}]"
                )

    def _check_pass_frames(self, kind: PassKind, num_frames: int) -> None:
        if kind is PassKind.RECACHE:
            expected = self._recache.num_frames
            if num_frames != expected:
                raise ValueError(
                    f"the recache pass must cover {expected} frames "
                    f"({self._recache.start_frame}..{self._recache.stop_frame - 1}), "
                    f"got {num_frames}"
                )
            return
        if not 1 <= num_frames <= self.config.frames_per_chunk:
            raise ValueError(
                f"a chunk pass must hold 1..frames_per_chunk={self.config.frames_per_chunk} "
                f"frames, got {num_frames}"
            )
        if self._chunk_frames is None:
            self._chunk_frames = num_frames
        elif num_frames != self._chunk_frames:
            raise ValueError(
                f"every pass of a chunk must hold the same frames: this chunk has "
                f"{self._chunk_frames}, got {num_frames}"
            )

    def _require_usable(self) -> None:
        if self._broken is not None:
            raise SessionStateError(
                f"the session state is incomplete ({self._broken}); call reset() or "
                "load_state_dict() before going on"
            )

    def _require_chunk_open(self, what: str) -> None:
        self._require_usable()
        if not self._chunk_open:
            raise SessionStateError(f"{what} needs an open chunk: call begin_chunk first")

    def _require_between_chunks(self, what: str) -> None:
        self._require_usable()
        if self._chunk_open:
            raise SessionStateError(
                f"{what} is only available between chunks (chunk {self.chunk_index} is open)"
            )


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode(tensor: torch.Tensor) -> str:
    return bytes(tensor.tolist()).decode("utf-8")
