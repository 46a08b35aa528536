"""Checkpoints of any family: reading files, unwrapping training checkpoints, checking and
loading weights and LoRAs, and ``CheckpointConversion``, what a family declares to convert its
original-format checkpoints into diffusers weights (architecture s.7; Wan's is in
``wan_checkpoints.py``).

Nothing here knows a key layout: the training-checkpoint wrappers (``generator_ema`` and
friends, DDP / FSDP / peft prefixes) are those of the Self-Forcing code base the streaming
checkpoints come from, and LoRAs are peft state dicts on the model's own module names.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.modeling_utils import no_init_weights
from peft import LoraConfig, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: What a corrupt file or a pickle that ``weights_only`` refuses raises while being read.
_READ_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, SafetensorError)

#: Entries of a Self-Forcing / LongLive / MemFlow training checkpoint, in order of preference.
GENERATOR_ENTRIES = ("generator_ema", "generator", "generator_lora")
#: Generic wrapper entries, looked into (after the generator ones) while a level holds no tensor.
WRAPPER_ENTRIES = ("state_dict", "model")
KNOWN_ENTRIES = GENERATOR_ENTRIES + WRAPPER_ENTRIES
#: The entry holding the MemFlow LoRA.
LORA_ENTRY = "generator_lora"
#: Fragments that FSDP and activation checkpointing insert anywhere in a parameter name.
WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
#: Leading prefixes stripped repeatedly: peft (``base_model.model.``), DDP (``module.``) and the
#: training wrapper module (``model.``).
WRAPPER_PREFIXES = ("base_model.model.", "module.", "model.")
#: Left in place: diffusers' single-file converters strip it themselves.
DIFFUSION_MODEL_PREFIX = "model.diffusion_model."

LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
#: peft's adapter name between ``lora_A``/``lora_B`` and ``weight`` (``.lora_A.default.weight``).
LORA_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class CheckpointConversion:
    """What a family declares about its original-format checkpoints (``Integration.checkpoints``).

    Attributes:
        model_class: the diffusers transformer class the converted weights load into.
        to_diffusers: a flat original-layout state dict -> the same tensors on ``model_class``'s
            parameter names.
        lora_to_diffusers: an original-layout LoRA (a file, or its loaded dict, possibly a
            training checkpoint) -> peft keys on ``model_class``'s module names
            (``{"blocks.0.attn1.to_q.lora_A.weight": [r, in], ...}``).
        base_model: Hub id of the diffusers base that published checkpoints in this layout
            fine-tune (the default base of ``PublishedLayout`` and ``memflow convert``).
        base_config: that base's transformer config (diffusers format, no ``_class_name``).
    """

    model_class: type[nn.Module]
    to_diffusers: Callable[[Mapping[str, torch.Tensor]], StateDict]
    lora_to_diffusers: Callable[[PathLike | Mapping[str, Any]], StateDict]
    base_model: str
    base_config: Mapping[str, Any]

    def transformer_weights(
        self, checkpoint: Mapping[str, Any], entry: str | None = None
    ) -> StateDict:
        """A (training) checkpoint's transformer weights on diffusers names: its ``entry``
        unwrapped (``unwrap_training_checkpoint``), then converted."""
        return self.to_diffusers(unwrap_training_checkpoint(checkpoint, entry))

    def load_transformer(
        self,
        checkpoint: PathLike | Mapping[str, Any],
        config: PathLike | Mapping[str, Any],
        entry: str | None = None,
    ) -> nn.Module:
        """``load_converted_transformer`` with this conversion."""
        return load_converted_transformer(
            self.model_class, self.to_diffusers, checkpoint, config, entry
        )


def load_converted_transformer(
    model_class: type[nn.Module],
    to_diffusers: Callable[[Mapping[str, torch.Tensor]], StateDict],
    checkpoint: PathLike | Mapping[str, Any],
    config: PathLike | Mapping[str, Any],
    entry: str | None = None,
) -> nn.Module:
    """A ``model_class`` (eval mode, float32) with the weights of an original-layout checkpoint.

    Args:
        model_class: the diffusers transformer class.
        to_diffusers: the family's original -> diffusers key conversion of a flat state dict.
        checkpoint: a checkpoint file (see ``load_checkpoint_file``) or its loaded dict; training
            checkpoints are unwrapped by ``unwrap_training_checkpoint``.
        config: the diffusers transformer config: a dict, a ``config.json``, or a folder holding
            ``config.json`` or ``transformer/config.json``.
        entry: the checkpoint entry to read (default: ``generator_ema``, then ``generator``).

    Raises:
        ValueError: the weights do not fit the config (missing, unexpected or mis-shaped keys).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint_file(checkpoint)
    state = to_diffusers(unwrap_training_checkpoint(checkpoint, entry))
    with no_init_weights():  # every parameter is overwritten below
        model = model_class.from_config(read_config(config))
    check_state_dict_fits(model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def load_checkpoint_file(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint file onto the CPU without running arbitrary pickled code.

    ``.safetensors`` is read with safetensors; ``.pt`` / ``.pth`` / ``.bin`` with
    ``torch.load(weights_only=True)``, which only unpickles tensors and plain containers.

    Returns:
        the file's top-level dict (a flat ``{name: tensor}`` or a nested training checkpoint).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unknown suffix, a file that is not a tensor checkpoint (corrupt, or a
            pickle of other objects), or a tensor holding NaN or infinite values (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
        raise ValueError(
            f"checkpoint file {str(path)!r} has an unknown suffix {suffix!r}; accepted suffixes: "
            f"{', '.join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))}"
        )
    try:
        if suffix == SAFETENSORS_SUFFIX:
            checkpoint = load_file(path, device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as error:
        raise ValueError(
            f"checkpoint file {str(path)!r} is not a tensor checkpoint (a safetensors file or a "
            f"torch.save of tensors readable with weights_only=True): {type(error).__name__}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"checkpoint file {str(path)!r} is not a tensor checkpoint: it holds a "
            f"{type(checkpoint).__name__}, expected a dict"
        )
    check_finite(checkpoint, f"checkpoint file {str(path)!r}")
    return checkpoint


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first tensor of ``tensors`` (searched
    through nested dicts, keys joined by ``.``) that holds NaN or infinite values: weights like
    that load without error and then turn every output into NaN.
    """
    for key, value in tensors.items():
        if isinstance(value, Mapping):
            check_finite(value, f"{source}, entry {key!r}")
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not finite.all():
                raise ValueError(
                    f"{source}: tensor {key!r} {list(value.shape)} holds "
                    f"{int(finite.numel() - finite.sum())} NaN or infinite value(s); expected "
                    "finite weights (the file is corrupt, or was saved from a diverged run)"
                )


def unwrap_training_checkpoint(
    checkpoint: Mapping[str, Any], entry: str | None = None
) -> StateDict:
    """The flat ``{name: tensor}`` inside a training checkpoint, with wrapper names removed.

    Args:
        checkpoint: a flat state dict, or a dict with entries ``generator_ema`` / ``generator`` /
            ``generator_lora`` (Self-Forcing, LongLive, MemFlow) or ``state_dict`` / ``model``.
        entry: the entry to read; by default, while a level holds no tensor, the first present of
            ``generator_ema``, ``generator``, ``generator_lora``, ``state_dict``, ``model``.

    Key names lose ``_fsdp_wrapped_module.`` and ``_checkpoint_wrapped_module.`` anywhere, and the
    leading ``module.`` (DDP), ``model.`` (training wrapper) and ``base_model.model.`` (peft),
    repeatedly; ``model.diffusion_model.`` is left to diffusers' converter.

    Raises:
        ValueError: ``entry`` is missing (the error lists the available entries), no tensors are
            found, a value is not a tensor, or two keys become the same name.
    """
    state = _select_entry(checkpoint, entry)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"checkpoint key {key!r} is not a tensor (it holds {type(value).__name__})"
            )
    return rename_keys(state, _strip_wrappers)


def lora_config_for(
    lora_state: Mapping[str, torch.Tensor], lora_alpha: float | None = None
) -> LoraConfig:
    """The peft ``LoraConfig`` of a LoRA state dict on diffusers module names.

    ``r`` is the rank of every ``lora_A`` (``[r, in]``; all must agree), ``lora_alpha`` defaults to
    ``r`` (the published MemFlow LoRA: rank 256, alpha 256), ``target_modules`` the exact module
    names in ``lora_state`` (passed as a sorted list; peft keeps them as a set), and
    ``init_lora_weights=False`` (the weights come from ``lora_state``).
    """
    pairs = _lora_pairs(lora_state)
    ranks = sorted({lora_a.shape[0] for lora_a, _ in pairs.values()})
    if len(ranks) != 1:
        raise ValueError(f"lora_state mixes LoRA ranks {ranks}; expected one rank for all modules")
    return LoraConfig(
        r=ranks[0],
        lora_alpha=ranks[0] if lora_alpha is None else lora_alpha,
        target_modules=list(pairs),
        init_lora_weights=False,
    )


def load_lora_into(
    transformer: nn.Module,
    lora_state: Mapping[str, torch.Tensor],
    lora_alpha: float | None = None,
    adapter_name: str = "memflow",
    merge: bool = False,
) -> None:
    """Add ``lora_state`` (peft keys on diffusers module names) to ``transformer`` as the peft
    adapter ``adapter_name``, scaled by ``lora_alpha / r``.

    Everything is checked before the model is touched: every target exists and is an
    ``nn.Linear``, ``lora_A`` is ``[r, in_features]`` and ``lora_B`` ``[out_features, r]``.
    With ``merge``, the adapter is fused into the base weights and every LoRA layer removed,
    leaving the plain model class (refused if it already has other adapters).

    Raises:
        ValueError: naming the first key that does not fit, with its shape and the expected one.
    """
    config = lora_config_for(lora_state, lora_alpha)
    validate_lora(transformer, lora_state)
    others = sorted(getattr(transformer, "peft_config", None) or {})
    if merge and others:
        raise ValueError(f"merge=True would also remove the transformer's adapters {others}")
    transformer.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, dict(lora_state), adapter_name=adapter_name)
    missing = [key for key in result.missing_keys if f".{adapter_name}." in key]
    if result.unexpected_keys or missing:
        transformer.delete_adapters(adapter_name)
        raise ValueError(
            f"peft did not load the LoRA exactly: unexpected {name_a_few(result.unexpected_keys)}, "
            f"missing {name_a_few(missing)}"
        )
    if merge:
        transformer.fuse_lora(adapter_names=[adapter_name])
        transformer.unload_lora()


def validate_lora(transformer: nn.Module, lora_state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every LoRA pair fits its target ``nn.Linear`` in
    ``transformer`` (``lora_A`` ``[r, in_features]``, ``lora_B`` ``[out_features, r]``)."""
    for module_name, (lora_a, lora_b) in _lora_pairs(lora_state).items():
        _check_lora_fits(transformer, module_name, lora_a, lora_b)


def _select_entry(checkpoint: Mapping[str, Any], entry: str | None) -> Mapping[str, Any]:
    if entry is not None:
        if not isinstance(checkpoint.get(entry), Mapping):
            raise ValueError(
                f"entry={entry!r} is not in the checkpoint; available entries: "
                f"{_entries(checkpoint)}"
            )
        checkpoint = checkpoint[entry]
    while not any(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        names = [name for name in KNOWN_ENTRIES if name in _entries(checkpoint)]
        if not names:
            raise ValueError(
                f"found no tensors in the checkpoint and none of the entries "
                f"{list(KNOWN_ENTRIES)}; available entries: "
                f"{_entries(checkpoint)}"
            )
        checkpoint = checkpoint[names[0]]
    return checkpoint


def _entries(checkpoint: Mapping[str, Any]) -> list[str]:
    return [name for name, value in checkpoint.items() if isinstance(value, Mapping)]


def _strip_wrappers(key: str) -> str:
    for fragment in WRAPPER_FRAGMENTS:
        key = key.replace(fragment, "")
    while not key.startswith(DIFFUSION_MODEL_PREFIX):
        prefix = next((prefix for prefix in WRAPPER_PREFIXES if key.startswith(prefix)), None)
        if prefix is None:
            break
        key = key[len(prefix) :]
    return key


def rename_keys(state: Mapping[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    """``state`` with every key passed through ``rename`` (values shared); two keys that become
    one name raise ``ValueError``."""
    renamed: dict[str, Any] = {}
    for key, value in state.items():
        name = rename(key)
        if name in renamed:
            raise ValueError(f"checkpoint key {key!r} and another key both become {name!r}")
        renamed[name] = value
    return renamed


def read_config(config: PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A transformer config as a dict: given as one, or read from a ``config.json`` or a folder
    holding ``config.json`` or ``transformer/config.json``."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        found = [p for p in (path / "config.json", path / "transformer/config.json") if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"config={str(config)!r}: no config.json in this folder or its transformer/"
            )
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(
            f"config={str(config)!r} is neither a config dict, a config.json nor a folder with one"
        )
    return json.loads(path.read_text())


def check_state_dict_fits(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys of ``state``."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = [
        f"{key} {list(state[key].shape)} (expected {list(expected[key].shape)})"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(names)} {kind}: {name_a_few(names)}"
        for kind, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", mismatched),
        )
        if names
    ]
    if problems:
        raise ValueError(
            "the checkpoint does not fit the transformer config (diffusers key names): "
            + "; ".join(problems)
        )


def check_lora_keys(lora_state: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` for an empty LoRA or a key that is not a ``lora_A`` / ``lora_B``
    weight."""
    if not lora_state:
        raise ValueError("the LoRA state dict is empty")
    for key in lora_state:
        if not key.endswith(LORA_SUFFIXES):
            raise ValueError(
                f"LoRA key {key!r} is not a peft LoRA weight; expected keys ending in "
                f"{' or '.join(LORA_SUFFIXES)}"
            )


def _lora_pairs(
    lora_state: Mapping[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (lora_A [r, in], lora_B [out, r])}``, sorted by module name."""
    check_lora_keys(lora_state)
    pairs = {}
    for module in sorted({key.rsplit(".", 2)[0] for key in lora_state}):
        lora_a = lora_state.get(f"{module}.lora_A.weight")
        lora_b = lora_state.get(f"{module}.lora_B.weight")
        if lora_a is None or lora_b is None:
            raise ValueError(f"LoRA module {module!r} needs both lora_A.weight and lora_B.weight")
        pairs[module] = (lora_a, lora_b)
    return pairs


def _check_lora_fits(
    transformer: nn.Module, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> None:
    try:
        module = transformer.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"LoRA target module {name!r} does not exist in this {type(transformer).__name__}"
        ) from None
    linear = getattr(module, "base_layer", module)  # already wrapped by another peft adapter
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"LoRA target module {name!r} is a {type(linear).__name__}, expected an nn.Linear"
        )
    rank = lora_a.shape[0]
    for key, tensor, shape in (
        (f"{name}.lora_A.weight", lora_a, [rank, linear.in_features]),
        (f"{name}.lora_B.weight", lora_b, [linear.out_features, rank]),
    ):
        if list(tensor.shape) != shape:
            raise ValueError(
                f"LoRA weight {key!r} has shape {list(tensor.shape)}, expected {shape} "
                "(lora_A: [r, in_features], lora_B: [out_features, r] of the target nn.Linear)"
            )


def name_a_few(names: list[str], count: int = 5) -> str:
    """The first ``count`` of ``names`` for an error message, and how many more there are."""
    more = f", ... ({len(names) - count} more)" if len(names) > count else ""
    return ", ".join(names[:count]) + more
