"""Original-layout Wan2.1 / Wan2.2 T2V checkpoints (Self-Forcing, LongLive, MemFlow) for diffusers'
``WanTransformer3DModel`` (architecture s.7).

Two key layouts of the same weights:

- original (the Wan2.1 repository): ``patch_embedding``, ``text_embedding.{0,2}``,
  ``time_embedding.{0,2}``, ``time_projection.1``, ``blocks.N.{self_attn,cross_attn}.{q,k,v,o,
  norm_q,norm_k}``, ``blocks.N.ffn.{0,2}``, ``blocks.N.norm3`` (cross-attention norm),
  ``blocks.N.modulation``, ``head.head``, ``head.modulation``;
- diffusers: ``condition_embedder.*``, ``blocks.N.{attn1,attn2}.{to_q,to_k,to_v,to_out.0,...}``,
  ``blocks.N.ffn.net.{0.proj,2}``, ``blocks.N.norm2``, ``blocks.N.scale_shift_table``,
  ``proj_out``, ``scale_shift_table``.

original -> diffusers is diffusers' own ``convert_wan_transformer_to_diffusers``; this module adds
what it lacks: the inverse conversion and the MemFlow LoRA's keys (a peft state dict on original
module names). ``WanIntegration.checkpoints`` declares them; reading and unwrapping training
checkpoints and loading LoRAs is family-agnostic (``checkpoints.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from .checkpoints import (
    LORA_ADAPTER_NAME,
    LORA_ENTRY,
    PathLike,
    StateDict,
    check_lora_keys,
    load_checkpoint_file,
    load_converted_transformer,
    name_a_few,
    rename_keys,
    unwrap_training_checkpoint,
)

#: diffusers -> original, applied in order to ``.{key}.``: the inverse of
#: ``convert_wan_transformer_to_diffusers`` on Wan T2V keys (top-level keys in TOP_LEVEL_RENAMES).
DIFFUSERS_TO_ORIGINAL_RENAMES = (
    (".condition_embedder.time_embedder.linear_1.", ".time_embedding.0."),
    (".condition_embedder.time_embedder.linear_2.", ".time_embedding.2."),
    (".condition_embedder.text_embedder.linear_1.", ".text_embedding.0."),
    (".condition_embedder.text_embedder.linear_2.", ".text_embedding.2."),
    (".condition_embedder.time_proj.", ".time_projection.1."),
    (".attn1.", ".self_attn."),
    (".attn2.", ".cross_attn."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".o."),
    (".ffn.net.0.proj.", ".ffn.0."),
    (".ffn.net.2.", ".ffn.2."),
    # diffusers' norm2 (the cross-attention norm) is the original norm3, and the other way round.
    (".norm2.", ".norm__swap."),
    (".norm3.", ".norm2."),
    (".norm__swap.", ".norm3."),
    (".scale_shift_table.", ".modulation."),
    (".proj_out.", ".head.head."),
)
TOP_LEVEL_RENAMES = {"scale_shift_table": "head.modulation"}
#: Every parameter name of an original-layout Wan T2V transformer.
ORIGINAL_T2V_KEY = re.compile(
    r"(patch_embedding|(text|time)_embedding\.[02]|time_projection\.1|head\.head"
    r"|blocks\.\d+\.((self|cross)_attn\.(q|k|v|o|norm_q|norm_k)|ffn\.[02]|norm3))\.(weight|bias)"
    r"|(blocks\.\d+\.|head\.)modulation"
)


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Original-layout Wan keys -> diffusers ``WanTransformer3DModel`` keys (diffusers' converter,
    on a shallow copy: ``state_dict`` is left as it is; tensors are shared)."""
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers ``WanTransformer3DModel`` keys -> original Wan2.1 layout; the exact inverse of
    ``original_to_diffusers`` on Wan2.1 / Wan2.2 T2V transformers (tensors are shared).

    Raises:
        ValueError: a key that has no original T2V name (I2V, VACE, Animate, ...).
    """
    original = rename_keys(state_dict, _diffusers_key_to_original)
    unknown = [key for key in original if not ORIGINAL_T2V_KEY.fullmatch(key)]
    if unknown:
        raise ValueError(
            f"state_dict has keys with no original Wan T2V name: {name_a_few(unknown)}; "
            "only Wan2.1 / Wan2.2 T2V transformers are supported"
        )
    return original


def load_original_transformer(
    checkpoint: PathLike | Mapping[str, Any],
    config: PathLike | Mapping[str, Any],
    entry: str | None = None,
) -> WanTransformer3DModel:
    """A ``WanTransformer3DModel`` (eval mode, float32) with the weights of an original-layout
    checkpoint.

    Args:
        checkpoint: a checkpoint file (see ``load_checkpoint_file``) or its loaded dict; training
            checkpoints are unwrapped by ``unwrap_training_checkpoint``.
        config: the diffusers transformer config: a dict, a ``config.json``, or a folder holding
            ``config.json`` or ``transformer/config.json``.
        entry: the checkpoint entry to read (default: ``generator_ema``, then ``generator``).

    Raises:
        ValueError: the weights do not fit the config (missing, unexpected or mis-shaped keys).
    """
    return load_converted_transformer(
        WanTransformer3DModel, original_to_diffusers, checkpoint, config, entry
    )


def original_lora_to_diffusers(lora_checkpoint: PathLike | Mapping[str, Any]) -> StateDict:
    """The MemFlow LoRA (peft, on original module names) -> peft keys on diffusers module names.

    Args:
        lora_checkpoint: a file or dict with a ``generator_lora`` entry, or a flat peft state dict;
            keys like ``base_model.model.blocks.0.self_attn.q.lora_A[.default].weight``.

    Returns:
        ``{"blocks.0.attn1.to_q.lora_A.weight": [r, in], "blocks.0.attn1.to_q.lora_B.weight":
        [out, r], "blocks.0.ffn.net.0.proj.lora_A.weight": ..., ...}``.

    Raises:
        ValueError: a key that is not a ``lora_A`` / ``lora_B`` weight.
    """
    if not isinstance(lora_checkpoint, Mapping):
        lora_checkpoint = load_checkpoint_file(lora_checkpoint)
    entry = LORA_ENTRY if LORA_ENTRY in lora_checkpoint else None
    state = rename_keys(
        unwrap_training_checkpoint(lora_checkpoint, entry),
        lambda key: LORA_ADAPTER_NAME.sub(r".\1.weight", key),
    )
    check_lora_keys(state)
    return original_to_diffusers(state)


def _diffusers_key_to_original(key: str) -> str:
    if key in TOP_LEVEL_RENAMES:
        return TOP_LEVEL_RENAMES[key]
    key = f".{key}."
    for old, new in DIFFUSERS_TO_ORIGINAL_RENAMES:
        key = key.replace(old, new)
    return key[1:-1]
