"""build_dataset (videos + prompts -> latents + embeddings) and the latent dataset format."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from memflow_apps.shared.latents import DatasetError, LatentVideoDataset, VideoLatents
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from recipes import build_dataset, memory_finetune

PROMPTS = ["a red fox walks in the snow", "the fox jumps across the river"]


@pytest.fixture
def pipeline_dir(tmp_path):
    folder = tmp_path / "tiny-wan"
    build_tiny_wan_pipeline(0).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_build_dataset_from_a_local_pipeline_and_an_mp4(pipeline_dir, tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (45, 72, 88, 3), dtype=np.uint8)
    iio.imwrite(tmp_path / "clip.mp4", frames, plugin="pyav", fps=12, codec="libx264")
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text(json.dumps(
        {"video": "clip.mp4", "prompts": PROMPTS, "segment_starts": [0.0, 1.25], "id": "fox"}
    ) + "\n")
    written = build_dataset.main([
        "--pipeline", str(pipeline_dir), "--manifest", str(manifest),
        "--output", str(tmp_path / "data"), "--height", "64", "--width", "64", "--fps", "8",
        "--max-sequence-length", "16",
    ])
    assert written == [tmp_path / "data" / "fox.safetensors"]
    sample = LatentVideoDataset(tmp_path / "data")[0]
    # 45 frames at 12 fps are 30 at 8 fps, cut to 29 = 4 * 7 + 1: 8 latent frames of 8x8.
    assert sample.latents.shape == (16, 8, 8, 8) and sample.prompts == tuple(PROMPTS)
    # 1.25 s at 8 fps is pixel frame 10, first covered by latent frame ceil(10 / 4) = 3.
    assert sample.segment_starts.tolist() == [0, 3]
    with torch.no_grad():
        embeds, _ = build_tiny_wan_pipeline(0).encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, max_sequence_length=16
        )
    torch.testing.assert_close(sample.prompt_embeds, embeds)

    memory_finetune.cli([
        "--tiny", f"data.dataset={tmp_path / 'data'}", f"training.output_dir={tmp_path / 'run'}",
        "training.max_steps=1", "validation.every_steps=0",
    ])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_segment_starts_default_to_equal_parts():
    assert build_dataset.latent_segment_starts(None, 3, 16.0, 10, 4) == [0, 3, 6]
    # 0.25 s and 1 s at 16 fps are pixel frames 4 and 16: latent frames ceil(4 / 4), ceil(16 / 4)
    assert build_dataset.latent_segment_starts([0.0, 0.25, 1.0], 3, 16.0, 10, 4) == [0, 1, 4]


def sample(**changes):
    values = {
        "latents": torch.zeros(16, 6, 4, 4),
        "prompt_embeds": torch.zeros(2, 8, 32),
        "segment_starts": torch.tensor([0, 3]),
        "prompts": ("one", "two"),
    }
    return VideoLatents(**{**values, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"segment_starts": torch.tensor([1, 3])}, "must start at 0 and increase strictly"),
        ({"segment_starts": torch.tensor([0, 6])}, "must be below the 6 latent frames"),
        ({"segment_starts": torch.tensor([0])}, "segment_starts has 1 entries, prompt_embeds 2"),
        ({"latents": torch.zeros(16, 6, 4)}, r"latents must be \[C, F, h, w\]"),
        ({"latents": torch.full((16, 6, 4, 4), float("nan"))}, "must be finite"),
    ],
)
def test_invalid_samples_are_refused_naming_the_file(changes, message, tmp_path):
    with pytest.raises(DatasetError, match=f"bad.safetensors: .*{message}"):
        sample(**changes).save(tmp_path / "bad.safetensors")


def test_samples_round_trip_and_foreign_files_are_refused(tmp_path):
    saved = sample().save(tmp_path / "ok.safetensors")
    loaded = VideoLatents.load(saved)
    assert loaded.segment_starts.tolist() == [0, 3] and loaded.prompts == ("one", "two")
    assert LatentVideoDataset(tmp_path).segment_prompts(0) == ("one", "two")
    save_file({"latents": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(DatasetError, match="missing tensors"):
        VideoLatents.load(tmp_path / "foreign.safetensors")
    (tmp_path / "unformatted").mkdir()
    save_file({"segment_starts": torch.tensor([0, 3])}, tmp_path / "unformatted" / "0.safetensors")
    with pytest.raises(DatasetError, match="metadata format is None, expected"):
        LatentVideoDataset(tmp_path / "unformatted").segment_prompts(0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no"):
        LatentVideoDataset(tmp_path / "empty")
