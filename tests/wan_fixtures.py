"""Generators of Wan checkpoints in the original (Self-Forcing / LongLive / MemFlow) layout."""

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from integrations.wan_checkpoints import diffusers_to_original

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


#: Two float32 models with bitwise-equal weights, built or loaded differently, can still differ by
#: a few ulps in their outputs: which matmul/attention kernel runs depends on the tensors' memory
#: layout and alignment and on the CPU (3.1e-6 seen on outputs of magnitude ~1). 1e-5 is a few
#: float32 ulps at that scale and far below any weight mix-up (those move outputs by ~1e-1).
SAME_MODEL_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def assert_same_model(actual: nn.Module, expected: nn.Module) -> None:
    """The invariant of a lossless load or conversion: every weight and buffer bitwise equal,
    and the outputs equal up to kernel round-off (``SAME_MODEL_TOLERANCE``)."""
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    different = [k for k, v in expected_state.items() if not torch.equal(actual_state[k], v)]
    assert not different, f"weights differ: {different[:5]}"
    torch.testing.assert_close(outputs(actual), outputs(expected), **SAME_MODEL_TOLERANCE)


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
