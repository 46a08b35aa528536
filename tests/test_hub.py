"""MemFlowAdapter: save, load (folders, the Hub cache, the published layout), apply, push."""

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

import memflow_adapter.hub as hub
from integrations.wan_checkpoints import original_lora_to_diffusers
from memflow_adapter import MemFlowConfig, get_memflow, remove_memflow
from memflow_adapter.hub import MemFlowAdapter, PublishedLayout
from memflow_apps.cli.main import main

from tiny_models import tiny_wan
from wan_fixtures import (
    ALPHA,
    assert_same_model,
    lora_layers,
    original_lora,
    outputs,
    training_state,
    updated_by_hand,
)


@pytest.fixture
def source():
    return tiny_wan(seed=1)


@pytest.fixture
def adapter(source):
    return MemFlowAdapter.for_model(
        source,
        MemFlowConfig.reference_sma(),
        "memflow-tests/tiny-wan",
        lora_state=original_lora_to_diffusers(original_lora(source)),
        lora_alpha=ALPHA,
    )


def untouched(model, before):
    after = model.state_dict()
    return (
        after.keys() == before.keys()
        and all(torch.equal(after[k], before[k]) for k in before)
        and not lora_layers(model)
        and get_memflow(model) is None
    )


def test_save_and_load_round_trip_with_a_model_card(adapter, tmp_path):
    folder = adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_model.safetensors",
        "memflow_config.json",
    ]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "base_model: memflow-tests/tiny-wan" in card
    assert "library_name: memflow-adapter" in card and "| `sma_top_k` | `3` |" in card
    loaded = MemFlowAdapter.from_pretrained(folder)
    assert loaded.config == MemFlowConfig.reference_sma()
    assert (loaded.base_model, loaded.integration, loaded.lora_alpha) == (
        "memflow-tests/tiny-wan",
        "wan",
        ALPHA,
    )
    assert loaded.base_model_config == adapter.base_model_config
    assert loaded.lora_state.keys() == adapter.lora_state.keys()
    assert all(torch.equal(loaded.lora_state[k], v) for k, v in adapter.lora_state.items())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_get_the_modes_the_umask_gives(adapter, tmp_path, umask):
    previous = os.umask(umask)
    try:
        folder = adapter.save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask) and "adapter_model.safetensors" in modes


def test_an_adapter_of_an_unknown_base_model_saves_and_loads_it_as_none(adapter, tmp_path):
    adapter.base_model = None
    folder = adapter.save_pretrained(tmp_path / "adapter")
    assert MemFlowAdapter.from_pretrained(folder).base_model is None
    card = (folder / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # the Hub metadata names no base
    assert "# MemFlow adapter for an unrecorded base model" in card


def test_apply_to_loads_the_lora_and_attaches_memflow(adapter, source, tmp_path):
    expected = outputs(updated_by_hand(source, original_lora(source)["generator_lora"], ALPHA))
    model = tiny_wan(seed=1)
    attachment = MemFlowAdapter.from_pretrained(adapter.save_pretrained(tmp_path)).apply_to(
        model, merge_lora=True
    )
    assert attachment.config == MemFlowConfig.reference_sma() and not lora_layers(model)
    remove_memflow(model)
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-5)


def test_repo_ids_resolve_through_the_hub_cache_offline(adapter, tmp_path):
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--memflow-tests--tiny-adapter"
    adapter.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded = MemFlowAdapter.from_pretrained("memflow-tests/tiny-adapter", cache_dir=cache)
    assert loaded.config == adapter.config
    with pytest.raises(OSError, match="'memflow-tests/unknown'.* could not be fetched"):
        MemFlowAdapter.from_pretrained("memflow-tests/unknown", cache_dir=cache)


def published_repo(tmp_path, source):
    """A folder laid out like the published MemFlow repository: base.pt and lora.pt in the
    original Wan layout, as the trainer saved them."""
    folder = tmp_path / "KlingTeam--MemFlow"
    folder.mkdir()
    torch.save(
        {"generator": training_state(tiny_wan(seed=9)), "generator_ema": training_state(source)},
        folder / "base.pt",
    )
    torch.save(original_lora(source), folder / "lora.pt")
    return folder


def test_the_published_layout_is_converted_once_and_cached(source, tmp_path, monkeypatch):
    folder = published_repo(tmp_path, source)
    layout = PublishedLayout(base_model="tiny", base_config=dict(source.config), lora_alpha=ALPHA)
    adapter = MemFlowAdapter.from_pretrained(folder, cache_dir=tmp_path / "cache", published=layout)
    assert adapter.config == MemFlowConfig.reference() and adapter.base_weights is not None

    model = tiny_wan(seed=5)  # other weights: base.pt replaces them
    adapter.apply_to(model)
    remove_memflow(model)
    expected = outputs(updated_by_hand(source, original_lora(source)["generator_lora"], ALPHA))
    torch.testing.assert_close(outputs(model), expected, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(hub, "load_checkpoint_file", lambda path: pytest.fail("converted again"))
    again = MemFlowAdapter.from_pretrained(folder, cache_dir=tmp_path / "cache", published=layout)
    assert again.base_weights.keys() == adapter.base_weights.keys()


def test_a_folder_without_an_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no MemFlow adapter: expected memflow_"):
        MemFlowAdapter.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["./adaptr", "outputs/run/adaptr", "~/adaptr"])
def test_a_mistyped_local_folder_is_named_as_a_missing_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no MemFlow adapter folder at .*adaptr"):
        MemFlowAdapter.from_pretrained(name)


def test_corrupt_or_missing_weights_are_clear_errors(adapter, tmp_path):
    folder = adapter.save_pretrained(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors"):
        MemFlowAdapter.from_pretrained(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names weights that are missing"):
        MemFlowAdapter.from_pretrained(folder)
    (folder / "memflow_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable MemFlow adapter config"):
        MemFlowAdapter.from_pretrained(folder)


def test_a_saved_lora_holding_nan_is_refused_by_file_and_key(adapter, tmp_path):
    key = "blocks.1.attn2.to_v.lora_B.weight"
    adapter.lora_state[key] = adapter.lora_state[key].clone()
    adapter.lora_state[key][2, 0] = float("nan")
    folder = adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor '{key}' .* 1 NaN"):
        MemFlowAdapter.from_pretrained(folder)


def test_full_weights_holding_inf_are_refused_and_the_model_is_untouched(adapter, source, tmp_path):
    """In memory (``apply_to``) as in a published ``base.pt``: named, before any change."""
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    weights["blocks.0.ffn.net.2.weight"][0, 0] = float("inf")
    adapter.base_weights = weights
    model = tiny_wan(seed=3)
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"base_weights: tensor 'blocks.0.ffn.net.2.weight'"):
        adapter.apply_to(model)
    assert untouched(model, before)

    folder = published_repo(tmp_path, source)
    state = torch.load(folder / "base.pt", weights_only=True)
    key = next(k for k in state["generator_ema"] if "ffn" in k)
    state["generator_ema"][key][0] = float("-inf")
    torch.save(state, folder / "base.pt")
    with pytest.raises(ValueError, match=rf"base.pt', entry 'generator_ema': tensor '{key}'"):
        MemFlowAdapter.from_pretrained(folder, cache_dir=tmp_path / "cache")


def test_an_adapter_for_another_base_model_leaves_the_model_untouched(adapter):
    model = tiny_wan(seed=3, num_layers=3)
    before = model.state_dict()
    with pytest.raises(
        ValueError, match="targets another base model .* num_layers: adapter 2 vs model 3"
    ):
        adapter.apply_to(model)
    assert untouched(model, before)


def test_a_lora_whose_shapes_do_not_fit_leaves_the_model_untouched(adapter):
    model = tiny_wan(seed=3)
    before = model.state_dict()
    key = "blocks.0.attn1.to_q.lora_A.weight"
    adapter.lora_state[key] = torch.zeros(4, 7)
    with pytest.raises(ValueError, match=f"LoRA weight '{key}' has shape \\[4, 7\\]"):
        adapter.apply_to(model)
    assert untouched(model, before)


def test_apply_to_accepts_a_pipeline(adapter):
    class Pipeline:
        transformer = tiny_wan(seed=1)

    assert adapter.apply_to(Pipeline()).model is Pipeline.transformer


def test_push_to_hub_uploads_the_saved_folder(adapter, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False):
        calls["repo"] = (repo_id, private, exist_ok)

    def upload_folder(self, repo_id, folder_path, commit_message):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["config"] = json.loads((Path(folder_path) / "memflow_config.json").read_text())
        return "https://huggingface.co/memflow-tests/tiny-adapter/commit/abc"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    url = adapter.push_to_hub("memflow-tests/tiny-adapter", private=True)
    assert url.endswith("/commit/abc")
    assert calls["repo"] == ("memflow-tests/tiny-adapter", True, True)
    assert calls["files"] == ["README.md", "adapter_model.safetensors", "memflow_config.json"]
    assert calls["config"]["memflow"]["sma"] is True


def test_convert_cli_writes_a_diffusers_model_and_an_adapter(source, tmp_path):
    folder = published_repo(tmp_path, source)
    source.save_config(tmp_path / "base-config")
    out = tmp_path / "converted"
    assert (
        main(
            [
                "convert",
                "--base",
                str(folder / "base.pt"),
                "--lora",
                str(folder / "lora.pt"),
                "--base-config",
                str(tmp_path / "base-config"),
                "--lora-alpha",
                str(ALPHA),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    converted = WanTransformer3DModel.from_pretrained(out / "transformer")
    assert_same_model(converted, source)
    adapter = MemFlowAdapter.from_pretrained(out / "adapter")
    assert adapter.lora_alpha == ALPHA and adapter.config == MemFlowConfig.reference()
    assert load_file(out / "adapter" / "adapter_model.safetensors").keys() == (
        original_lora_to_diffusers(original_lora(source)).keys()
    )
