"""MemFlowConfig: the sizes and switches of the streaming memory, with validation and JSON I/O."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from .attention import ATTENTION_BACKENDS
from .frame_buffer import CACHE_DTYPES
from .policies import ACTIVATION_POLICIES, BANK_POLICIES, registered_policy
from .positions import POSITION_OVERFLOWS
from .version import __version__

#: The key that stamps a saved config with the library version that wrote it.
VERSION_KEY = "memflow_adapter_version"
#: The most latent frames one size may count: 16 times Wan's 1024-frame position table, far past
#: any model's, and small enough that a typo (``sink_frames=10**12``) fails here, not in the
#: allocator.
MAX_FRAMES = 1 << 14
#: Runtime choices: not part of a config's identity (equality, sessions, adapters) nor saved.
RUNTIME_FIELDS = ("attention_backend",)

#: ``MemFlowConfig.bank_staging`` values.
BANK_STAGINGS = ("every_chunk", "interval")


@dataclass(frozen=True)
class MemFlowConfig:
    """How one streaming video's KV cache is laid out and refreshed (architecture s.2-4).

    All sizes count latent frames. A chunk's queries attend, in one softmax, to
    ``[sink | memory bank | local window]`` where the local window (``local_frames``) includes the
    chunk's own frames; the cache proper therefore stores ``sink_frames + bank_frames +
    (local_frames - frames_per_chunk)`` frames per layer, plus one staging frame for the bank.

    Args:
        sink_frames: the first frames ever written, never evicted (reference: 3).
        bank_frames: memory-bank slots refreshed by NAM; counts the newest chunk's first frame
            (reference: 3). Must be 0 when ``nam`` is off.
        local_frames: the local window including the current chunk (reference: 9, i.e. the
            published ``local_attn_size=12`` minus the 3 sink frames). ``None`` means unbounded:
            nothing is ever evicted (exactness tests, short videos).
        frames_per_chunk: latent frames generated per chunk (reference: 3).
        record_interval: how many chunks share one bank slot while the bank fills
            (architecture s.3).
        bank_staging: which chunks offer their first frame to the bank. ``"every_chunk"`` (the
            causal pipeline's, architecture s.3): every chunk stages it, and while the bank fills
            ``record_interval`` consecutive commits share a slot (the bank fills with latent
            frames 6, 15, 24 in the reference). ``"interval"`` (the published interactive
            pipeline's): only chunks whose first frame is a multiple of ``record_interval *
            frames_per_chunk`` stage it, each into the next free slot (frames 0, 9, 18);
            once the bank is full both select with NAM.
        nam: keep a memory bank, refreshed before each chunk by ``bank_policy`` (Narrative
            Adaptive Memory in the reference); off means no bank at all (the LongLive behaviour).
        sma: Sparse Memory Activation: attend only to the ``sma_top_k`` sink/bank frames per
            head that ``activation_policy`` scores highest; off, every one is attended (dense).
        sma_top_k: how many sink/bank frames SMA keeps per batch element and head.
        cache_dtype: how cached keys and values are stored. ``None`` (reference): in the
            attention dtype, exactly as computed. ``"float8_e4m3fn"`` or ``"int8"``: quantized
            with one float32 scale per frame and head, dequantized on read (architecture s.2c);
            attention, NAM and SMA all read the same dequantized keys.
        position_overflow: where sink and bank frames go once a stream is longer than the
            model's RoPE table and their true offset no longer fits (architecture s.2b):
            ``"before_window"`` (just before the oldest frame that keeps its offset) or
            ``"clamp"`` (the oldest position). No effect while the video fits in the table.
        bank_policy: which frames the bank keeps, by a name registered in
            ``memflow_adapter.policies.BANK_POLICIES``: ``"nam"`` (the reference: relevance to the
            coming prompt), ``"nam_no_sink"`` (NAM, never a frame the sink holds), ``"recency"``
            (the newest: an extended window), ``"uniform"`` (evenly spaced over the video) or
            ``"visual"`` (relevance to the newest chunk, without text). Needs ``nam=True``.
        activation_policy: how SMA scores the memory frames, a name registered in
            ``memflow_adapter.policies.ACTIVATION_POLICIES`` (``"sma"``: mean query x mean key,
            the reference). Needs ``sma=True``.
        attention_backend: one of ``ATTENTION_BACKENDS`` (``"sdpa"``, ``"math"``, ``"flex"``,
            ``"xformers"``). A runtime choice: the same memory computed with another kernel is
            the same config (equality, sessions, adapters), and it is not saved.
    """

    sink_frames: int = 3
    bank_frames: int = 3
    local_frames: int | None = 9
    frames_per_chunk: int = 3
    record_interval: int = 3
    bank_staging: str = "every_chunk"
    nam: bool = True
    sma: bool = False
    sma_top_k: int = 3
    cache_dtype: str | None = None
    position_overflow: str = "before_window"
    bank_policy: str = "nam"
    activation_policy: str = "sma"
    attention_backend: str = field(default="sdpa", compare=False)

    def __post_init__(self) -> None:
        for name in (
            "sink_frames",
            "bank_frames",
            "frames_per_chunk",
            "record_interval",
            "sma_top_k",
        ):
            _require_int(name, getattr(self, name))
        if self.local_frames is not None:
            _require_int("local_frames", self.local_frames)
        for name in ("sink_frames", "bank_frames", "local_frames", "frames_per_chunk",
                     "record_interval", "sma_top_k"):
            value = getattr(self, name)
            if value is not None and value > MAX_FRAMES:
                raise ValueError(
                    f"{name} must be <= {MAX_FRAMES} (latent frames a cache can hold), got {value}"
                )
        for name in ("nam", "sma"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")
        if self.bank_frames < 0:
            raise ValueError(f"bank_frames must be >= 0, got {self.bank_frames}")
        if self.frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {self.frames_per_chunk}")
        if self.record_interval < 1:
            raise ValueError(f"record_interval must be >= 1, got {self.record_interval}")
        if self.sma_top_k < 1:
            raise ValueError(f"sma_top_k must be >= 1, got {self.sma_top_k}")
        if self.local_frames is not None and self.local_frames < self.frames_per_chunk:
            raise ValueError(
                f"local_frames must be >= frames_per_chunk ({self.frames_per_chunk}) because the "
                f"local window includes the current chunk, got local_frames={self.local_frames}"
            )
        if self.nam and self.bank_frames == 0:
            raise ValueError(
                "bank_frames must be >= 1 when nam=True (NAM refreshes the memory bank); "
                "use nam=False for a cache without a bank"
            )
        if not self.nam and self.bank_frames != 0:
            raise ValueError(
                f"bank_frames must be 0 when nam=False (no memory bank, the LongLive behaviour), "
                f"got bank_frames={self.bank_frames}"
            )
        if self.sma and self.sma_top_k > self.sink_frames + self.bank_frames:
            raise ValueError(
                f"sma_top_k must be <= sink_frames + bank_frames "
                f"({self.sink_frames + self.bank_frames}), the frames SMA selects from, got "
                f"sma_top_k={self.sma_top_k}; with sma_top_k equal to it SMA attends to all of "
                "them (dense attention)"
            )
        for name in ("bank_staging", "cache_dtype", "position_overflow", "bank_policy",
                     "activation_policy", "attention_backend"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "cache_dtype" and value is None):
                raise TypeError(f"{name} must be a str, got {value!r}")
        if self.bank_staging not in BANK_STAGINGS:
            raise ValueError(
                f"bank_staging must be one of {list(BANK_STAGINGS)}, got {self.bank_staging!r}"
            )
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(
                f"cache_dtype must be None (the attention dtype) or one of "
                f"{list(CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )
        if self.position_overflow not in POSITION_OVERFLOWS:
            raise ValueError(
                f"position_overflow must be one of {list(POSITION_OVERFLOWS)}, "
                f"got {self.position_overflow!r}"
            )
        self._check_policies()
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {sorted(ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )

    def _check_policies(self) -> None:
        for name, registry, switch in (
            ("bank_policy", BANK_POLICIES, "nam"), ("activation_policy", ACTIVATION_POLICIES, "sma")
        ):
            value = getattr(self, name)
            registered_policy(registry, value, name)
            if value != getattr(MemFlowConfig, name) and not getattr(self, switch):
                raise ValueError(
                    f"{name}={value!r} needs {switch}=True (with {switch}=False there is "
                    f"nothing for it to choose)"
                )

    def stages_bank_frame(self, start_frame: int) -> bool:
        """Whether the chunk starting at latent frame ``start_frame`` stages its first frame."""
        if not self.bank_frames:
            return False
        if self.bank_staging == "every_chunk":
            return True
        return start_frame % (self.record_interval * self.frames_per_chunk) == 0

    def describe(self) -> str:
        """The layout in one line, e.g. ``sink 3, bank 3, local 9, 3-frame chunks, SMA top 3``."""
        local = "unbounded" if self.local_frames is None else self.local_frames
        bank = f" ({self.bank_policy})" if self.bank_policy != "nam" else ""
        sma = f", SMA top {self.sma_top_k}" if self.sma else ""
        if self.sma and self.activation_policy != "sma":
            sma += f" ({self.activation_policy})"
        cache = f", {self.cache_dtype} cache" if self.cache_dtype else ""
        return (f"sink {self.sink_frames}, bank {self.bank_frames}{bank}, local {local}, "
                f"{self.frames_per_chunk}-frame chunks{sma}{cache}")

    @property
    def cache_layout(self) -> MemFlowConfig:
        """This config with the policies' fields at their defaults: what the attached hooks and
        the cache depend on. Sessions of one attachment may differ from it only in SMA (``sma``,
        ``sma_top_k``) and the policies (``bank_policy``, ``activation_policy``), which each
        session applies in its own attention and bank."""
        return dataclasses.replace(
            self,
            sma=False,
            sma_top_k=MemFlowConfig.sma_top_k,
            bank_policy=MemFlowConfig.bank_policy,
            activation_policy=MemFlowConfig.activation_policy,
        )

    # ----------------------------------------------------------------------------- derived sizes
    @property
    def window_capacity(self) -> int | None:
        """Past (already generated) frames the local window stores; ``None`` when unbounded."""
        if self.local_frames is None:
            return None
        return self.local_frames - self.frames_per_chunk

    @property
    def cache_frames(self) -> int | None:
        """``local_attn_size`` of the reference: sink plus local window; ``None`` when unbounded."""
        if self.local_frames is None:
            return None
        return self.sink_frames + self.local_frames

    @property
    def position_span(self) -> int | None:
        """RoPE positions one chunk needs at once: a recache of ``cache_frames`` then the chunk
        (architecture s.2b); ``None`` when the window is unbounded."""
        if self.cache_frames is None:
            return None
        return self.cache_frames + self.frames_per_chunk

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def reference(cls, **overrides: Any) -> MemFlowConfig:
        """The paper's inference defaults: sink 3, bank 3, local 9, 3-frame chunks, SMA off."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def reference_sma(cls, **overrides: Any) -> MemFlowConfig:
        """The reference with Sparse Memory Activation on (top 3 of sink + bank)."""
        return dataclasses.replace(cls(sma=True, sma_top_k=3), **overrides)

    @classmethod
    def longlive(cls, **overrides: Any) -> MemFlowConfig:
        """The memory-free LongLive baseline: sink 3 + local 9, no bank."""
        return dataclasses.replace(cls(bank_frames=0, nam=False), **overrides)

    @classmethod
    def full_history(cls, **overrides: Any) -> MemFlowConfig:
        """No sink, no bank, no eviction: every chunk attends to every earlier frame.

        Streaming under this preset equals a block-causal full-sequence forward; the window grows
        with the video, so use it for exactness tests and short videos only.
        """
        return dataclasses.replace(
            cls(sink_frames=0, bank_frames=0, local_frames=None, nam=False), **overrides
        )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MemFlowConfig:
        """A preset by name: one of ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
        return getattr(cls, name)(**overrides)

    # -------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The saved form: every field but the runtime ones, stamped with the library version."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}
        return {**data, VERSION_KEY: __version__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemFlowConfig:
        """A config from its saved form. Keys this version does not know (written by a newer
        one) are warned about and ignored; the version stamp is read past."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {VERSION_KEY})
        if unknown:
            writer = data.get(VERSION_KEY, "an unknown version")
            warnings.warn(
                f"ignoring MemFlowConfig keys {unknown} (written by memflow-adapter {writer}; "
                f"this is {__version__}, which knows {sorted(known)})",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{key: value for key, value in data.items() if key in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> MemFlowConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a MemFlowConfig JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json_file(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> MemFlowConfig:
        """A config from ``to_json_file``'s file; errors name the file."""
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            return cls.from_json_string(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{os.fspath(path)} is not a MemFlowConfig JSON file: {error}"
            ) from None
        except (TypeError, ValueError) as error:
            raise type(error)(f"{os.fspath(path)}: {error}") from None


#: Preset names accepted by ``MemFlowConfig.preset`` (and the command line).
PRESETS = ("reference", "reference_sma", "longlive", "full_history")


def _require_int(name: str, value: Any) -> None:
    # bool is an int subclass; `sink_frames=True` is a bug, not a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
