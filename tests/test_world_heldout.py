"""A world model's held-out benchmark (``heldout.json`` beside its weights): the packaged models
carry theirs, measured as they sample on stories never used in training, and ``memflow demo``
reads its first story and its rates from it, refusing a file that is not one by name."""

import json
import shutil

import pytest

from memflow_apps.cli.main import main
from memflow_apps.world.heldout import HELDOUT_FILE, SUMMARY_RATES, HeldOutBenchmark
from memflow_apps.world.pipeline import WORLD_MODEL_DIR, WORLD_STUDENT_DIR, WorldSampling
from memflow_apps.world.scoring import WORLD_LAYOUTS


@pytest.mark.parametrize("model", [WORLD_MODEL_DIR, WORLD_STUDENT_DIR], ids=["model", "student"])
def test_each_packaged_model_carries_its_held_out_benchmark_as_it_samples(model):
    benchmark = HeldOutBenchmark.read(model)
    assert len(benchmark.seeds) >= 50 and benchmark.seeds.stop <= 1000  # training seeds >= 1000
    assert benchmark.demo_story == benchmark.seeds.start
    assert "reference" in benchmark.layouts and "window_only" in benchmark.layouts
    assert set(benchmark.layouts) <= set(WORLD_LAYOUTS)
    recorded = json.loads((model / HELDOUT_FILE).read_text())
    (sampled,) = recorded["models"].values()
    sampling = WorldSampling.load(model)
    assert sampled["edition"] == sampling.edition
    assert sampled["steps"] == list(sampling.schedule.steps)
    assert sampled["guidance_scale"] == sampling.guidance_scale
    assert recorded["config_overrides"] == {} and recorded["switch_offset"] == 0
    for layout, scores in benchmark.layouts.items():
        stories = recorded["stories"][layout]
        assert len(stories) == len(benchmark.seeds)
        looks = sum(story["return_looks"] for story in stories) / len(stories)
        assert scores["return_looks"] == pytest.approx(looks)


def test_the_summary_is_a_row_of_rates_per_layout():
    benchmark = HeldOutBenchmark(range(800, 850), {
        "reference": {"return_looks": 0.62, "return_colour": 0.8, "first_looks": 0.9,
                      "adherence": 0.98},
        "window_only": {"return_looks": 0.1, "return_colour": 0.3, "first_looks": 0.88,
                        "adherence": 0.97},
    })
    assert benchmark.summary() == [
        "| layout | " + " | ".join(SUMMARY_RATES.values()) + " |",
        "| --- | --- | --- | --- | --- |",
        "| reference | 62% | 80% | 90% | 98% |",
        "| window_only | 10% | 30% | 88% | 97% |",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not a bench/narrative_eval.py --json benchmark"),
        ('{"seeds": [800, 849]}', "is not a bench/narrative_eval.py --json benchmark"),
        ('{"seeds": [800, 849], "models": {"a": {}, "b": {}}, "layouts": {}}', "scores 2 models"),
        ('{"seeds": [800, 849], "models": {"a": {}}, "layouts": {"reference": {}}}',
         "lacks the rates"),
    ],
)
def test_a_file_that_is_not_a_benchmark_is_refused_by_name(content, message, tmp_path):
    (tmp_path / HELDOUT_FILE).write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        HeldOutBenchmark.read(tmp_path)
    assert str(tmp_path / HELDOUT_FILE) in str(error.value)


def test_the_demo_of_a_model_without_a_benchmark_asks_for_a_story(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(WORLD_STUDENT_DIR, model)
    (model / HELDOUT_FILE).unlink()
    with pytest.raises(SystemExit, match=f"has no {HELDOUT_FILE}.*pass --script"):
        main(["demo", "--world-model", str(model), "--output-dir", str(tmp_path / "out")])
