"""Attaching MemFlow to a transformer and removing it, through diffusers' attention processors
and ``diffusers.hooks.HookRegistry`` (no class is ever patched).

``apply_memflow`` swaps every self-attention module's processor for the integration's streaming
processor, puts a hook on the RoPE module that offsets temporal positions to the running pass's
absolute frames, and a guard hook on the transformer that refuses calls outside a session pass.
The attachment holds no generation state: it forwards to whichever ``StreamingSession`` is bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from integrations import INTEGRATIONS, Integration, find_integration

from .config import MemFlowConfig
from .context_parallel import (
    context_parallel_config,
    enable_diffusers_context_parallel,
    head_shard_of,
)
from .positions import RopeTable
from .session import SessionStateError, StreamingSession

GUARD_HOOK = "memflow_guard"
ROPE_HOOK = "memflow_rope_offset"


class MemFlowAttachment:
    """MemFlow attached to one transformer: its integration, its config, the bound session.

    It creates sessions (``create_session``), binds them (``bind``), computes NAM's per-layer
    text keys ``[B, L, H, D]`` from prompt embeddings ``[B, L, D]`` (``text_keys``), and runs each
    self-attention layer's ``[B, n * T_f, H, D]`` queries, keys and values through the bound
    session (``attend``).
    """

    def __init__(self, model: nn.Module, integration: Integration, config: MemFlowConfig) -> None:
        self.model = model
        self.integration = integration
        self.config = config
        self.num_layers = len(integration.self_attention_modules())
        self._session: StreamingSession | None = None
        self._original_processors: list[Any] = []
        self.attached = True  # False once remove_memflow has detached it
        #: A factory of the context entered around MemFlow's calls into the model's submodules
        #: outside its forward (NAM's text keys). A trainer whose forward hooks gather sharded
        #: weights sets one that makes them whole (the recipes' FSDP2: ``unsharded(model)``).
        self.outside_forward: Callable[[], AbstractContextManager] = nullcontext

    @property
    def session(self) -> StreamingSession | None:
        return self._session

    @session.setter
    def session(self, session: StreamingSession | None) -> None:
        if session is not None:
            self._require_attached("bind a session")
            if session.config.cache_layout != self.config.cache_layout:
                raise ValueError(
                    f"the session's config {session.config} differs from the config MemFlow was "
                    f"attached with {self.config} in more than SMA (sma, sma_top_k)"
                )
            if session.num_layers != self.num_layers:
                raise ValueError(
                    f"the session has {session.num_layers} layers, the model has {self.num_layers}"
                )
            if session.rope is None or session.rope.frames > self.integration.rope_frames():
                raise ValueError(
                    "the session must know the model's RoPE table (rope_frames="
                    f"{self.integration.rope_frames()}) to keep every position inside it: make "
                    "it with attachment.create_session"
                )
        self._session = session

    @contextmanager
    def bind(self, session: StreamingSession) -> Iterator[StreamingSession]:
        """Route the model's attention to ``session`` inside the block."""
        previous = self._session
        self.session = session
        try:
            yield session
        finally:
            self._session = previous

    def create_session(
        self,
        latent_height: int,
        latent_width: int,
        record_trace: bool = True,
        trace_chunks: int | None = None,
        config: MemFlowConfig | None = None,
    ) -> StreamingSession:
        """A fresh session for videos of the given latent size; under context parallelism it
        holds this rank's heads. ``config``: the session's layout, default the attachment's; it
        may differ from it only in SMA (``MemFlowConfig.cache_layout``), e.g. a recipe's SMA
        rollouts of a model attached with the dense layout."""
        self._require_attached("create a session")
        tokens_per_frame = self.integration.tokens_per_frame(latent_height, latent_width)
        head_shard = head_shard_of(
            self.model, self.integration.attention_heads(), tokens_per_frame
        )
        config = self.config if config is None else config
        if config.cache_layout != self.config.cache_layout:
            raise ValueError(
                f"config={config} differs from the config MemFlow was attached with "
                f"{self.config} in more than SMA (sma, sma_top_k)"
            )
        return StreamingSession(
            config,
            num_layers=self.num_layers,
            tokens_per_frame=tokens_per_frame,
            record_trace=record_trace,
            trace_chunks=trace_chunks,
            rope=RopeTable(self.integration.rope_frames(), self.integration.rotate_keys),
            device=next(self.model.parameters()).device,
            head_shard=head_shard,
        )

    def enable_context_parallel(self, ulysses_degree: int) -> None:
        """Split every pass of the model over ``ulysses_degree`` ranks with diffusers' Ulysses
        context parallelism; each rank's sessions then cache ``H / ulysses_degree`` heads
        (architecture s.6). Every rank calls it, in a ``torchrun`` launch of that many
        processes, and then runs the same passes.

        Raises:
            ValueError: the family is not supported, or the degree does not fit (see
                ``enable_diffusers_context_parallel``).
        """
        self._require_attached("enable context parallelism")
        if not self.integration.context_parallel:
            raise ValueError(
                f"ulysses_degree={ulysses_degree}: the {self.integration.name} family does not "
                "stream under context parallelism (supported: "
                f"{', '.join(i.name for i in INTEGRATIONS if i.context_parallel)})"
            )
        enable_diffusers_context_parallel(
            self.model, ulysses_degree, self.integration.attention_heads()
        )
        # what enable_parallelism gives a model's own processors, so that remove_memflow leaves
        # a model that computes what diffusers' context parallelism computes
        for processor in self._original_processors:
            if hasattr(processor, "_parallel_config"):
                processor._parallel_config = self.model._parallel_config

    def text_keys(self, prompt_embeds: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the cross-attention keys of a prompt (``[B, L_text, H, D]``), for NAM."""
        with self.outside_forward():
            return self.integration.text_keys(prompt_embeds)

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """The bound session's attention of ``layer`` over ``[B, S, H, D]`` tokens; under
        context parallelism, ``[B, S/N, H, D]`` of this rank's tokens, exchanged for every token
        of its heads around the session's attention (Ulysses)."""
        session = self.require_session()
        shard = session.head_shard
        if shard is None:
            return session.attend(layer, query, key, value)
        query, key, value = (shard.to_heads(x) for x in (query, key, value))
        return shard.to_sequence(session.attend(layer, query, key, value))

    def _require_attached(self, what: str) -> None:
        if not self.attached:
            raise SessionStateError(
                f"cannot {what}: this attachment was removed with remove_memflow(), so the model "
                "would run without memory; attach again with apply_memflow()"
            )

    def require_session(self) -> StreamingSession:
        if self._session is None:
            raise SessionStateError(
                "MemFlow is attached but no session is bound: use `with attachment.bind(session):`"
            )
        return self._session


class _PassGuardHook(ModelHook):
    """Refuses transformer calls outside a session pass, which would otherwise stream nothing."""

    def __init__(self, attachment: MemFlowAttachment) -> None:
        super().__init__()
        self.attachment = attachment

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any):
        if not self.attachment.require_session().in_pass:
            raise SessionStateError(
                "this transformer streams with MemFlow: call it inside session.denoise_pass(), "
                "session.context_pass() or session.switch_prompt(), or remove_memflow() it first"
            )
        return args, kwargs


class _RopeOffsetHook(ModelHook):
    """Makes RoPE give the running pass's latent-frame positions (absolute until the video
    outgrows the RoPE table, then re-based: ``StreamingSession.pass_rope_position``, a device
    tensor, so that a compiled model neither syncs nor recompiles per chunk)."""

    def __init__(self, attachment: MemFlowAttachment) -> None:
        super().__init__()
        self.attachment = attachment

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        offset = self.attachment.require_session().pass_rope_position
        return self.attachment.integration.rope_forward(module, offset, *args, **kwargs)


def get_memflow(model: nn.Module) -> MemFlowAttachment | None:
    """The attachment ``apply_memflow`` put on ``model``, if any."""
    registry = getattr(model, "_diffusers_hook", None)
    hook = registry.get_hook(GUARD_HOOK) if registry is not None else None
    return hook.attachment if hook is not None else None


def apply_memflow(
    model: nn.Module, config: MemFlowConfig, session: StreamingSession | None = None
) -> MemFlowAttachment:
    """Make ``model`` stream with MemFlow memory.

    Args:
        model: a transformer of a supported family (see
            ``integrations.supported_model_classes()``).
        config: the memory layout every session of this model uses.
        session: optionally bound right away (else use ``attachment.bind(session)``).

    Returns:
        The attachment: creates sessions, binds them, computes NAM's text keys ``[B, L, H, D]``
        (one per self-attention layer) from prompt embeddings ``[B, L, D]``.

    Raises:
        TypeError: the model's family is not supported (nothing is changed).
        ValueError: MemFlow is already attached.
    """
    if not isinstance(config, MemFlowConfig):
        raise TypeError(f"config must be a MemFlowConfig, got {type(config).__name__}")
    if get_memflow(model) is not None:
        raise ValueError("MemFlow is already attached to this model; remove_memflow() it first")
    if context_parallel_config(model) is not None:
        raise ValueError(
            "apply MemFlow before enable_parallelism: context parallelism splits RoPE's output "
            "by sequence, which must wrap MemFlow's RoPE offset; use "
            "attachment.enable_context_parallel(ulysses_degree) after apply_memflow"
        )
    integration = find_integration(model)
    attachment = MemFlowAttachment(model, integration, config)
    attachment.session = session
    modules = integration.self_attention_modules()
    rope_registry = HookRegistry.check_if_exists_or_initialize(integration.rope_module())
    model_registry = HookRegistry.check_if_exists_or_initialize(model)
    try:
        for layer, module in enumerate(modules):
            attachment._original_processors.append(module.processor)
            module.set_processor(integration.self_attention_processor(layer, attachment.attend))
        rope_registry.register_hook(_RopeOffsetHook(attachment), ROPE_HOOK)
        model_registry.register_hook(_PassGuardHook(attachment), GUARD_HOOK)
    except BaseException:
        _detach(attachment)
        raise
    return attachment


def remove_memflow(model: nn.Module) -> None:
    """Undo ``apply_memflow``: the model computes exactly what it computed before."""
    attachment = get_memflow(model)
    if attachment is None:
        raise ValueError("MemFlow is not attached to this model")
    _detach(attachment)


def _detach(attachment: MemFlowAttachment) -> None:
    modules = attachment.integration.self_attention_modules()
    for module, processor in zip(modules, attachment._original_processors, strict=False):
        module.set_processor(processor)
    attachment._original_processors.clear()
    HookRegistry.check_if_exists_or_initialize(attachment.integration.rope_module()).remove_hook(
        ROPE_HOOK, recurse=False
    )
    HookRegistry.check_if_exists_or_initialize(attachment.model).remove_hook(
        GUARD_HOOK, recurse=False
    )
    attachment.attached = False
    attachment._session = None
