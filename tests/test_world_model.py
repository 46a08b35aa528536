"""The packaged narrative-world model and the ``memflow demo`` built on it."""

import json

import pytest

from memflow_adapter.cli import main
from memflow_adapter.world import WORLD_MEMORY, load_world_pipeline, make_script
from memflow_adapter.world.pipeline import PRETRAINED
from memflow_adapter.world.scoring import (
    WORLD_LAYOUTS,
    generate_script,
    mean_scores,
    score_script,
    streaming_world,
)


@pytest.fixture(scope="module")
def pipe():
    return load_world_pipeline()


def test_the_packaged_model_is_a_small_wan_transformer_with_its_training_curve(pipe):
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    assert 1e6 < parameters < 5e6
    weights = sum(path.stat().st_size for path in PRETRAINED.glob("*.safetensors"))
    assert weights < 10 * 2**20
    assert (PRETRAINED / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_packaged_model_follows_the_prompts_of_held_out_stories(pipe):
    """A regression check of the shipped weights (bench/narrative_eval.py measures them on 50
    stories): places, entering, walking and leaving entities as the prompts say."""
    streaming = streaming_world(pipe, "reference")
    scores = [
        score_script(script, (generated := generate_script(streaming, script, seed)).video,
                     generated.chunk_seconds)
        for seed, script in enumerate(make_script(seed) for seed in range(4))
    ]
    assert mean_scores(scores)["adherence"] >= ADHERENCE_FLOOR


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no trained world transformer"):
        load_world_pipeline(tmp_path)


def test_the_demo_streams_a_story_with_a_returning_entity_and_scores_every_layout(
    tmp_path, capsys
):
    assert main(["demo", "--output-dir", str(tmp_path), "--script", "3"]) == 0
    printed = capsys.readouterr().out
    script = make_script(3)
    assert all(prompt in printed for prompt in script.prompts)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["random_weights"] is False and report["prompts"] == script.prompts
    assert report["config"] == WORLD_MEMORY.to_dict()
    assert set(report["scores"]) == set(WORLD_LAYOUTS)
    assert report["returning_entity"]["name"] == script.returning.name
    assert report["num_chunks"] == 12 and report["chunks"][2]["recached"]
    assert (tmp_path / "video.mp4").stat().st_size > 1000
    assert (tmp_path / "memory_timeline.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--height", "64"], "--height apply to --model tiny-random"),
        (["--config", "full_history"], "--config must be one of"),
        (["--script", "1000"], "--script must be a held-out script seed in 0..999"),
    ],
)
def test_the_world_demo_refuses_what_does_not_apply(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--output-dir", str(tmp_path), *argv])
