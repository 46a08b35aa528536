"""Original-layout Wan checkpoints (Self-Forcing, LongLive, MemFlow) in diffusers'
WanTransformer3DModel: reading training checkpoints, converting keys both ways, loading the LoRA."""

import random
import re

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from integrations.checkpoints import (
    load_checkpoint_file,
    load_lora_into,
    lora_config_for,
    unwrap_training_checkpoint,
)
from integrations.wan_checkpoints import (
    diffusers_to_original,
    load_original_transformer,
    original_lora_to_diffusers,
    original_to_diffusers,
)

from tiny_models import tiny_wan
from wan_fixtures import (
    ALPHA,
    ORIGINAL_TO_DIFFUSERS_LINEARS,
    RANK,
    assert_same_model,
    lora_layers,
    original_lora,
    outputs,
    training_state,
    updated_by_hand,
)

ORIGINAL_TOP_LEVEL_KEYS = {
    *(f"{name}.{p}" for name in ("patch_embedding", "head.head") for p in ("weight", "bias")),
    *(
        f"{name}_embedding.{i}.{p}"
        for name in ("text", "time")
        for i in (0, 2)
        for p in ("weight", "bias")
    ),
    "time_projection.1.weight",
    "time_projection.1.bias",
    "head.modulation",
}
ORIGINAL_BLOCK_KEYS = {
    *(f"{name}.{p}" for name in ORIGINAL_TO_DIFFUSERS_LINEARS for p in ("weight", "bias")),
    *(
        f"{attn}.{norm}.weight"
        for attn in ("self_attn", "cross_attn")
        for norm in ("norm_q", "norm_k")
    ),
    "norm3.weight",
    "norm3.bias",
    "modulation",
}


@pytest.fixture
def training_checkpoint(tmp_path):
    """GENERATOR: a training checkpoint file whose ``generator`` and ``generator_ema`` entries
    are two different tiny random Wans in the original layout. Returns (path, ema, generator)."""
    ema, generator = tiny_wan(seed=1), tiny_wan(seed=2)
    path = tmp_path / "checkpoint_model_001000.pt"
    checkpoint = {
        "generator": training_state(generator),
        "generator_ema": training_state(ema),
        "step": 1000,
    }
    torch.save(checkpoint, path)
    return path, ema, generator


# -- base weights ---------------------------------------------------------------------------------


def test_training_checkpoint_gives_the_same_model_as_its_source(training_checkpoint):
    path, ema, _ = training_checkpoint
    model = load_original_transformer(path, dict(ema.config))
    assert isinstance(model, WanTransformer3DModel)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_model(model, ema)


def test_generator_ema_is_the_default_and_entry_picks_another(training_checkpoint):
    path, ema, generator = training_checkpoint
    assert not torch.equal(outputs(ema), outputs(generator))
    model = load_original_transformer(path, dict(ema.config), entry="generator")
    assert_same_model(model, generator)


@pytest.mark.parametrize("where", ["dict", "config.json", "folder", "pipeline folder"])
def test_config_is_a_dict_a_json_file_or_a_folder(tmp_path, where):
    source = tiny_wan()
    weights = tmp_path / "model.safetensors"
    save_file(diffusers_to_original(source.state_dict()), weights)
    folder = tmp_path / ("transformer" if where == "pipeline folder" else "config")
    source.save_config(folder)
    config = {
        "dict": dict(source.config),
        "config.json": folder / "config.json",
        "folder": folder,
        "pipeline folder": tmp_path,
    }[where]
    assert_same_model(load_original_transformer(weights, config), source)


def test_checkpoint_that_does_not_fit_the_config_names_the_keys():
    source = tiny_wan()
    original = diffusers_to_original(source.state_dict())
    del original["blocks.1.ffn.2.weight"], original["head.modulation"]
    original["blocks.2.norm3.weight"] = torch.zeros(24)
    with pytest.raises(ValueError) as error:
        load_original_transformer(original, {**source.config, "text_dim": 32})
    message = str(error.value)
    assert "2 missing keys: blocks.1.ffn.net.2.weight, scale_shift_table" in message
    assert "1 unexpected keys: blocks.2.norm2.weight" in message
    assert (
        "condition_embedder.text_embedder.linear_1.weight [24, 16] (expected [24, 32])" in message
    )


# -- key conversion -------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"])
def test_diffusers_to_original_to_diffusers_is_the_identity(base):
    state = tiny_wan(base=base).state_dict()
    original = diffusers_to_original(state)
    assert set(original) == ORIGINAL_TOP_LEVEL_KEYS | {
        f"blocks.{i}.{key}" for i in range(2) for key in ORIGINAL_BLOCK_KEYS
    }
    back = original_to_diffusers(original)
    assert back.keys() == state.keys()
    assert all(back[key] is state[key] for key in state)
    assert len(original) == len(state)  # original_to_diffusers leaves its input alone


def test_original_names_of_the_renamed_diffusers_weights():
    state = tiny_wan().state_dict()
    original = diffusers_to_original(state)
    assert original["blocks.0.norm3.weight"] is state["blocks.0.norm2.weight"]  # swapped norms
    assert original["blocks.0.modulation"] is state["blocks.0.scale_shift_table"]
    assert original["head.modulation"] is state["scale_shift_table"]
    assert original["head.head.weight"] is state["proj_out.weight"]
    assert original["time_projection.1.weight"] is state["condition_embedder.time_proj.weight"]


def test_keys_with_no_original_t2v_name_are_refused():
    with pytest.raises(ValueError, match="no original Wan T2V name: condition_embedder.image"):
        diffusers_to_original({"condition_embedder.image_embedder.norm1.weight": torch.zeros(2)})


# -- unwrapping training checkpoints --------------------------------------------------------------


def test_unwrap_prefers_generator_ema_then_generator_then_generator_lora():
    ema, generator, lora = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    checkpoint = {"generator": {"w": generator}, "generator_ema": {"w": ema}, "step": 3}
    assert unwrap_training_checkpoint(checkpoint)["w"] is ema
    assert unwrap_training_checkpoint(checkpoint, entry="generator")["w"] is generator
    assert unwrap_training_checkpoint({"generator": {"w": generator}})["w"] is generator
    assert unwrap_training_checkpoint({"generator_lora": {"w": lora}})["w"] is lora


def test_unwrap_looks_into_state_dict_and_model_entries():
    weight = torch.zeros(1)
    assert unwrap_training_checkpoint({"state_dict": {"module.w": weight}}) == {"w": weight}
    assert unwrap_training_checkpoint({"model": {"w": weight}, "epoch": 2}) == {"w": weight}


def test_unwrap_errors_list_the_available_entries():
    checkpoint = {"generator": {"w": torch.zeros(1)}, "critic": {"w": torch.zeros(1)}, "step": 3}
    with pytest.raises(ValueError, match=re.escape("available entries: ['generator', 'critic']")):
        unwrap_training_checkpoint(checkpoint, entry="generator_ema")
    with pytest.raises(ValueError, match=r"no tensors .* available entries: \['optim'\]"):
        unwrap_training_checkpoint({"optim": {"state": {}}})


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (
            "model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.weight",
            "blocks.0.ffn.0.weight",
        ),
        ("module.model.head.head.weight", "head.head.weight"),
        (
            "base_model.model.blocks.0.self_attn.q.lora_A.weight",
            "blocks.0.self_attn.q.lora_A.weight",
        ),
        (
            "module.model.diffusion_model.patch_embedding.weight",
            "model.diffusion_model.patch_embedding.weight",
        ),
    ],
)
def test_unwrap_strips_wrapper_names(key, name):
    assert list(unwrap_training_checkpoint({key: torch.zeros(1)})) == [name]


def test_unwrap_refuses_non_tensors_and_clashing_names():
    with pytest.raises(ValueError, match=re.escape("key 'step' is not a tensor (it holds int)")):
        unwrap_training_checkpoint({"generator": {"w": torch.zeros(1), "step": 3}})
    with pytest.raises(ValueError, match="both become 'w'"):
        unwrap_training_checkpoint({"w": torch.zeros(1), "module.w": torch.zeros(1)})


# -- reading files --------------------------------------------------------------------------------


class NotATensor:
    """An object that ``torch.load(weights_only=True)`` refuses to unpickle."""


@pytest.mark.parametrize(
    "name", ["weights.pt", "weights.pth", "weights.bin", "weights.safetensors"]
)
def test_reads_torch_and_safetensors_files(tmp_path, name):
    weights = {"w": torch.arange(3.0)}
    path = tmp_path / name
    save_file(weights, path) if name.endswith(".safetensors") else torch.save(weights, path)
    assert torch.equal(load_checkpoint_file(path)["w"], weights["w"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_checkpoint_file(tmp_path / "absent.pt")


@pytest.mark.parametrize("name", ["x.pt", "x.safetensors"])
def test_corrupt_file_is_not_a_tensor_checkpoint(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(random.Random(0).randbytes(1024))
    with pytest.raises(ValueError, match=rf"{name}' is not a tensor checkpoint"):
        load_checkpoint_file(path)


def test_pickle_of_other_objects_is_refused_not_run(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1), "extra": NotATensor()}, path)
    with pytest.raises(ValueError, match="x.pt' is not a tensor checkpoint"):
        load_checkpoint_file(path)


def test_unknown_suffix_lists_the_accepted_ones(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="accepted suffixes: .safetensors, .pt, .pth, .bin"):
        load_checkpoint_file(path)


# -- the MemFlow LoRA -----------------------------------------------------------------------------


def test_lora_keys_become_peft_keys_on_diffusers_module_names():
    a, b = torch.zeros(RANK, 24), torch.zeros(24, RANK)
    lora = {
        "model._fsdp_wrapped_module.base_model.model.blocks.0.self_attn.q.lora_A.default.weight": a,
        "base_model.model.blocks.0._checkpoint_wrapped_module.self_attn.q.lora_B.default.weight": b,
        "base_model.model.blocks.1.cross_attn.o.lora_A.weight": a,
        "base_model.model.blocks.1.ffn.0.lora_B.weight": b,
    }
    assert list(original_lora_to_diffusers(lora)) == [
        "blocks.0.attn1.to_q.lora_A.weight",
        "blocks.0.attn1.to_q.lora_B.weight",
        "blocks.1.attn2.to_out.0.lora_A.weight",
        "blocks.1.ffn.net.0.proj.lora_B.weight",
    ]


def test_lora_file_with_other_weights_is_refused():
    lora = {"generator_lora": {"base_model.model.blocks.0.ffn.0.base_layer.weight": torch.zeros(1)}}
    with pytest.raises(ValueError, match="'blocks.0.ffn.0.base_layer.weight' is not a peft LoRA"):
        original_lora_to_diffusers(lora)


def test_lora_config_targets_exactly_the_modules_of_the_state_dict():
    lora = original_lora_to_diffusers(original_lora(tiny_wan()))
    config = lora_config_for(lora)
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (RANK, RANK, False)
    assert sorted(config.target_modules) == sorted(
        f"blocks.{i}.{name}" for i in range(2) for name in ORIGINAL_TO_DIFFUSERS_LINEARS.values()
    )
    lora["blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(RANK + 1, 24)
    with pytest.raises(ValueError, match=re.escape("mixes LoRA ranks [4, 5]")):
        lora_config_for(lora)


@pytest.mark.parametrize("merge", [False, True])
def test_lora_acts_as_weights_updated_by_hand(merge):
    model = tiny_wan()
    lora = original_lora(model)
    reference = updated_by_hand(model, lora["generator_lora"], ALPHA)
    load_lora_into(model, original_lora_to_diffusers(lora), lora_alpha=ALPHA, merge=merge)
    torch.testing.assert_close(outputs(model), outputs(reference), rtol=1e-5, atol=1e-5)
    if merge:
        assert lora_layers(model) == []
        assert model.state_dict().keys() == reference.state_dict().keys()
    else:
        assert len(lora_layers(model)) == 2 * len(ORIGINAL_TO_DIFFUSERS_LINEARS)


def wrong_in_features(lora):
    lora["blocks.1.attn2.to_k.lora_A.weight"] = torch.zeros(RANK, 25)


def wrong_out_features(lora):
    lora["blocks.0.ffn.net.2.lora_B.weight"] = torch.zeros(23, RANK)


def missing_module(lora):
    lora["blocks.7.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 24)
    lora["blocks.7.attn1.to_q.lora_B.weight"] = torch.zeros(24, RANK)


def not_a_linear(lora):
    lora["blocks.0.norm2.lora_A.weight"] = torch.zeros(RANK, 24)
    lora["blocks.0.norm2.lora_B.weight"] = torch.zeros(24, RANK)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            wrong_in_features,
            "'blocks.1.attn2.to_k.lora_A.weight' has shape [4, 25], expected [4, 24]",
        ),
        (
            wrong_out_features,
            "'blocks.0.ffn.net.2.lora_B.weight' has shape [23, 4], expected [24, 4]",
        ),
        (missing_module, "'blocks.7.attn1.to_q' does not exist in this WanTransformer3DModel"),
        (not_a_linear, "'blocks.0.norm2' is a FP32LayerNorm, expected an nn.Linear"),
    ],
)
def test_lora_that_does_not_fit_is_refused_and_the_model_left_untouched(mutate, message):
    model = tiny_wan()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    lora = original_lora_to_diffusers(original_lora(model))
    mutate(lora)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_lora_into(model, lora)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert lora_layers(model) == []
    assert not getattr(model, "peft_config", None)
