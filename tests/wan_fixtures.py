"""Generators of Wan checkpoints in the original (Self-Forcing / LongLive / MemFlow) layout."""

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from memflow_adapter.integrations.wan_checkpoints import diffusers_to_original

#: The Linear layers of an original Wan block and their diffusers names.
ORIGINAL_TO_DIFFUSERS_LINEARS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
RANK = 4
ALPHA = 8.0


def outputs(model: nn.Module) -> torch.Tensor:
    """The model's prediction for fixed inputs: latents [1, 16, 3, 4, 4], prompt [1, 8, 16]."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 4, 4, generator=generator)
    prompt_embeds = torch.randn(1, 8, 16, generator=generator)
    with torch.no_grad():
        return model(latents, torch.tensor([500.0]), prompt_embeds, return_dict=False)[0]


def fsdp_key(key: str) -> str:
    """``key`` as named by the trainer's wrapper (``model.``) under FSDP + checkpointing."""
    if key.startswith("blocks."):
        index, rest = key.removeprefix("blocks.").split(".", 1)
        key = f"blocks.{index}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
    return f"model._fsdp_wrapped_module.{key}"


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights as a Self-Forcing / LongLive / MemFlow trainer saves them."""
    return {fsdp_key(k): v for k, v in diffusers_to_original(model.state_dict()).items()}


def original_lora(model: nn.Module, rank: int = RANK) -> dict:
    """GENERATOR: a MemFlow-style LoRA checkpoint over every Linear of every block: peft keys on
    original module names, random lora_A [r, in] and lora_B [out, r]."""
    shapes = diffusers_to_original(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    lora = {}
    for block in range(len(model.blocks)):
        for name in ORIGINAL_TO_DIFFUSERS_LINEARS:
            out_features, in_features = shapes[f"blocks.{block}.{name}.weight"].shape
            prefix = f"base_model.model.blocks.{block}.{name}"
            lora[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(
                rank, in_features, generator=generator
            )
            lora[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(
                out_features, rank, generator=generator
            )
    return {"generator_lora": lora}


def updated_by_hand(model: nn.Module, lora: dict, alpha: float) -> nn.Module:
    """A copy of ``model`` whose Linear weights are set to W + B @ A * alpha / r."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for block in range(len(model.blocks)):
            for original, diffusers in ORIGINAL_TO_DIFFUSERS_LINEARS.items():
                prefix = f"base_model.model.blocks.{block}.{original}"
                lora_a, lora_b = lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"]
                linear = reference.get_submodule(f"blocks.{block}.{diffusers}")
                linear.weight += lora_b @ lora_a * alpha / lora_a.shape[0]
    return reference


def lora_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
