"""The narrative world: scripts, rendering, exact detectors, the fixed autoencoder and text
encoder, the pipeline streaming through MemFlow, scoring, and the training dataset."""

import dataclasses

import pytest
import torch

from integrations.wan import WanIntegration
from memflow_adapter import MemFlowStreamingPipeline
from memflow_apps.shared.latents import LatentVideoDataset
from memflow_apps.world import (
    WORLD_MEMORY,
    WORLD_SEQUENCE_LENGTH,
    build_world_pipeline,
    detect,
    make_script,
    render_script,
)
from memflow_apps.world.components import PixelAutoencoder, WorldTokenizer
from memflow_apps.world.dataset import script_sample, write_dataset
from memflow_apps.world.grammar import (
    COLOURS,
    PLACES,
    SEGMENT_FRAMES,
    SHAPES,
    Entity,
    Segment,
)
from memflow_apps.world.render import entity_mask, place_background
from memflow_apps.world.scoring import (
    compare_paired,
    generate_script,
    score_script,
    streaming_world,
)


@pytest.fixture(scope="module")
def pipe():
    return build_world_pipeline(seed=0)


def test_a_script_is_fixed_by_its_seed_and_its_entity_returns_undescribed():
    script = make_script(11)
    assert script == make_script(11) and script != make_script(12)
    assert len(script.prompts) == 6 and script.num_frames == 6 * SEGMENT_FRAMES
    returning = script.returning
    described = [i for i, p in enumerate(script.prompts) if returning.description in p]
    named = [i for i, p in enumerate(script.prompts) if p.split()[0] == returning.name
             or f", {returning.name} " in p]
    assert described == [1]
    assert named == [1, 2, 5] and script.segments[5].place == script.segments[0].place


def test_an_entity_cut_by_the_frame_edge_has_a_colour_but_no_size_or_shape():
    background = place_background(PLACES["room"])
    entity = Entity("bo", "big", "red", "square")
    frame = torch.where(entity_mask(entity, 3), torch.tensor(COLOURS["red"])[:, None, None],
                        background)
    assert detect(frame * 2 - 1).looks == ("red", None, None)


def test_scattered_specks_are_no_entity_and_do_not_change_one():
    """A viewer names a blob, not noise: 32 pixels of speckle spread over the frame (each 2x2
    speck apart from the others) are no entity, and beside an entity they change nothing."""
    background = place_background(PLACES["cave"])
    specks = torch.zeros(32, 32, dtype=torch.bool)
    for row, col in [(2, 2), (2, 26), (8, 14), (14, 2), (20, 26), (26, 8), (28, 20), (26, 28)]:
        specks[row : row + 2, col : col + 2] = True
    white = torch.tensor(COLOURS["white"])[:, None, None]
    assert detect(torch.where(specks, white, background) * 2 - 1).colour is None
    entity = Entity("bo", "small", "magenta", "circle")
    frame = torch.where(entity_mask(entity, 16), torch.tensor(COLOURS["magenta"])[:, None, None],
                        background)
    with_specks = torch.where(specks & ~entity_mask(entity, 16), white, frame)
    assert detect(with_specks * 2 - 1).looks == ("magenta", "small", "circle")


def test_the_autoencoder_is_lossless_through_the_wan_integration(pipe):
    video = render_script(make_script(3)).transpose(0, 1)[None]
    latents = pipe.vae.encode_normalised(video)
    assert latents.shape == (1, 12, 24, 16, 16)
    decoded = WanIntegration(pipe.transformer).decode_latents(pipe.vae, latents)
    torch.testing.assert_close(decoded, video, rtol=0, atol=1e-6)
    assert isinstance(pipe.vae, PixelAutoencoder) and pipe.vae_scale_factor_spatial == 2


def test_prompt_embeddings_are_fixed_zero_padded_and_know_the_grammar(pipe):
    prompt = make_script(0).prompts[1]
    embeds, negative = pipe.encode_prompt(prompt, max_sequence_length=WORLD_SEQUENCE_LENGTH)
    again, _ = build_world_pipeline(seed=5).encode_prompt(prompt)
    assert negative is None and embeds.shape == (1, WORLD_SEQUENCE_LENGTH, 64)
    torch.testing.assert_close(embeds, again, rtol=0, atol=0)
    words = len(prompt.split())
    assert embeds[0, :words].abs().sum(dim=1).min() > 0 and not embeds[0, words:].any()
    tokenizer = WorldTokenizer()
    ids, _ = tokenizer([prompt + " zebra"], WORLD_SEQUENCE_LENGTH)
    assert 1 not in ids[0, :words].tolist() and ids[0, words] == 1  # "zebra" is unknown


def test_rendered_stories_score_perfectly_and_a_changed_return_is_caught():
    script = make_script(4)
    perfect = score_script(script, render_script(script), [0.01])
    assert perfect.adherence == 1.0 and perfect.return_looks and perfect.return_truth
    assert perfect.return_place
    assert perfect.first_looks and perfect.first_colour and perfect.first_size
    assert perfect.first_shape
    other_colour = next(c for c in COLOURS if c != script.returning.colour)
    changed = dataclasses.replace(script.returning, colour=other_colour)
    segments = list(script.segments)
    segments[5] = dataclasses.replace(segments[5], entity=changed)
    wrong = render_script(dataclasses.replace(script, segments=tuple(segments)))
    scores = score_script(script, wrong, [0.01])
    assert scores.adherence == 1.0 and not scores.return_looks and not scores.return_colour
    assert scores.return_size and scores.return_shape and not scores.return_truth
    assert scores.first_looks and scores.first_colour and scores.first_size
    assert scores.first_shape


def test_a_first_appearance_drawn_unlike_its_prompt_is_caught_per_attribute():
    script = make_script(4)
    other_shape = next(s for s in SHAPES if s != script.returning.shape)
    misdrawn = dataclasses.replace(script.returning, shape=other_shape)
    segments = list(script.segments)
    segments[1] = dataclasses.replace(segments[1], entity=misdrawn)
    segments[5] = dataclasses.replace(segments[5], entity=misdrawn)
    video = render_script(dataclasses.replace(script, segments=tuple(segments)))
    scores = score_script(script, video, [0.01])
    assert not scores.first_looks and not scores.first_shape
    assert scores.first_colour and scores.first_size
    # the return matches the first appearance, which is what memory is for
    assert scores.return_looks and not scores.return_truth


def test_a_paired_comparison_counts_the_stories_only_one_layout_gets_right():
    script = make_script(4)
    right = score_script(script, render_script(script), [0.01])
    wrong = dataclasses.replace(right, return_looks=False)
    layout = [right, right, right, wrong, right, right, right, right]
    baseline = [wrong, right, wrong, right, wrong, wrong, wrong, wrong]
    paired = compare_paired(layout, baseline, "return_looks")
    assert (paired.only_layout, paired.only_baseline) == (6, 1)
    assert paired.p_value == pytest.approx(2 * (1 + 7) / 2**7)  # exact two-sided sign test
    assert compare_paired(layout, layout, "return_looks").p_value == 1.0
    assert compare_paired([], [], "return_looks").p_value == 1.0
    with pytest.raises(ValueError, match="the same stories, got 8 and 7"):
        compare_paired(layout, baseline[:7], "return_looks")


@pytest.mark.slow
def test_the_world_streams_through_the_memflow_pipeline_under_every_layout(pipe):
    script = make_script(2)
    for layout in ("reference", "longlive", "window_only"):
        streaming = streaming_world(pipe, layout)
        assert isinstance(streaming, MemFlowStreamingPipeline)
        generated = generate_script(streaming, script, seed=0)
        assert generated.video.shape == (24, 3, 32, 32)
        assert len(generated.chunk_seconds) == 12
        recached = [chunk.recached for chunk in generated.output.chunks]
        assert recached == [i > 0 and i % 2 == 0 for i in range(12)]
    assert streaming.config.sink_frames == 0 and streaming.config.bank_frames == 0
    reference = streaming_world(pipe, "reference")
    assert reference.config == WORLD_MEMORY
    with pytest.raises(ValueError, match="layout must be one of"):
        streaming_world(pipe, "memflow")


def test_the_training_dataset_holds_the_rendered_scripts(pipe, tmp_path):
    write_dataset(tmp_path, videos=2, first_seed=1000)
    dataset = LatentVideoDataset(tmp_path)
    assert len(dataset) == 2
    sample = dataset[1]
    script = make_script(1001)
    assert list(sample.prompts) == script.prompts
    assert sample.segment_starts.tolist() == script.segment_starts
    video = render_script(script).transpose(0, 1)[None]
    torch.testing.assert_close(sample.latents, pipe.vae.encode_normalised(video)[0])
    assert sample.prompt_embeds.shape == (6, WORLD_SEQUENCE_LENGTH, 64)
    torch.testing.assert_close(sample.latents, script_sample(pipe, 1001).latents)
    with pytest.raises(ValueError, match="first_seed must be >= 1000"):
        write_dataset(tmp_path, videos=1, first_seed=3)


def test_segments_carry_the_place_entity_and_action():
    segment = make_script(0).segments[3]
    assert isinstance(segment, Segment) and segment.action == "walks"
    assert segment.entity.description in segment.prompt
