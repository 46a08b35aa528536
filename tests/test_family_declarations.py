"""What a family declares for the applications (docs/integrations.md s.1): LoRA targets, default
video, VAE temporal factor and the conversion of original-format checkpoints, found from a model
or, where none is at hand, by name or by a config's class."""

import inspect
import json

import pytest
from diffusers import AutoencoderKLWan, WanPipeline

from integrations import (
    INTEGRATIONS,
    REFERENCE_FAMILY,
    find_integration,
    integration_for_config,
    integration_named,
    reference_integration,
)
from integrations.wan import WAN21_T2V_1_3B_TRANSFORMER
from memflow_adapter.hub import PublishedLayout
from memflow_apps.cli.main import main
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

WITHOUT_CONVERSION = [family.name for family in INTEGRATIONS if family.checkpoints is None]


@pytest.mark.parametrize("family", INTEGRATIONS, ids=lambda family: family.name)
def test_every_family_declares_what_the_applications_read(family):
    video = family.default_video
    assert min(video.height, video.width, video.max_sequence_length) >= 1
    assert family.vae_temporal_factor >= 1
    assert family.lora_targets.fullmatch("blocks.0.attn1.to_q")


def test_the_wan_declarations_are_diffusers_own_defaults():
    wan = integration_named("wan")
    call = inspect.signature(WanPipeline.__call__).parameters
    assert {name: getattr(wan.default_video, name)
            for name in ("height", "width", "max_sequence_length")} == {
        name: call[name].default for name in ("height", "width", "max_sequence_length")
    }
    vae = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert wan.vae_temporal_factor == vae["scale_factor_temporal"].default
    pipe = build_tiny_wan_pipeline(0)
    assert find_integration(pipe.transformer).vae_temporal_factor == pipe.vae_scale_factor_temporal


def test_wan_lora_targets_are_every_linear_of_the_blocks():
    targets = integration_named("wan").lora_targets
    for name in ("blocks.3.attn1.to_k", "blocks.3.attn2.to_out.0", "blocks.3.ffn.net.0.proj",
                 "blocks.3.ffn.net.2"):
        assert targets.fullmatch(name)
    for name in ("blocks.3.attn1.norm_q", "blocks.3.attn2.to_out.1", "proj_out",
                 "condition_embedder.text_embedder.linear_1"):
        assert not targets.fullmatch(name)


def test_the_published_layout_defaults_to_the_reference_family_as_before():
    layout = PublishedLayout()
    assert REFERENCE_FAMILY == reference_integration().name == "wan" == layout.integration
    assert layout.base_model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert layout.base_config == WAN21_T2V_1_3B_TRANSFORMER
    conversion = reference_integration().checkpoint_conversion()
    assert conversion.model_class.__name__ == "WanTransformer3DModel"


def test_families_are_found_by_name_and_by_config_class():
    assert integration_named("helios").name == "helios"
    with pytest.raises(ValueError, match="no model family is called 'sora'; families: helios"):
        integration_named("sora")
    for family in INTEGRATIONS:
        for class_name in family.model_classes:
            assert integration_for_config({"_class_name": class_name}) is family
    assert integration_for_config(dict(WAN21_T2V_1_3B_TRANSFORMER)) is reference_integration()
    with pytest.raises(ValueError, match="'UNet2DModel' is no supported model class"):
        integration_for_config({"_class_name": "UNet2DModel"})


@pytest.mark.parametrize("name", WITHOUT_CONVERSION)
def test_a_family_without_a_conversion_refuses_it_by_name(name):
    with pytest.raises(ValueError, match=f"the '{name}' family .* declares no conversion"):
        integration_named(name).checkpoint_conversion()
    with pytest.raises(ValueError, match=f"the '{name}' family"):
        PublishedLayout(integration=name)


def test_convert_refuses_a_config_of_a_family_without_a_conversion(tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.delenv("MEMFLOW_TRACEBACK", raising=False)
    family = integration_named(WITHOUT_CONVERSION[0])
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"_class_name": family.model_classes[0]}))
    assert main(["convert", "--base", str(tmp_path / "base.pt"), "--base-config", str(config),
                 "--output", str(tmp_path / "out")]) == 2
    assert f"the '{family.name}' family" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
