"""The frame cache of one self-attention layer: sink | memory bank | local window
(architecture s.2).

Keys are stored after RoPE, rotated at their frame's position (architecture s.2b), values as
they are, both in diffusers' token layout ``[B, frames * T_f, H, D]`` and either in the attention
dtype or quantized (``MemFlowConfig.cache_dtype``, architecture s.2c). One preallocated
``FrameBuffer`` per tensor holds the three regions back to back:

    [ sink (S frames) | bank (M slots) | window (W frames, right-aligned, oldest first) ]

so that once every region is full the whole cached context is a single view of the buffer
(unquantized). Unquantized, the buffer also keeps a pass slot of one chunk after the window: a
pass over new frames writes its own K/V there (``context_with``, ``window_with``), so its whole
key set is one view too, with no per-pass concatenation. A separate one-frame staging slot holds
the bank's next candidate. Bookkeeping is host-side Python integers, except what differs per
batch element after NAM selection and therefore lives on the device: the bank's absolute frame
indices (``[B, M]``, -1 for an empty slot) and the sink's and bank's RoPE positions (``[B, S +
M]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MemFlowConfig
from .frame_buffer import CACHE_DTYPES, FrameBuffer
from .positions import RotateKeys, overflowed_positions


@dataclass(frozen=True)
class CacheGeometry:
    """Shape, dtype and device every tensor written to one layer cache must share."""

    batch_size: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> CacheGeometry:
        return cls(tensor.shape[0], tensor.shape[2], tensor.shape[3], tensor.dtype, tensor.device)


class LayerCache:
    """Bounded K/V storage of one attention layer for one video.

    Args:
        config: the memory layout (sink, bank and window sizes) and the cache dtype.
        tokens_per_frame: ``T_f``, tokens of one latent frame after patchification.
    """

    def __init__(self, config: MemFlowConfig, tokens_per_frame: int) -> None:
        if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int):
            raise TypeError(f"tokens_per_frame must be an int, got {tokens_per_frame!r}")
        if tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be >= 1, got {tokens_per_frame}")
        self.config = config
        self.tokens_per_frame = tokens_per_frame
        self.storage = CACHE_DTYPES[config.cache_dtype] if config.cache_dtype else None
        self.reset()

    def reset(self) -> None:
        """Drop every tensor (memory is freed) and forget every frame."""
        self.geometry: CacheGeometry | None = None
        self.keys: FrameBuffer | None = None
        self.values: FrameBuffer | None = None
        self.window_capacity = self.config.window_capacity or 0
        self.frames_written = 0
        self._recount()
        self.bank_filled = 0
        self.position_base = 0  # RoPE position of frame f (window, staged) is f - position_base
        self.bank_frame_index: torch.Tensor | None = None
        self.memory_position: torch.Tensor | None = None
        self.staged_keys: FrameBuffer | None = None
        self.staged_values: FrameBuffer | None = None
        self.staged_frame = -1

    # ------------------------------------------------------------------------------ frame counts
    @property
    def has_staged_frame(self) -> bool:
        """Whether a frame waits in the staging slot for the bank's next commit."""
        return self.staged_frame >= 0

    def _recount(self) -> None:
        """Update the frames each region holds after ``frames_written`` or the window changed.

        They are stored, not derived on every read, so that what a pass reads (region counts,
        slots) stops changing once the cache is full while ``frames_written`` keeps growing: a
        compiled model meets the same guards from chunk to chunk (architecture s.2d).
        """
        self.sink_count = min(self.config.sink_frames, self.frames_written)
        self.window_count = min(
            self.window_capacity, max(0, self.frames_written - self.config.sink_frames)
        )

    @property
    def window_frames(self) -> range:
        """Absolute indices of the frames the local window holds, oldest first."""
        return range(self.frames_written - self.window_count, self.frames_written)

    @property
    def nbytes(self) -> int:
        """Bytes of every cached frame this cache holds (codes and scales, staged included)."""
        buffers = (self.keys, self.values, self.staged_keys, self.staged_values)
        return sum(buffer.nbytes for buffer in buffers if buffer is not None)

    @property
    def pass_nbytes(self) -> int:
        """Bytes of the pass slot (one chunk's K/V, unquantized caches only)."""
        buffers = (self.keys, self.values)
        return sum(buffer.pass_nbytes for buffer in buffers if buffer is not None)

    @property
    def pass_frames(self) -> int:
        """Frames of the pass slot: one chunk when unquantized, none when quantized."""
        return self.config.frames_per_chunk if self.storage is None else 0

    def _region_start(self, region: str) -> int:
        """First frame slot of a region in the buffer."""
        sink, bank = self.config.sink_frames, self.config.bank_frames
        return {"sink": 0, "bank": sink, "window": sink + bank}[region]

    def _window_slot(self, frame: int) -> int:
        """Buffer slot of absolute frame ``frame``, which must be in the window."""
        return self._region_start("window") + self.window_capacity - (self.frames_written - frame)

    def _window_first_slot(self) -> int:
        """Buffer slot of the window's oldest frame (right-aligned: the window ends the buffer)."""
        return self._region_start("window") + self.window_capacity - self.window_count

    # ------------------------------------------------------------------------------------- reads
    def _read(self, pieces: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of buffer slots given as ``(first_slot, count)`` pieces, concatenated in order.

        Adjacent pieces merge, so a context that is contiguous in the buffer comes back as a view
        (unquantized).
        """
        merged = _merged(pieces)
        if not merged:
            return self.keys.read(0, 0), self.values.read(0, 0)
        keys = [self.keys.read(s, n) for s, n in merged]
        values = [self.values.read(s, n) for s, n in merged]
        if len(keys) == 1:
            return keys[0], values[0]
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def _read_with(
        self, pieces: list[tuple[int, int]], keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_read(pieces)`` followed by a pass's own ``keys`` / ``values``.

        Unquantized, the own K/V are first written into the pass slot (what a context pass
        commits, ``held``); when the pieces merge into one that ends at the window's end and no
        gradient must reach the own K/V, the result is then one view of the buffer. Otherwise
        the pieces and the own K/V are concatenated.
        """
        if self.pass_frames:
            self.keys.write_pass(keys)
            self.values.write_pass(values)
        merged = _merged(pieces)
        gradient = torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad)
        if self.pass_frames and not gradient and len(merged) == 1:
            (first, count), = merged
            if first + count == self.keys.num_frames:
                count += keys.shape[1] // self.tokens_per_frame
                return self.keys.read_into_pass(first, count), self.values.read_into_pass(
                    first, count
                )
        cached_keys, cached_values = self._read(pieces)
        return torch.cat([cached_keys, keys], dim=1), torch.cat([cached_values, values], dim=1)

    def held(self, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The own K/V the last ``context_with`` / ``window_with`` wrote into the pass slot:
        views ``[B, num_frames * T_f, H, D]`` (unquantized caches only)."""
        self._require_allocated()
        if not self.pass_frames:
            raise RuntimeError("a quantized cache has no pass slot to hold a pass's K/V")
        first = self.keys.num_frames
        return self.keys.read_into_pass(first, num_frames), self.values.read_into_pass(
            first, num_frames
        )

    def memory(self, include_sink: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sink frames (unless excluded) then filled bank slots: SMA's candidates.

        Returns:
            keys, values ``[B, C * T_f, H, D]`` and absolute frame indices ``[B, C]`` (int64).
        """
        self._require_allocated()
        sink_count = self.sink_count if include_sink else 0
        keys, values = self._read([(0, sink_count), (self._region_start("bank"), self.bank_filled)])
        sink_index = torch.arange(sink_count, device=self.geometry.device)
        frame_index = torch.cat(
            [
                sink_index.expand(self.geometry.batch_size, -1),
                self.bank_frame_index[:, : self.bank_filled],
            ],
            dim=1,
        )
        return keys, values, frame_index

    def window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The local window's stored frames, oldest first: ``[B, window_count * T_f, H, D]``."""
        self._require_allocated()
        return self._read([(self._window_first_slot(), self.window_count)])

    def _context_pieces(self) -> list[tuple[int, int]]:
        return [
            (0, self.sink_count),
            (self._region_start("bank"), self.bank_filled),
            (self._window_first_slot(), self.window_count),
        ]

    def context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything a new chunk attends to besides itself: ``[sink | bank | window]`` K/V."""
        self._require_allocated()
        return self._read(self._context_pieces())

    def context_with(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key set of a pass over new frames: ``[sink | bank | window | own]`` K/V,
        ``[B, (context + n) * T_f, H, D]``, for the pass's own ``keys`` / ``values`` ``[B, n *
        T_f, H, D]``. Once sink and bank are full (and unquantized) it is one view of the buffer
        with the own K/V in the pass slot: valid until the next ``*_with`` read."""
        self._require_allocated()
        return self._read_with(self._context_pieces(), keys, values)

    def window_with(
        self, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[window | own]`` K/V, as ``context_with`` (one view whenever unquantized: the
        window is right-aligned against the pass slot)."""
        self._require_allocated()
        return self._read_with([(self._window_first_slot(), self.window_count)], keys, values)

    def bank_by_frame(self) -> torch.Tensor:
        """Keys of the filled bank slots per frame: ``[B, bank_filled, T_f, H, D]``."""
        self._require_allocated()
        keys, _ = self._read([(self._region_start("bank"), self.bank_filled)])
        return keys.unflatten(1, (self.bank_filled, self.tokens_per_frame))

    def newest_chunk_keys(self) -> torch.Tensor:
        """Keys of the newest chunk's frames (the staged frame onwards) that the window holds,
        ``[B, n, T_f, H, D]``; the staged frame's alone when the window holds none of them."""
        self._require_staged()
        first = max(self.staged_frame, self.frames_written - self.window_count)
        count = self.frames_written - first
        if count > 0:
            keys, _ = self._read([(self._window_slot(first), count)])
        else:
            keys = self.staged_keys.read(0, 1)
        return keys.unflatten(1, (-1, self.tokens_per_frame))

    # ------------------------------------------------------------------------------------ writes
    def append(self, keys: torch.Tensor, values: torch.Tensor, start_frame: int) -> None:
        """Commit a chunk's frames ``start_frame ..``: the first frames fill the sink, the rest
        enter the window, evicting its oldest frames first in, first out.

        Args:
            keys, values: ``[B, n * T_f, H, D]``; stored without autograd history.
            start_frame: must equal ``frames_written`` (chunks arrive in order).
        """
        num_frames = self.check_frames(keys, values, "keys")
        if start_frame != self.frames_written:
            raise ValueError(
                f"start_frame must be {self.frames_written} (the next uncommitted frame), "
                f"got {start_frame}"
            )
        self._allocate_for(keys)
        keys, values = keys.detach(), values.detach()
        t = self.tokens_per_frame
        to_sink = max(0, min(num_frames, self.config.sink_frames - start_frame))
        if to_sink:
            self.keys.write(start_frame, keys[:, : to_sink * t])
            self.values.write(start_frame, values[:, : to_sink * t])
            self.memory_position[:, start_frame : start_frame + to_sink] = torch.arange(
                start_frame - self.position_base,
                start_frame + to_sink - self.position_base,
                device=self.geometry.device,
            )
        to_window = num_frames - to_sink
        if to_window:
            if self.config.window_capacity is None:
                self._grow_window(self.window_count + to_window)
            self._shift_into_window(keys[:, to_sink * t :], values[:, to_sink * t :], to_window)
        self.frames_written += num_frames
        self._recount()

    def _shift_into_window(self, keys: torch.Tensor, values: torch.Tensor, count: int) -> None:
        """Move the window's kept frames left by ``count`` slots (their stored codes as they
        are), then write the ``count`` new frames at its end."""
        capacity = self.window_capacity
        if capacity == 0:
            return
        t = self.tokens_per_frame
        start = self._region_start("window")
        keep = min(self.window_count, capacity - min(count, capacity))
        if keep:
            first_kept = start + capacity - keep
            for buffer in (self.keys, self.values):
                # raw() copies, so the overlapping move reads nothing it has overwritten.
                buffer.write_raw(first_kept - count, buffer.raw(first_kept, keep))
        written = min(count, capacity)
        self.keys.write(start + capacity - written, keys[:, -written * t :])
        self.values.write(start + capacity - written, values[:, -written * t :])

    def stage(self, keys: torch.Tensor, values: torch.Tensor, frame: int) -> None:
        """Hold one frame (``[B, T_f, H, D]``) as the bank's next candidate, replacing the last."""
        if self.check_frames(keys, values, "keys") != 1:
            raise ValueError(
                f"stage takes exactly one frame ({self.tokens_per_frame} tokens), "
                f"got {keys.shape[1]} tokens"
            )
        self._allocate_for(keys)
        self.staged_keys = FrameBuffer(keys, 1, self.tokens_per_frame, self.storage)
        self.staged_values = FrameBuffer(values, 1, self.tokens_per_frame, self.storage)
        self.staged_keys.write(0, keys.detach())
        self.staged_values.write(0, values.detach())
        self.staged_frame = frame

    def commit_staged_to_slot(self, slot: int) -> None:
        """Write the staged frame into bank slot ``slot`` (the bank is still filling)."""
        if not 0 <= slot < self.config.bank_frames:
            raise ValueError(f"slot must be in [0, {self.config.bank_frames}), got {slot}")
        self._require_staged()
        first = self._region_start("bank") + slot
        self.keys.write_raw(first, self.staged_keys.raw(0, 1))
        self.values.write_raw(first, self.staged_values.raw(0, 1))
        self.bank_frame_index[:, slot] = self.staged_frame
        self.memory_position[:, first] = self.staged_frame - self.position_base
        self.bank_filled = max(self.bank_filled, slot + 1)
        self._clear_staged()

    def commit_staged_after(self, keep: torch.Tensor) -> None:
        """Rebuild a full bank as ``[kept slots ; staged frame]``.

        Args:
            keep: ``[B, bank_frames - 1]`` int64 slot indices to keep per batch element, in the
                order they should occupy the bank.
        """
        self._require_staged()
        bank_frames = self.config.bank_frames
        if self.bank_filled != bank_frames:
            raise RuntimeError(
                f"selection needs a full bank ({bank_frames} slots), {self.bank_filled} are filled"
            )
        expected = (self.geometry.batch_size, bank_frames - 1)
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep must have shape {expected}, got {tuple(keep.shape)}")
        first, last = self._region_start("bank"), self._region_start("bank") + bank_frames - 1
        for buffer, staged in ((self.keys, self.staged_keys), (self.values, self.staged_values)):
            buffer.gather_frames(first, bank_frames, keep)
            buffer.write_raw(last, staged.raw(0, 1))
        for index, newest in (
            (self.bank_frame_index, self.staged_frame),
            (self.memory_position[:, first:], self.staged_frame - self.position_base),
        ):
            index[:, : bank_frames - 1] = torch.gather(index, 1, keep)
            index[:, bank_frames - 1] = newest
        self._clear_staged()

    def overwrite(
        self, keys: torch.Tensor, values: torch.Tensor, start_frame: int, protect_sink: bool
    ) -> None:
        """Replace the cached K/V of already committed frames (the recache after a prompt switch).

        Frames of the pass that the cache no longer holds, or that sit in a protected sink, are
        discarded. The bank is never touched.

        Args:
            keys, values: ``[B, n * T_f, H, D]`` for frames ``start_frame .. frames_written - 1``.
            start_frame: first frame of the pass; the pass must end at the newest frame.
            protect_sink: keep the sink's keys as they are.
        """
        num_frames = self.check_frames(keys, values, "keys")
        self._require_allocated()
        if start_frame < 0 or start_frame + num_frames != self.frames_written:
            raise ValueError(
                f"a recache must cover frames [start_frame, {self.frames_written}), got "
                f"start_frame={start_frame} with {num_frames} frames"
            )
        if start_frame > self.window_frames.start:
            raise ValueError(
                f"a recache must cover the whole window (from frame {self.window_frames.start}), "
                f"got start_frame={start_frame}"
            )
        if not protect_sink and start_frame != 0:
            raise ValueError(
                "a recache that re-encodes the sink covers every frame from 0, got "
                f"start_frame={start_frame}"
            )
        self.overwrite_newest(keys, values, protect_sink)

    def overwrite_newest(
        self, keys: torch.Tensor, values: torch.Tensor, protect_sink: bool
    ) -> None:
        """``overwrite`` for a pass over the newest frames, as the session's recache runs it
        (the session has checked its frames): the sink takes the pass's first frames unless
        protected, the window its last. What it reads stops changing once the cache is full,
        as ``_recount`` says."""
        keys, values = keys.detach(), values.detach()
        t = self.tokens_per_frame
        if not protect_sink and self.sink_count:
            self.keys.write(0, keys[:, : self.sink_count * t])
            self.values.write(0, values[:, : self.sink_count * t])
        if self.window_count:
            first, window = self._window_first_slot(), self.window_count * t
            self.keys.write(first, keys[:, -window:])
            self.values.write(first, values[:, -window:])

    # --------------------------------------------------------------------------------- positions
    def rebase(self, shift: int, policy: str, rotate: RotateKeys) -> None:
        """Move every cached frame's RoPE position ``shift`` frames earlier (architecture s.2b).

        Window and staged frames move by exactly ``shift``; sink and bank frames whose position
        would fall below 0 take the one ``policy`` gives (``positions.overflowed_positions``).
        Cached keys are rotated by each frame's change of position with ``rotate``.
        """
        if shift < 1:
            raise ValueError(f"shift must be >= 1, got {shift}")
        if self.keys is not None:
            batch, device = self.geometry.batch_size, self.geometry.device
            window_first = self.frames_written - self.window_count
            if self.window_count:
                moves = torch.full((batch, self.window_count), -shift, device=device)
                self.keys.rotate_frames(self._window_slot(window_first), moves, rotate)
            if self.staged_keys is not None:
                self.staged_keys.rotate_frames(0, torch.full((batch, 1), -shift, device=device),
                                               rotate)
            window_position = window_first - self.position_base - shift
            for first, count in ((0, self.sink_count), (self._region_start("bank"),
                                                         self.bank_filled)):
                if not count:
                    continue
                old = self.memory_position[:, first : first + count]
                new = overflowed_positions(old, shift, window_position, policy)
                self.keys.rotate_frames(first, new - old, rotate)
                old.copy_(new)
        self.position_base += shift

    # ----------------------------------------------------------------------------- save/restore
    _COUNTERS = ("frames_written", "bank_filled", "staged_frame", "window_capacity",
                 "position_base")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue bit-identically, as tensors (safetensors-compatible)."""
        state = {
            name: torch.tensor(getattr(self, name), dtype=torch.long) for name in self._COUNTERS
        }
        if self.keys is not None:
            state["dtype"] = _encode(str(self.geometry.dtype).removeprefix("torch."))
            state.update(self.keys.state("keys"))
            state.update(self.values.state("values"))
            state["bank_frame_index"] = self.bank_frame_index.clone()
            state["memory_position"] = self.memory_position.clone()
        if self.staged_keys is not None:
            state.update(self.staged_keys.state("staged_keys"))
            state.update(self.staged_values.state("staged_values"))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a ``state_dict()``; validates it fully before changing anything."""
        missing = [name for name in self._COUNTERS if name not in state]
        if missing:
            raise KeyError(f"layer cache state is missing {missing}")
        counters = {name: int(state[name]) for name in self._COUNTERS}
        buffers: dict[str, FrameBuffer] = {}
        if "keys" in state:
            dtype = getattr(torch, _decode(state["dtype"]))
            for name in ("keys", "values", "staged_keys", "staged_values"):
                if name in state:
                    pass_frames = self.pass_frames if name in ("keys", "values") else 0
                    buffers[name] = FrameBuffer.from_state(
                        state, name, self.tokens_per_frame, dtype, self.storage, pass_frames
                    )
            keys = buffers["keys"].codes
            frames = self.config.sink_frames + self.config.bank_frames + counters["window_capacity"]
            if keys.ndim != 4 or keys.shape[1] != frames * self.tokens_per_frame:
                raise ValueError(
                    f"layer cache state holds keys of shape {tuple(keys.shape)}, expected "
                    f"[B, {frames * self.tokens_per_frame}, H, D] for this config and "
                    f"tokens_per_frame={self.tokens_per_frame}"
                )
            if buffers["values"].codes.shape != keys.shape:
                raise ValueError("layer cache state has values and keys of different shapes")
            for name, slots in (("bank_frame_index", self.config.bank_frames),
                                ("memory_position", self.config.sink_frames
                                 + self.config.bank_frames)):
                if tuple(state[name].shape) != (keys.shape[0], slots):
                    raise ValueError(
                        f"layer cache state has {name} of shape {tuple(state[name].shape)}, "
                        f"expected {(keys.shape[0], slots)}"
                    )
        elif counters["frames_written"]:
            raise ValueError("layer cache state counts written frames but holds no keys/values")
        self.reset()
        for name, value in counters.items():
            setattr(self, name, value)
        self._recount()
        if buffers:
            self.keys, self.values = buffers["keys"], buffers["values"]
            self.staged_keys = buffers.get("staged_keys")
            self.staged_values = buffers.get("staged_values")
            keys = self.keys.codes
            self.geometry = CacheGeometry(
                keys.shape[0], keys.shape[2], keys.shape[3], self.keys.dtype, keys.device
            )
            self.bank_frame_index = state["bank_frame_index"].clone()
            self.memory_position = state["memory_position"].clone()

    # -------------------------------------------------------------------------------- validation
    def check_frames(self, keys: torch.Tensor, values: torch.Tensor, name: str) -> int:
        """Validate a ``[B, n * T_f, H, D]`` key/value pair against this cache; return ``n``."""
        if keys.ndim != 4:
            raise ValueError(
                f"{name} must be [batch, frames * tokens_per_frame, heads, head_dim], "
                f"got shape {tuple(keys.shape)}"
            )
        if values.shape != keys.shape:
            raise ValueError(
                f"values must have the keys' shape {tuple(keys.shape)}, got {tuple(values.shape)}"
            )
        if keys.shape[1] % self.tokens_per_frame:
            raise ValueError(
                f"{name} has {keys.shape[1]} tokens, not a whole number of frames of "
                f"tokens_per_frame={self.tokens_per_frame}"
            )
        if self.geometry is not None and CacheGeometry.of(keys) != self.geometry:
            raise ValueError(
                f"{name} do not match this cache: expected {self.geometry}, "
                f"got {CacheGeometry.of(keys)}"
            )
        return keys.shape[1] // self.tokens_per_frame

    def _allocate_for(self, like: torch.Tensor) -> None:
        if self.keys is not None:
            return
        if self.storage is not None and not like.is_floating_point():
            raise TypeError(f"a quantized cache stores floating-point K/V, got {like.dtype}")
        self.geometry = CacheGeometry.of(like)
        self._allocate_buffers(self.window_capacity)
        memory_slots = self.config.sink_frames + self.config.bank_frames
        batch, device = self.geometry.batch_size, self.geometry.device
        self.bank_frame_index = torch.full(
            (batch, self.config.bank_frames), -1, dtype=torch.long, device=device
        )
        self.memory_position = torch.full((batch, memory_slots), -1, dtype=torch.long,
                                          device=device)

    def _allocate_buffers(self, window_capacity: int) -> None:
        g = self.geometry
        frames = self.config.sink_frames + self.config.bank_frames + window_capacity
        like = torch.empty((g.batch_size, 0, g.num_heads, g.head_dim), dtype=g.dtype,
                           device=g.device)
        self.keys, self.values = (
            FrameBuffer(like, frames, self.tokens_per_frame, self.storage, self.pass_frames)
            for _ in range(2)
        )
        self.window_capacity = window_capacity

    def _grow_window(self, needed: int) -> None:
        """Unbounded windows only: double the window region until ``needed`` frames fit."""
        if needed <= self.window_capacity:
            return
        old_keys, old_values, old_capacity = self.keys, self.values, self.window_capacity
        self._allocate_buffers(max(needed, 2 * old_capacity))
        head = self._region_start("window")
        filled = self.window_count
        for new, old in ((self.keys, old_keys), (self.values, old_values)):
            new.write_raw(0, old.raw(0, head))
            if filled:
                new.write_raw(new.num_frames - filled, old.raw(head + old_capacity - filled,
                                                               filled))

    def _require_allocated(self) -> None:
        if self.keys is None:
            raise RuntimeError("this layer cache holds no frames yet (nothing has been committed)")

    def _require_staged(self) -> None:
        if self.staged_frame < 0:
            raise RuntimeError("no staged frame: a context pass must stage one before a commit")

    def _clear_staged(self) -> None:
        self.staged_keys = self.staged_values = None
        self.staged_frame = -1


def _merged(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(first_slot, count)`` pieces without the empty ones, adjacent ones merged."""
    merged: list[tuple[int, int]] = []
    for start, count in pieces:
        if count == 0:
            continue
        if merged and sum(merged[-1]) == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((start, count))
    return merged


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode(tensor: torch.Tensor) -> str:
    return bytes(tensor.tolist()).decode("utf-8")
