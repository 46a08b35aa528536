"""A trained, exported narrative-world model in use: ``memflow demo --model world`` and the
scoring harness of ``bench/narrative_eval.py``. Most tests use a model a few recipe steps old and
check the plumbing; the ``make demo`` test streams the packaged trained model (its benchmark
scores are in the world README)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

import memflow_apps.world as world
from memflow_apps.cli.main import main
from memflow_apps.world import WORLD_MEMORY, load_world_pipeline, make_script
from memflow_apps.world.dataset import write_dataset
from memflow_apps.world.export import export
from memflow_apps.world.heldout import HeldOutBenchmark
from memflow_apps.world.pipeline import (
    WORLD_GUIDANCE_SCALE,
    WORLD_MODEL_DIR,
    WORLD_SCHEDULE,
    WorldSampling,
)
from memflow_apps.world.scoring import WORLD_LAYOUTS, generate_script, streaming_world
from recipes.memory_finetune import cli as memory_finetune

TRAIN_YAML = Path(world.__file__).with_name("train.yaml")
BENCH = Path(__file__).parents[1] / "bench" / "narrative_eval.py"
#: The share of (chunk, layer) banks a quantized cache must keep as they are unquantized; the
#: measured shares are in the world README (bench/quantized_world.py).
QUANTIZED_BANK_AGREEMENT = {"float8_e4m3fn": 0.9, "int8": 0.9}


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """The world model after 2 steps of the packaged training config, exported."""
    root = tmp_path_factory.mktemp("world-model")
    dataset = write_dataset(root / "data", videos=2)
    adapter = memory_finetune([
        "--config", str(TRAIN_YAML), f"data.dataset={dataset}", f"training.output_dir={root}",
        "training.max_steps=2",
    ])
    AcceleratorState._reset_state(reset_partial_state=True)
    return export(adapter, root / "model")


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no trained world transformer"):
        load_world_pipeline(tmp_path)


@pytest.mark.slow
def test_the_world_demo_streams_a_story_and_scores_every_layout(world_model, tmp_path, capsys):
    argv = ["demo", "--model", "world", "--world-model", str(world_model), "--script", "3",
            "--guidance-scale", "1.5", "--cache-dtype", "int8", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    script = make_script(3)
    assert all(prompt in printed for prompt in script.prompts)
    # the layout is named with the world's own sizes, and the columns are explained
    layout = "'reference' memory layout (sink 2, bank 4, local 4, 2-frame chunks, int8 cache;"
    assert layout in printed
    assert "return = script: back as the script describes it" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layout_sizes"] == "sink 2, bank 4, local 4, 2-frame chunks, int8 cache"
    assert report["config"]["cache_dtype"] == "int8"
    assert report["random_weights"] is False and report["prompts"] == script.prompts
    expected = dataclasses.replace(WORLD_MEMORY, cache_dtype="int8").to_dict()
    assert report["config"] == expected and report["guidance_scale"] == 1.5
    assert set(report["scores"]) == set(WORLD_LAYOUTS)
    assert report["returning_entity"]["name"] == script.returning.name
    assert report["num_chunks"] == 12 and report["chunks"][2]["recached"]
    assert (tmp_path / "video.mp4").stat().st_size > 1000
    assert (tmp_path / "memory_timeline.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_make_demo_streams_its_held_out_benchmarks_first_story_and_prints_its_rates(
    tmp_path, capsys
):
    """``make demo`` runs ``memflow demo`` without options: the packaged model streams the first
    story of its held-out benchmark (a rule, not a story memory wins), beside the benchmark."""
    assert main(["demo", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    benchmark = HeldOutBenchmark.read(WORLD_MODEL_DIR)
    story = benchmark.demo_story
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == f"narrative world ({WORLD_MODEL_DIR})"
    assert report["random_weights"] is False and report["script_seed"] == story
    edition = WorldSampling.load(WORLD_MODEL_DIR).edition
    assert report["prompts"] == make_script(story, edition).prompts
    assert report["guidance_scale"] == WORLD_GUIDANCE_SCALE
    assert report["seed"] == story  # the benchmark's noise for the story
    assert (tmp_path / "video.mp4").stat().st_size > 1000
    assert f"the first of the {len(benchmark.seeds)} stories of this model's held-out" in printed
    assert all(line in printed for line in benchmark.summary())
    # a trained model: it follows the story's places and most of its checks
    reference = report["scores"]["reference"]
    assert reference["return_place"] and reference["adherence"] >= 0.7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--world-model", "x", "--height", "64"], "--height apply to --model tiny-random"),
        (["--world-model", "x", "--config", "full_history"], "--config must be one of"),
        (["--world-model", "x", "--script", "1000"], "--script must be a held-out script seed"),
        (["--world-model", "nowhere"], "holds no trained world transformer"),
        (["--world-model", "x", "--chunks", "4"], "--chunks applies to --model tiny-random"),
        (["--world-model", "x", "--guidance-scale", "0.5"], "--guidance-scale must be >= 1"),
        (["--world-model", "x", "--guidance-scale", "inf"], "--guidance-scale must be >= 1 and "
         "finite"),
    ],
)
def test_the_world_demo_refuses_what_does_not_apply(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--model", "world", "--output-dir", str(tmp_path), *argv])


def test_world_options_are_refused_for_the_random_demo(tmp_path):
    argv = ["--script", "3", "--guidance-scale", "2", "--world-model", "x"]
    with pytest.raises(SystemExit, match="--world-model, --script, --guidance-scale apply to "
                       "--model world"):
        main(["demo", "--model", "tiny-random", *argv, "--output-dir", str(tmp_path)])


@pytest.mark.slow
def test_the_benchmark_prints_a_row_per_memory_layout(world_model, tmp_path):
    """With the stories past a shortened RoPE table and a quantized cache, recorded as such."""
    table = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--models", str(world_model), "--scripts", "1",
         "--first-seed", "7", "--rope-frames", "10", "--position-overflow", "clamp",
         "--cache-dtype", "int8", "--threads", "1", "--json", str(table)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    means, paired = result.stdout.split("Story by story against window_only")
    rows = [line for line in means.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows[2:]] == list(WORLD_LAYOUTS)
    rows = [line for line in paired.splitlines() if line.startswith("| ")]
    memory_layouts = [layout for layout in WORLD_LAYOUTS if layout != "window_only"]
    assert [row.split(" | ")[0][2:] for row in rows[2:]] == memory_layouts
    scores = json.loads(table.read_text())
    assert scores["seeds"] == [7, 7]
    assert scores["models"] == {"model": {"steps": list(WORLD_SCHEDULE.steps),
                                          "stochastic": False,
                                          "guidance_scale": WORLD_GUIDANCE_SCALE,
                                          "edition": "v1"}}
    assert scores["rope_frames"] == 10 and "through a 10-frame RoPE table" in means
    assert scores["config_overrides"] == {"position_overflow": "clamp", "cache_dtype": "int8"}
    assert all(0.0 <= scores["layouts"][layout]["adherence"] <= 1.0 for layout in WORLD_LAYOUTS)
    for layout in WORLD_LAYOUTS:  # the mean of one story is that story
        assert scores["stories"][layout][0]["adherence"] == scores["layouts"][layout]["adherence"]
    for layout in memory_layouts:  # one story: each check holds with one layout at most
        looks = scores["paired_against_window_only"][layout]["return_looks"]
        assert looks["only_layout"] + looks["only_baseline"] <= 1 and looks["p_value"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("cache_dtype", ["float8_e4m3fn", "int8"])
def test_a_quantized_cache_keeps_nams_picks_on_held_out_stories(cache_dtype):
    """The packaged model, the reference layout, two held-out stories: NAM's banks (every chunk,
    every layer) under a quantized cache hold the frames they hold unquantized in at least
    QUANTIZED_BANK_AGREEMENT of the cases (bench/quantized_world.py measures 50 stories)."""
    pipe = load_world_pipeline(WORLD_MODEL_DIR)
    same = total = 0
    for seed in (300, 301):
        script = make_script(seed)
        banks = [
            [chunk.bank for chunk in generate_script(streaming_world(pipe, "reference", **extra),
                                                     script, seed).output.trace]
            for extra in ({}, {"cache_dtype": cache_dtype})
        ]
        pairs = [(q[layer], e[layer]) for e, q in zip(*banks, strict=True) for layer in e]
        same, total = same + sum(a == b for a, b in pairs), total + len(pairs)
    assert same / total >= QUANTIZED_BANK_AGREEMENT[cache_dtype]
