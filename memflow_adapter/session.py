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

Everything a pass's ``attend`` reads is fixed when the pass starts (a ``PassPlan``, the region
counts of the caches, the RoPE position as a device tensor), and a context pass's frames are
committed when it ends: once the cache is full these are the same from chunk to chunk, so a
compiled transformer meets the same guards every chunk (architecture s.2d).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .cache import LayerCache
from .config import MemFlowConfig
from .context_parallel import HeadShard
from .introspection import ChunkMemory, MemoryTrace
from .memory import MemoryBank
from .memory_attention import MemoryAttention
from .passes import (
    PassKind,
    PassPlan,
    RecacheWindow,
    SessionStateError,
    check_pass_frames,
    chunk_frames,
)
from .positions import RopeTable
from .session_state import SessionState


class StreamingSession:
    """Owns every layer's frame cache for one video: per layer, sink, bank and window frames of
    post-RoPE keys and values ``[B, T_f, H, D]`` each; ``attend`` takes a pass's queries, keys
    and values ``[B, n * T_f, H, D]`` and returns the attention output of that shape.

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
        device: where the pass's RoPE position tensor lives (``pass_rope_position``): the
            model's device, so that the model reads it without a host-to-device copy.
        head_shard: under Ulysses context parallelism, the heads this rank holds: ``attend`` gets
            ``[B, n * T_f, H/N, D]`` and the caches hold those heads only; ``begin_chunk`` takes
            every head's text keys and sums NAM's scores over the ranks (architecture s.6).
    """

    def __init__(
        self,
        config: MemFlowConfig,
        num_layers: int,
        tokens_per_frame: int,
        record_trace: bool = True,
        trace_chunks: int | None = None,
        rope: RopeTable | None = None,
        device: torch.device | str = "cpu",
        head_shard: HeadShard | None = None,
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
            rope.require_room(config.position_span, config.cache_frames, config.frames_per_chunk)
        self.record_trace = record_trace
        self.trace_chunks = trace_chunks
        self.rope = rope
        self.device = torch.device(device)
        self.head_shard = head_shard
        self._bank = MemoryBank(config, head_shard)
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
        # the attention policy and its scratch (never saved)
        self._attention = MemoryAttention(
            self.config, self.tokens_per_frame, self.num_layers, self.record_trace
        )
        self._chunk_open = False
        self._chunk_passes = 0
        self._chunk_frames: int | None = None
        self._pass: PassKind | None = None
        self._recache: RecacheWindow | None = None
        self._broken: str | None = None
        self._reset_pass_scratch(None)
        self._set_next_position()

    def _set_next_position(self) -> None:
        """The RoPE position of the next chunk's first frame, as a device tensor: moved with
        device ops from chunk to chunk, so a pass reads it without a host sync or a guard."""
        position = self.next_frame - self.position_base
        self._next_position = torch.tensor(position, dtype=torch.long, device=self.device)

    def _reset_pass_scratch(self, plan: PassPlan | None) -> None:
        """What one pass's ``attend`` calls fill in, per layer, for the pass's end to use."""
        self._plan = plan
        self._attended = [False] * self.num_layers
        self._pass_frames = [0] * self.num_layers
        self._attention.start_pass()

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
        shift = self._rebase_shift()
        if self.config.nam:
            self._bank.refresh(self.layers, self.chunk_index, text_keys)
        if shift:
            for cache in self.layers:
                cache.rebase(shift, self.config.position_overflow, self.rope.rotate)
            self.position_base += shift
            self._next_position.sub_(shift)
            self._attention.release_windows()
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

    def _commit_chunk(self) -> None:
        """Write the context pass's frames into every layer's cache, stage the chunk's first
        frame for the bank and close the chunk: when the pass has ended, so that no layer's
        ``attend`` changes a counter (``PassPlan``). A context pass that fails commits nothing:
        the chunk stays open."""
        frames, t = self._chunk_frames, self.tokens_per_frame
        stages = self._bank.stages(self.next_frame)
        for cache, pending in zip(self.layers, self._attention.pending, strict=True):
            keys, values = cache.held(frames) if pending is None else pending
            cache.append(keys, values, self.next_frame)
            if stages:
                cache.stage(keys[:, :t], values[:, :t], self.next_frame)
        self._attention.release_windows()
        self.chunk_index += 1
        self.next_frame += frames
        self._next_position.add_(frames)
        self._chunk_open = False

    @contextmanager
    def _pass_scope(self, kind: PassKind) -> Iterator[None]:
        if self._pass is not None:
            raise SessionStateError(f"a {self._pass.value} pass is already running")
        self._pass = kind
        self._reset_pass_scratch(self._plan_pass(kind))
        self._pass_position = self._next_position
        if kind is PassKind.RECACHE:
            self._pass_position = self._next_position - self._recache.num_frames
        try:
            yield
        except BaseException:
            if kind is PassKind.RECACHE and any(self._attended):
                self._broken = (
                    f"a recache pass failed after layers {self._layers_attended(True)} rewrote "
                    "their caches"
                )
            raise
        else:
            self._end_pass(kind)
            if kind is PassKind.CONTEXT:
                try:
                    self._commit_chunk()
                except BaseException:
                    self._broken = "a context pass's commit failed part of the way"
                    raise
        finally:
            if kind is PassKind.RECACHE:
                self._attention.release_windows()
            self._pass = None
            self._reset_pass_scratch(None)
        self._chunk_passes += 1

    def _plan_pass(self, kind: PassKind) -> PassPlan:
        cache = self.layers[0]
        cached = cache.frames_written > 0
        own_in_slot = cached and cache.pass_frames > 0
        if kind is not PassKind.RECACHE:
            return PassPlan(kind, cached, own_in_slot)
        window = self._recache
        return PassPlan(kind, cached, False, window.num_frames, window.protect_sink)

    def _end_pass(self, kind: PassKind) -> None:
        """Checks of a pass that ran to its end, before anything of it is committed; the
        activated frames go to the trace."""
        missing = self._layers_attended(False)
        if kind is not PassKind.DENOISE and missing:
            message = f"a {kind.value} pass ended without layers {missing} attending"
            if kind is PassKind.RECACHE:
                self._broken = message
            raise SessionStateError(message)
        if kind is not PassKind.RECACHE:
            attended = zip(self._pass_frames, self._attended, strict=True)
            frames = [n for n, done in attended if done]
            self._chunk_frames = chunk_frames(frames, self._chunk_frames)
        if self.record_trace:
            self._attention.trace_pass(self._trace, kind)

    def _layers_attended(self, attended: bool) -> list[int]:
        return [layer for layer, done in enumerate(self._attended) if done is attended]

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
    def in_pass(self) -> bool:
        """Whether a pass is running (the same for every kind: what a compiled model's guard
        hook reads)."""
        return self._plan is not None

    @property
    def pass_rope_position(self) -> torch.Tensor:
        """``pass_start_position`` as a 0-d int64 tensor on ``device``: what the model's RoPE
        reads, so that a compiled model neither syncs nor guards on the chunk's position."""
        if self._plan is None:
            raise SessionStateError("no pass is running, so there is no RoPE position")
        return self._pass_position

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
        plan = self._plan
        if plan is None:
            raise SessionStateError(
                "attend was called outside a pass: use denoise_pass, context_pass or switch_prompt"
            )
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if self._attended[layer]:
            raise SessionStateError(f"layer {layer} attended twice in one {plan.kind.value} pass")
        cache = self.layers[layer]
        num_frames = cache.check_frames(key, value, "key")
        if query.shape != key.shape:
            raise ValueError(
                f"query must have the key's shape {tuple(key.shape)}, got {tuple(query.shape)}"
            )
        check_pass_frames(plan, num_frames, self.config.frames_per_chunk, self._recache)
        self._attended[layer] = True
        self._pass_frames[layer] = num_frames
        return self._attention.attend(plan, layer, cache, query, key, value)

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

        Loading it into a session with the same config, layer count, ``tokens_per_frame`` and
        heads (under context parallelism, each rank its own) continues the video
        bit-identically. The memory trace is not part of the state.
        """
        self._require_between_chunks("state_dict")
        return SessionState(
            self.config, self.tokens_per_frame, self._head_shard_id(), self.chunk_index,
            self.next_frame, self.position_base, self.layers,
        ).to_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a ``state_dict()``, replacing everything (an open chunk is abandoned).
        Nothing changes unless the whole state is valid."""
        if self._pass is not None:
            raise SessionStateError(f"load_state_dict cannot run inside a {self._pass.value} pass")
        loaded = SessionState.from_dict(
            state, self.config, self.tokens_per_frame, self.num_layers, self._head_shard_id()
        )
        self.reset()
        self.layers = loaded.layers
        self.chunk_index = loaded.chunk_index
        self.next_frame = loaded.next_frame
        self.position_base = loaded.position_base
        self._set_next_position()

    def _head_shard_id(self) -> tuple[int, int]:
        """``(rank, degree)`` of the heads this session holds (``(0, 1)``: every head)."""
        shard = self.head_shard
        return (0, 1) if shard is None else (shard.rank, shard.degree)

    # ------------------------------------------------------------------------------- validation
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

