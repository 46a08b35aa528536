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
from dataclasses import dataclass
from enum import Enum

import torch

from .attention import attention
from .cache import LayerCache
from .config import MemFlowConfig
from .context_parallel import HeadShard
from .introspection import ChunkMemory, MemoryTrace
from .memory import update_bank
from .positions import RopeTable
from .sparse import SparseKeySet, select_memory_frames, sparse_memory_attention


class PassKind(str, Enum):
    DENOISE = "denoise"
    CONTEXT = "context"
    RECACHE = "recache"


@dataclass(frozen=True)
class PassPlan:
    """What every layer's ``attend`` does in the running pass, fixed when the pass starts.

    Only values that stop changing once the cache is full are here (never an absolute frame),
    so the plans of two chunks in a full cache are equal, and so are the guards of a compiled
    model that reads them.

    Attributes:
        kind: the pass.
        cached: some frame is cached (every pass but those of the first chunk).
        own_in_slot: the pass's own K/V go to the caches' pass slots (unquantized, allocated),
            where a context pass's commit reads them; otherwise a context pass holds them
            until it ends.
        recache_frames: frames of a recache pass (0 for the other passes).
        protect_sink: a recache keeps the sink's keys.
    """

    kind: PassKind
    cached: bool
    own_in_slot: bool
    recache_frames: int = 0
    protect_sink: bool = False


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
        self.device = torch.device(device)
        self.head_shard = head_shard
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
        local = self.config.local_frames
        capacity = None
        if local is not None:
            capacity = (self.config.sma_top_k + local) * self.tokens_per_frame
        self._sparse_key_sets = [SparseKeySet(capacity) for _ in self.layers]
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
        # a context pass's own K/V, when they are not in the caches' pass slots
        self._pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers
        # SMA's activated frames per layer, for the trace
        self._activated: list[torch.Tensor | None] = [None] * self.num_layers

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
            text_keys = self._local_text_keys(text_keys)
        shift = self._rebase_shift()
        if self.config.nam and self.chunk_index >= 1:
            for layer, cache in enumerate(self.layers):
                # with bank_staging="interval" the previous chunk may have staged nothing
                if cache.has_staged_frame:
                    update_bank(cache, self.chunk_index, text_keys[layer], self.head_shard)
        if shift:
            for cache in self.layers:
                cache.rebase(shift, self.config.position_overflow, self.rope.rotate)
            self.position_base += shift
            self._next_position.sub_(shift)
            self._release_windows()
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
        stages = self.config.stages_bank_frame(self.next_frame)
        for cache, pending in zip(self.layers, self._pending, strict=True):
            keys, values = cache.held(frames) if pending is None else pending
            cache.append(keys, values, self.next_frame)
            if stages:
                cache.stage(keys[:, :t], values[:, :t], self.next_frame)
        self._release_windows()
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
                self._release_windows()
            self._pass = None
            self._reset_pass_scratch(None)
        self._chunk_passes += 1

    def _release_windows(self) -> None:
        """The caches' windows changed: SMA's key sets copy them again at their next pass."""
        for key_set in self._sparse_key_sets:
            key_set.release_window()

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
        attended = zip(self._pass_frames, self._attended, strict=True)
        frames = [n for n, done in attended if done]
        if kind is not PassKind.RECACHE and frames:
            expected = frames[0] if self._chunk_frames is None else self._chunk_frames
            wrong = [n for n in frames if n != expected]
            if wrong:
                raise ValueError(
                    f"every pass of a chunk must hold the same frames: this chunk has "
                    f"{expected}, got {wrong[0]}"
                )
            self._chunk_frames = expected
        if self.record_trace:
            for layer, activated in enumerate(self._activated):
                if activated is not None:
                    self._trace.record_activation(layer, kind.value, activated)

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
        self._check_pass_frames(plan, num_frames)
        self._attended[layer] = True
        self._pass_frames[layer] = num_frames

        if plan.recache_frames:
            output = self._attend_recache(layer, query, key, value, plan.protect_sink)
            cache.overwrite_newest(key, value, plan.protect_sink)
            return output
        if not plan.own_in_slot and plan.kind is PassKind.CONTEXT:
            self._pending[layer] = (key.detach(), value.detach())
        if not plan.cached:
            return attention(query, key, value, self.config.attention_backend)
        if self.config.sma:
            local_keys, local_values = cache.window_with(key, value)
            return self._attend_memory_and(
                layer, query, cache.memory(include_sink=True), local_keys, local_values,
                window_tokens=cache.window_count * self.tokens_per_frame,
            )
        keys, values = cache.context_with(key, value)
        return attention(query, keys, values, self.config.attention_backend)

    def _attend_recache(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        protect_sink: bool,
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
        if protect_sink:
            kept = key.shape[1] // t - self.config.local_frames  # the first frame kept
            return self._attend_memory_and(
                layer, query, cache.memory(include_sink=True),
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
        return self._attend_memory_and(layer, query, memory, key[:, sink:], value[:, sink:])

    def _attend_memory_and(
        self,
        layer: int,
        query: torch.Tensor,
        memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        local_keys: torch.Tensor,
        local_values: torch.Tensor,
        window_tokens: int = 0,
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
            self._activated[layer] = torch.gather(
                memory_frames[:, None, :].expand(-1, selected.shape[1], -1), 2, selected
            )
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
            window_tokens,
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

        Loading it into a session with the same config, layer count, ``tokens_per_frame`` and
        heads (under context parallelism, each rank its own) continues the video
        bit-identically. The memory trace is not part of the state.
        """
        self._require_between_chunks("state_dict")
        state = {
            "session.config_json": _encode(self.config.to_json_string()),
            "session.tokens_per_frame": torch.tensor(self.tokens_per_frame),
            "session.num_layers": torch.tensor(self.num_layers),
            "session.chunk_index": torch.tensor(self.chunk_index),
            "session.next_frame": torch.tensor(self.next_frame),
            "session.position_base": torch.tensor(self.position_base),
            "session.head_shard": torch.tensor(self._head_shard_id()),
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
        # states saved before context parallelism hold every head: rank 0 of 1
        saved_shard = tuple(state.get("session.head_shard", torch.tensor((0, 1))).tolist())
        if saved_shard != self._head_shard_id():
            raise ValueError(
                f"session state holds the heads of rank {saved_shard[0]} of {saved_shard[1]} "
                f"(context parallelism), this session those of rank "
                f"{self._head_shard_id()[0]} of {self._head_shard_id()[1]}: each rank loads its own"
            )
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
        self._set_next_position()

    def _head_shard_id(self) -> tuple[int, int]:
        """``(rank, degree)`` of the heads this session holds (``(0, 1)``: every head)."""
        shard = self.head_shard
        return (0, 1) if shard is None else (shard.rank, shard.degree)

    # ------------------------------------------------------------------------------- validation
    def _local_text_keys(self, text_keys: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        """The text keys checked, and narrowed to this rank's heads under context parallelism."""
        shard = self.head_shard
        if shard is None:
            self._check_text_keys(text_keys)
            return list(text_keys)
        self._check_text_keys(text_keys, shard.num_heads)
        return [shard.local(keys) for keys in text_keys]

    def _check_text_keys(
        self, text_keys: Sequence[torch.Tensor] | None, num_heads: int | None = None
    ) -> None:
        """Raise unless ``text_keys`` hold one ``[B, L_text, H, D]`` tensor per layer that fits
        the caches; ``num_heads``: every head's keys are expected (context parallelism)."""
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
                geometry.batch_size,
                heads,
                geometry.head_dim,
            ):
                raise ValueError(
                    f"text_keys[{layer}] has shape {tuple(keys.shape)}, expected [B="
                    f"{geometry.batch_size}, L_text, H={heads}, D={geometry.head_dim}]"
                )

    def _check_pass_frames(self, plan: PassPlan, num_frames: int) -> None:
        """A pass's frames, checked before anything is written; that every pass of a chunk
        holds the same frames is checked when the pass ends (``_end_pass``), before its commit."""
        if plan.recache_frames:
            if num_frames != plan.recache_frames:
                window = self._recache
                raise ValueError(
                    f"the recache pass must cover {plan.recache_frames} frames "
                    f"({window.start_frame}..{window.stop_frame - 1}), got {num_frames}"
                )
            return
        if not 1 <= num_frames <= self.config.frames_per_chunk:
            raise ValueError(
                f"a chunk pass must hold 1..frames_per_chunk={self.config.frames_per_chunk} "
                f"frames, got {num_frames}"
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
