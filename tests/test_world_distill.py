"""streaming_long_tuning on the narrative world (``memflow_apps/world/distill.yaml``): the
packaged many-step model as teacher, student start and critic start through the recipe's
``model.pipeline`` / ``dmd.teacher`` factories; scores streamed with the memory of the student's
video; the student exported with its sampling and streamed like any world model."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import memflow_apps.world as world
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_apps.shared.latents import DatasetError, LatentVideoDataset, VideoLatents
from memflow_apps.shared.prompts import load_prompt_groups
from memflow_apps.world import load_world_pipeline, make_script
from memflow_apps.world.dataset import write_dataset, write_prompt_groups
from memflow_apps.world.export import export
from memflow_apps.world.pipeline import WORLD_MODEL_DIR, WorldSampling
from memflow_apps.world.scoring import generate_script, streaming_world
from recipes import streaming_long_tuning
from recipes.config import ConfigError, load_config
from recipes.flow import StepRandomness
from recipes.models import trained_state_dict
from recipes.streaming_long_tuning import (
    RolloutConfig,
    StreamingLongTuning,
    StreamingLongTuningConfig,
)
from recipes.training import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

DISTILL_YAML = Path(world.__file__).with_name("distill.yaml")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompt_groups(tmp_path_factory.mktemp("prompts") / "world.jsonl", videos=4)


def distill(prompts, output_dir, *extra):
    """Run the packaged distillation config on one video per step, the student updated at every
    step; returns the recipe object (its models are the trained ones) with ``initial``."""
    runs = []

    class Recorded(StreamingLongTuning):
        def __init__(self, *args):
            super().__init__(*args)
            self.initial = {n: trained_state_dict(t.model) for n, t in self.trainables().items()}
            runs.append(self)

    main("streaming_long_tuning", StreamingLongTuningConfig, Recorded, [
        "--config", str(DISTILL_YAML), f"data.prompts={prompts}",
        f"training.output_dir={output_dir}", "rollout.batch_size=1",
        "dmd.generator_update_every=1", "training.checkpoint_every=2", *extra,
    ])
    AcceleratorState._reset_state(reset_partial_state=True)
    return runs[0]


def assert_same_weights(actual, expected):
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


@pytest.fixture(scope="module")
def distilled(prompts, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("distilled")
    recipe = distill(prompts, output_dir, "training.max_steps=4")
    yield recipe, output_dir
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_prompt_file_holds_each_training_scripts_six_prompts(prompts):
    groups = load_prompt_groups(prompts)
    seeds = range(1000, 1004)
    assert [group.id for group in groups] == [f"script-{seed:07d}" for seed in seeds]
    assert [list(group.prompts) for group in groups] == [make_script(s).prompts for s in seeds]
    with pytest.raises(ValueError, match="first_seed must be >= 1000"):
        write_prompt_groups(prompts.with_name("held_out.jsonl"), videos=2, first_seed=0)


@pytest.mark.slow
def test_dmd_steps_train_the_student_and_the_critic_not_the_teachers(distilled):
    recipe, _ = distilled
    packaged = load_world_pipeline().transformer.state_dict()
    # student, critic and teachers all start as the packaged model
    assert_same_weights(recipe.initial["student"], packaged)
    student = trained_state_dict(recipe.student.model)
    assert all(not torch.equal(student[key], packaged[key]) for key in packaged)
    assert_same_weights(recipe.teacher.state_dict(), packaged)
    assert_same_weights(recipe.teacher_without_bank.state_dict(), packaged)
    critic = recipe.critic.state_dict()
    base = {key.replace(".base_layer", ""): value for key, value in critic.items()
            if "lora_" not in key}
    assert_same_weights(base, packaged)
    lora_b = [key for key in critic if "lora_B" in key]
    assert lora_b and all(critic[key].abs().sum() > 0 for key in lora_b)
    # the teachers score with the world memory: the dense layout, and without the NAM bank
    assert recipe.scorers["teacher"].config == world.WORLD_MEMORY
    assert recipe.scorers["teacher_without_bank"].config.bank_frames == 0
    rows = [json.loads(line) for line in (distilled[1] / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("student_loss" in row and "critic_loss" in row for row in rows)


def test_a_distillation_of_a_model_in_training_starts_every_model_from_its_checkpoint(
    prompts, distilled, tmp_path
):
    """``model.student_weights`` and ``dmd.teacher_weights`` on a recipe checkpoint: the model
    being distilled is a run's checkpoint, not the packaged one."""
    checkpoint = distilled[1] / "checkpoints" / "checkpoint-2"
    weights = load_file(checkpoint / "student_weights.safetensors")
    recipe = distill(prompts, tmp_path, "training.max_steps=1",
                     f"model.student_weights={checkpoint}", f"dmd.teacher_weights={checkpoint}")
    assert_same_weights(recipe.initial["student"], weights)
    assert_same_weights(recipe.teacher.state_dict(), weights)
    assert_same_weights(recipe.teacher_without_bank.state_dict(), weights)
    critic = {key.replace(".base_layer", ""): value
              for key, value in recipe.critic.state_dict().items() if "lora_" not in key}
    assert_same_weights(critic, weights)


@pytest.mark.slow
def test_resuming_the_distillation_continues_bit_identically(prompts, distilled, tmp_path):
    straight, output_dir = distilled
    resumed = distill(prompts, tmp_path, "training.max_steps=4",
                      f"training.resume_from={output_dir / 'checkpoints' / 'checkpoint-2'}")
    for name, trainable in straight.trainables().items():
        assert_same_weights(trained_state_dict(resumed.trainables()[name].model),
                            trained_state_dict(trainable.model))


@pytest.mark.slow
def test_the_exported_student_streams_with_its_own_sampling(distilled, tmp_path):
    recipe, output_dir = distilled
    sampling = WorldSampling(recipe.config.schedule, guidance_scale=1.0)
    folder = export(output_dir / "adapter", tmp_path / "student", sampling)
    pipe = load_world_pipeline(folder)
    assert pipe.sampling == sampling
    assert_same_weights(pipe.transformer.state_dict(), trained_state_dict(recipe.student.model))
    streaming = streaming_world(pipe, "reference_sma")
    assert streaming.schedule.steps == (1000, 750, 500, 250) and streaming.schedule.stochastic
    script = make_script(3)
    generated = generate_script(streaming, script, seed=3)
    assert generated.video.shape == (script.num_frames, 3, 32, 32)
    assert torch.isfinite(generated.video).all()


@pytest.mark.slow
def test_the_packaged_student_streams_a_story_in_four_steps_without_guidance():
    pipe = world.load_world_student()
    assert pipe.sampling == WorldSampling(
        FlowMatchSchedule((1000, 750, 500, 250), shift=2.0, stochastic=True), guidance_scale=1.0
    )
    script = make_script(3)
    generated = generate_script(streaming_world(pipe, "reference_sma"), script, seed=3)
    assert generated.video.shape == (script.num_frames, 3, 32, 32)
    assert generated.video.abs().max() <= 1  # decoded to pixels in [-1, 1]
    again = generate_script(streaming_world(pipe, "reference_sma"), script, seed=3)
    assert torch.equal(generated.video, again.video)  # its re-noising draws are seeded


def test_a_model_folder_without_a_sampling_file_samples_as_the_many_step_model(tmp_path):
    assert load_world_pipeline(WORLD_MODEL_DIR).sampling == WorldSampling()
    (tmp_path / "sampling.json").write_text('{"schedule": {"steps": [1000]}}')
    with pytest.raises(ValueError, match="not a world sampling file"):
        WorldSampling.load(tmp_path)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        WorldSampling(guidance_scale=0.5)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"clip_segment_weights": (1.0, 2.0)}, "clip_segment_weights must be 6 weights"),
    ({"clip_segment_weights": (0.0,) * 6}, "not all 0"),
    ({"clip_segment_weights": (1.0,) * 6, "gradient_chunks": 3},
     "so that the clip lies inside prompt segment 0"),
    ({"sma_share": 1.5}, "sma_share must be a probability"),
])
def test_rollout_options_that_do_not_fit_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RolloutConfig(**{"num_chunks": 12, "gradient_chunks": 2, "chunks_per_prompt": 2,
                         **overrides})


def test_memory_guidance_needs_streamed_scores(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main("streaming_long_tuning", StreamingLongTuningConfig, StreamingLongTuning, [
            "--config", str(DISTILL_YAML), "dmd.scoring=clip", f"training.output_dir={tmp_path}",
        ])
    assert "memory_guidance_scale must be 1 unless scoring is 'streaming'" in (
        capsys.readouterr().err
    )


def test_clip_segments_are_drawn_by_weight_and_the_rollout_stops_after_the_clip(prompts):
    """Over many steps' draws every weighted segment holds the clip and no segment of weight 0
    does; the plan ends with the clip; ``sma_share`` turns SMA on in some steps' rollouts."""
    config = load_config(StreamingLongTuningConfig, DISTILL_YAML, [
        f"data.prompts={prompts}", "rollout.batch_size=1",
        "rollout.clip_segment_weights=[0, 1, 0, 1, 0, 2]", "rollout.sma_share=0.5",
    ])
    recipe = StreamingLongTuning(config, Accelerator(cpu=True))
    segments, sma_steps = set(), 0
    for step in range(40):
        videos = recipe._sample(StepRandomness.for_step(0, step, 0))
        segment = videos.clip_chunks[0].segment
        assert [chunk.segment for chunk in videos.clip_chunks] == [segment, segment]
        assert videos.chunks[-1].index == 2 * segment + 1  # the segment's last chunk
        assert videos.memory.cache_layout == world.WORLD_MEMORY
        segments.add(segment)
        sma_steps += videos.memory.sma
    assert segments == {1, 3, 5}
    assert 5 < sma_steps < 35


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """Three training scripts as a latent dataset (their frames and prompts)."""
    return write_dataset(tmp_path_factory.mktemp("scripts"), videos=3)


def regressing_recipe(dataset, weight=1.0):
    config = load_config(StreamingLongTuningConfig, DISTILL_YAML, [
        "data.prompts=null", f"data.dataset={dataset}", f"dmd.regression_weight={weight}",
        "rollout.batch_size=1",
    ])
    recipe = StreamingLongTuning(config, Accelerator(cpu=True))
    recipe.prepared = {"student": recipe.student.model, "critic": recipe.critic}
    return recipe


def test_with_a_dataset_each_rollout_follows_a_videos_prompts_and_regresses_to_its_clip(scripts):
    recipe = regressing_recipe(scripts)
    videos = list(LatentVideoDataset(scripts))
    assert recipe.groups == [list(video.prompts) for video in videos]
    for step in range(8):
        drawn = recipe._sample(StepRandomness.for_step(0, step, 0))
        clip = slice(drawn.clip_chunks[0].start, drawn.clip_chunks[-1].stop)
        followed = [v for v in videos if torch.equal(drawn.targets[0], v.latents[:, clip])]
        assert len(followed) == 1
        for segment, condition in enumerate(drawn.conditions):
            assert torch.equal(condition.embeds, recipe.embeds[followed[0].prompts[segment]])


@pytest.mark.slow
def test_the_regression_adds_its_weight_times_half_the_mse_of_the_rollouts_clip_to_the_video(
    scripts, monkeypatch
):
    """The student's step loss is DMD's plus ``weight * 0.5 * mse(clip, video's clip)``, the
    clip being the student's own (replayed) rollout."""
    recipe = regressing_recipe(scripts)
    rollouts, rollout = [], streaming_long_tuning.self_forcing_rollout

    def recorded(*args):
        rollouts.append(rollout(*args))
        return rollouts[-1]

    monkeypatch.setattr(streaming_long_tuning, "self_forcing_rollout", recorded)

    def step_loss(weight):
        dmd = dataclasses.replace(recipe.config.dmd, regression_weight=weight)
        recipe.config = dataclasses.replace(recipe.config, dmd=dmd)
        return float(recipe.train_phase("student", 0, StepRandomness.for_step(0, 5, 0)))

    dmd_alone, weighted_1, weighted_2 = step_loss(0.0), step_loss(1.0), step_loss(2.0)
    videos = recipe._sample(StepRandomness.for_step(0, 5, 0))
    assert all(torch.equal(r.video, rollouts[0].video) for r in rollouts)  # one rollout, thrice
    clip = videos.clip_of(rollouts[0].video).double()
    half_mse = 0.5 * torch.mean((clip - videos.targets.double()) ** 2).item()
    assert half_mse > 0
    # the replayed clip is the rollout's exit pass again, with gradient (float32 forward)
    assert weighted_1 - dmd_alone == pytest.approx(half_mse, rel=1e-4)
    assert weighted_2 - dmd_alone == pytest.approx(2 * half_mse, rel=1e-4)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.dataset=data/world"], "data.prompts must be null when data.dataset is given"),
    (["dmd.regression_weight=1"], "dmd.regression_weight must be 0 unless data.dataset"),
    (["data.prompts=null", "data.dataset=data/world", "dmd.regression_weight=-1"],
     "dmd.regression_weight must be >= 0"),
])
def test_regression_options_that_do_not_fit_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(StreamingLongTuningConfig, DISTILL_YAML, overrides)


def test_dataset_videos_without_prompt_texts_or_of_another_layout_are_refused(
    scripts, tmp_path
):
    video = next(iter(LatentVideoDataset(scripts)))
    VideoLatents(video.latents, video.prompt_embeds, video.segment_starts).save(
        tmp_path / "untitled" / "0.safetensors"
    )
    with pytest.raises(DatasetError, match="holds 0 prompt texts .* for its 6 segments"):
        regressing_recipe(tmp_path / "untitled")
    VideoLatents(video.latents, video.prompt_embeds, torch.arange(0, 12, 2),
                 video.prompts).save(tmp_path / "segments_of_two_frames" / "0.safetensors")
    recipe = regressing_recipe(tmp_path / "segments_of_two_frames")
    with pytest.raises(DatasetError, match=r"segments start where the rollout's do \(\[0, 4"):
        recipe._sample(StepRandomness.for_step(0, 0, 0))
