"""Frame-granular K/V storage, in the attention dtype or quantized (architecture s.2c).

A ``FrameBuffer`` holds ``F`` frames of ``T_f`` tokens in diffusers' layout ``[B, F * T_f, H,
D]``. Unquantized, reads are views of the buffer, and a buffer may keep a pass slot after its
last frame: ``write_pass`` puts a pass's own tokens there, so that the buffer's last frames and
the pass's own are one view (``read_into_pass``: no per-pass concatenation of cached K/V). Quantized
(``"float8_e4m3fn"`` or ``"int8"``), each frame of each head is stored with one float32 scale
(its largest magnitude over the frame's tokens and the head's channels, mapped to the format's
largest value) and dequantized on read into the attention dtype; moving frames inside a cache
moves the stored codes and scales as they are, so a frame is quantized once, when it is written.
"""

from __future__ import annotations

import torch

from .positions import RotateKeys

#: ``MemFlowConfig.cache_dtype`` values and the storage dtype of each.
CACHE_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int8": torch.int8,
}
#: The largest code of each quantized format: a frame's largest magnitude is stored as it.
_LARGEST_CODE = {torch.float8_e4m3fn: torch.finfo(torch.float8_e4m3fn).max, torch.int8: 127.0}


def quantize_frames(
    tokens: torch.Tensor, tokens_per_frame: int, storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[B, n * T_f, H, D]`` with one scale per frame and head.

    Returns:
        codes ``[B, n * T_f, H, D]`` in ``storage`` and scales ``[B, n, H]`` (float32); a frame
        and head of zeros gets scale 1.
    """
    frames = tokens.detach().unflatten(1, (-1, tokens_per_frame)).float()  # [B, n, T, H, D]
    largest = frames.abs().amax(dim=(2, 4))  # [B, n, H]
    scale = torch.where(largest > 0, largest / _LARGEST_CODE[storage], torch.ones_like(largest))
    scaled = frames / scale[:, :, None, :, None]
    if storage is torch.int8:
        scaled = scaled.round_().clamp_(-127.0, 127.0)
    return scaled.to(storage).flatten(1, 2), scale


def dequantize_frames(
    codes: torch.Tensor, scale: torch.Tensor, tokens_per_frame: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of ``quantize_frames``: ``[B, n * T_f, H, D]`` codes and ``[B, n, H]`` scales ->
    ``[B, n * T_f, H, D]`` in ``dtype``."""
    frames = codes.unflatten(1, (-1, tokens_per_frame)).float() * scale[:, :, None, :, None]
    return frames.to(dtype).flatten(1, 2)


class FrameBuffer:
    """``num_frames`` frame slots of one tensor (keys or values) of one layer cache.

    Args:
        like: a ``[B, *, H, D]`` tensor whose batch, heads, head_dim, dtype (the attention dtype)
            and device the stored frames have.
        num_frames: slots.
        tokens_per_frame: ``T_f``.
        storage: ``None`` (stored in ``like``'s dtype) or a ``CACHE_DTYPES`` value.
        pass_frames: frames of the pass slot after the last frame (unquantized only): scratch
            for ``write_pass``, never saved.
    """

    def __init__(
        self,
        like: torch.Tensor,
        num_frames: int,
        tokens_per_frame: int,
        storage: torch.dtype | None = None,
        pass_frames: int = 0,
    ) -> None:
        batch, _, heads, head_dim = like.shape
        self.dtype = like.dtype
        self.tokens_per_frame = tokens_per_frame
        self.storage = storage
        if pass_frames and storage is not None:
            raise ValueError("a quantized buffer has no pass slot (the pass's own K/V are exact)")
        shape = (batch, (num_frames + pass_frames) * tokens_per_frame, heads, head_dim)
        self._with_pass = torch.zeros(shape, dtype=storage or like.dtype, device=like.device)
        self.codes = self._with_pass[:, : num_frames * tokens_per_frame]
        self.scale = (
            torch.ones((batch, num_frames, heads), dtype=torch.float32, device=like.device)
            if storage is not None
            else None
        )

    @property
    def pass_frames(self) -> int:
        return self._with_pass.shape[1] // self.tokens_per_frame - self.num_frames

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1] // self.tokens_per_frame

    @property
    def nbytes(self) -> int:
        """Bytes of the stored frames (codes and scales), the pass slot not included."""
        tensors = [self.codes] if self.scale is None else [self.codes, self.scale]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def pass_nbytes(self) -> int:
        """Bytes of the pass slot."""
        return (self._with_pass.numel() - self.codes.numel()) * self._with_pass.element_size()

    def _tokens(self, first: int, count: int) -> slice:
        return slice(first * self.tokens_per_frame, (first + count) * self.tokens_per_frame)

    # ------------------------------------------------------------------------------ frame access
    def read(self, first: int, count: int) -> torch.Tensor:
        """Frames ``first .. first + count - 1`` in the attention dtype: ``[B, count * T_f, H,
        D]`` (a view of the buffer when unquantized)."""
        codes = self.codes[:, self._tokens(first, count)]
        if self.scale is None:
            return codes
        return dequantize_frames(
            codes, self.scale[:, first : first + count], self.tokens_per_frame, self.dtype
        )

    def write_pass(self, tokens: torch.Tensor) -> None:
        """Store a pass's own ``[B, n * T_f, H, D]`` (attention dtype, ``n`` up to the pass
        slot) in the pass slot, without autograd history: scratch, valid until the next pass."""
        n = tokens.shape[1] // self.tokens_per_frame
        if not n <= self.pass_frames:
            raise ValueError(f"a pass slot of {self.pass_frames} frames cannot hold {n}")
        self._with_pass[:, self._tokens(self.num_frames, n)] = tokens.detach()

    def read_into_pass(self, first: int, count: int) -> torch.Tensor:
        """Frames ``first .. first + count - 1`` where the range may run on into the pass slot:
        one view of the buffer (unquantized only)."""
        if self.scale is not None:
            raise ValueError("a quantized buffer has no pass slot")
        return self._with_pass[:, self._tokens(first, count)]

    def write(self, first: int, tokens: torch.Tensor) -> None:
        """Store ``[B, n * T_f, H, D]`` (attention dtype) into frames ``first .. first + n - 1``."""
        span = self._tokens(first, tokens.shape[1] // self.tokens_per_frame)
        if self.scale is None:
            self.codes[:, span] = tokens
            return
        codes, scale = quantize_frames(tokens, self.tokens_per_frame, self.storage)
        self.codes[:, span] = codes
        self.scale[:, first : first + scale.shape[1]] = scale

    def raw(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored codes ``[B, count * T_f, H, D]`` and scales ``[B, count, H]`` (``None``
        unquantized) of frames ``first ..``, as copies."""
        scale = None if self.scale is None else self.scale[:, first : first + count].clone()
        return self.codes[:, self._tokens(first, count)].clone(), scale

    def write_raw(self, first: int, raw: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """Store codes and scales from ``raw`` (another buffer's, same format) as they are."""
        codes, scale = raw
        self.codes[:, self._tokens(first, codes.shape[1] // self.tokens_per_frame)] = codes
        if self.scale is not None:
            self.scale[:, first : first + scale.shape[1]] = scale

    def gather_frames(self, first: int, count: int, index: torch.Tensor) -> None:
        """Reorder frames ``first .. first + count - 1`` per batch element: slot ``first + i``
        takes frame ``first + index[b, i]`` (``index``: ``[B, m]`` int64, ``m <= count``; slots
        past ``m`` keep their frames)."""
        t = self.tokens_per_frame
        frames = _bits(self.codes[:, self._tokens(first, count)]).unflatten(1, (count, t))
        picked = torch.gather(frames, 1, index[:, :, None, None, None].expand(
            -1, -1, *frames.shape[2:]
        ))
        frames[:, : index.shape[1]] = picked
        if self.scale is not None:
            scales = self.scale[:, first : first + count]
            scales[:, : index.shape[1]] = torch.gather(
                scales, 1, index[:, :, None].expand(-1, -1, scales.shape[2])
            )

    def rotate_frames(self, first: int, shift: torch.Tensor, rotate: RotateKeys) -> None:
        """Re-rotate stored keys: frame ``first + i`` of batch element ``b`` moves
        ``shift[b, i]`` RoPE positions (``shift``: ``[B, n]`` int64). Frames that do not move keep
        their stored codes exactly (a quantized frame is not quantized again)."""
        count = shift.shape[1]
        span = self._tokens(first, count)
        rotated = rotate(self.read(first, count), shift)
        moved = (shift != 0)[:, :, None]  # [B, n, 1]
        if self.scale is None:
            codes = rotated
        else:
            codes, scale = quantize_frames(rotated, self.tokens_per_frame, self.storage)
            scales = self.scale[:, first : first + count]
            scales.copy_(torch.where(moved, scale, scales))
        stored = _bits(self.codes[:, span]).unflatten(1, (count, self.tokens_per_frame))
        codes = _bits(codes).unflatten(1, (count, self.tokens_per_frame))
        stored.copy_(torch.where(moved[..., None, None], codes, stored))

    # ----------------------------------------------------------------------------- save/restore
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {prefix: self.codes.clone()}
        if self.scale is not None:
            state[f"{prefix}_scale"] = self.scale.clone()
        return state

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        prefix: str,
        tokens_per_frame: int,
        dtype: torch.dtype,
        storage: torch.dtype | None,
        pass_frames: int = 0,
    ) -> FrameBuffer:
        """A buffer holding a ``state(prefix)`` (and an empty pass slot of ``pass_frames``);
        validates the format against ``storage``."""
        codes = state[prefix]
        expected = storage or dtype
        if codes.dtype != expected:
            raise ValueError(f"{prefix} are stored as {codes.dtype}, this cache stores {expected}")
        scale = state.get(f"{prefix}_scale")
        if (scale is None) != (storage is None):
            raise ValueError(
                f"{prefix}_scale must be present exactly when the cache is quantized "
                f"(cache storage {storage})"
            )
        frames = codes.shape[1] // tokens_per_frame
        if scale is not None and tuple(scale.shape) != (codes.shape[0], frames, codes.shape[2]):
            raise ValueError(
                f"{prefix}_scale has shape {tuple(scale.shape)}, expected "
                f"{(codes.shape[0], frames, codes.shape[2])}"
            )
        buffer = cls(codes[:, :0], frames, tokens_per_frame, storage, pass_frames)
        buffer.dtype = dtype
        buffer.codes.copy_(codes)
        buffer.scale = None if scale is None else scale.clone()
        return buffer


def _bits(codes: torch.Tensor) -> torch.Tensor:
    """float8 codes as their bytes (``gather`` and ``where`` have no float8 kernels); other
    dtypes as they are. A view: writes go to ``codes``."""
    if codes.dtype.itemsize == 1 and codes.is_floating_point():
        return codes.view(torch.uint8)
    return codes
