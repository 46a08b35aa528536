"""The narrative world's editions: v1 (the packaged models' world) is unchanged by the second
edition; v2 draws shapes and sizes that differ by whole tokens over backgrounds with a position
cue, its detectors are exact, its stories score perfectly when rendered, and a model is scored only
on scripts of its own edition."""

import dataclasses
import hashlib
import itertools
from pathlib import Path

import pytest
import torch

from memflow_apps.world import build_world_pipeline, detect, make_script, render_script
from memflow_apps.world.components import WorldTextEncoder, WorldTokenizer
from memflow_apps.world.dataset import script_sample
from memflow_apps.world.grammar import (
    COLOURS,
    EDITIONS,
    PLACES,
    Entity,
    vocabulary,
    world_edition,
)
from memflow_apps.world.pipeline import WorldSampling
from memflow_apps.world.render import TOKEN_PIXELS, entity_mask, place_background
from memflow_apps.world.scoring import generate_script, score_script, streaming_world

#: sha256 of the v1 renders of stories 0, 18 and 999, taken before the second edition existed.
V1_RENDERS_SHA256 = "c6610c0bf74e65476d6b86316db66cfdac521156363436bd4b32c30a7618db64"
#: The grammar's words before the second edition existed, in their order (their token ids).
V1_VOCABULARY = [
    "an", "empty", "a", ",", "enters", "the", "leaves", "in", "walks", "back", "comes",
    "small", "big", "red", "yellow", "magenta", "white", "black", "cyan", "square", "circle",
    "triangle", "room", "field", "desert", "cave", "garden", "bo", "kip", "zed", "mia", "tok",
    "lux", "rin", "pim", "dax", "nel", "oru", "vix",
]


def _frame(entity: Entity, place: str, edition: str) -> torch.Tensor:
    world = EDITIONS[edition]
    background = place_background(PLACES[place], edition=world)
    mask = entity_mask(entity, 16, edition=world)
    return torch.where(mask, torch.tensor(COLOURS[entity.colour])[:, None, None], background)


def test_the_first_edition_renders_and_words_are_unchanged():
    renders = torch.cat([render_script(make_script(seed)) for seed in (0, 18, 999)])
    assert hashlib.sha256(renders.numpy().tobytes()).hexdigest() == V1_RENDERS_SHA256
    assert make_script(18) == make_script(18, "v1")
    assert vocabulary()[: len(V1_VOCABULARY)] == V1_VOCABULARY
    # a word keeps its embedding row whatever the vocabulary's length
    tokens = len(WorldTokenizer())
    small, full = WorldTextEncoder(len(V1_VOCABULARY) + 2), WorldTextEncoder(tokens)
    torch.testing.assert_close(
        full.embedding.weight[: len(V1_VOCABULARY) + 2], small.embedding.weight, rtol=0, atol=0
    )


def test_a_v2_script_is_the_v1_story_with_v2_shapes():
    for seed in range(50):
        first, second = make_script(seed, "v1"), make_script(seed, "v2")
        assert second.edition == "v2" and first.edition == "v1"
        for old, new in zip(first.segments, second.segments, strict=True):
            assert old.place == new.place and old.action == new.action
            if old.entity is not None:
                assert (old.entity.name, old.entity.colour, old.entity.size) == (
                    new.entity.name, new.entity.colour, new.entity.size)
                assert new.entity.shape in ("block", "bar", "pole")
    with pytest.raises(ValueError, match=r"edition must be one of \['v1', 'v2'\], got 'v3'"):
        make_script(0, "v3")


def test_v2_entities_cover_whole_tokens_and_differ_by_whole_tokens():
    world = world_edition("v2")
    masks = {}
    for size, shape in itertools.product(world.size_pixels, world.shapes):
        mask = entity_mask(Entity("bo", size, "red", shape), 16, edition=world)
        tokens = mask.view(8, TOKEN_PIXELS, 8, TOKEN_PIXELS).permute(0, 2, 1, 3).flatten(2)
        # every token is wholly inside or wholly outside the entity
        assert bool((tokens.all(dim=2) | ~tokens.any(dim=2)).all()), (size, shape)
        masks[size, shape] = tokens.all(dim=2)
    for (a, mask_a), (b, mask_b) in itertools.combinations(masks.items(), 2):
        assert not torch.equal(mask_a, mask_b), (a, b)
    assert masks["big", "block"].sum() == 16 and masks["small", "block"].sum() == 4
    assert masks["big", "bar"].sum() == masks["big", "pole"].sum() == 8


def test_v2_backgrounds_carry_a_position_cue_that_v1_backgrounds_lack():
    room = PLACES["room"]
    v1, v2 = place_background(room), place_background(room, edition=world_edition("v2"))
    assert torch.equal(v1[:, 0, 0], v1[:, -1, -1])
    red_down = v2[0, -1, 0] - v2[0, 0, 0]
    blue_right = v2[2, 0, -1] - v2[2, 0, 0]
    torch.testing.assert_close(red_down, torch.tensor(0.16), rtol=0, atol=1e-6)
    torch.testing.assert_close(blue_right, torch.tensor(0.16), rtol=0, atol=1e-6)
    torch.testing.assert_close(v2[1], v1[1], rtol=0, atol=0)


@pytest.mark.parametrize("edition", sorted(EDITIONS))
def test_the_detectors_read_every_place_and_entity_of_an_edition_exactly(edition):
    world = EDITIONS[edition]
    for place, colour, size, shape in itertools.product(
        PLACES, COLOURS, world.size_pixels, world.shapes
    ):
        found = detect(_frame(Entity("bo", size, colour, shape), place, edition) * 2 - 1, edition)
        assert (found.place, *found.looks) == (place, colour, size, shape)
        background = place_background(PLACES[place], edition=world)
        assert detect(background * 2 - 1, edition).colour is None


def test_rendered_v2_stories_score_perfectly_and_a_wrong_shape_is_caught():
    script = make_script(4, "v2")
    perfect = score_script(script, render_script(script), [0.01])
    assert perfect.adherence == 1.0 and perfect.return_looks and perfect.first_looks
    assert perfect.return_truth and perfect.return_place
    wrong_shape = next(s for s in ("block", "bar", "pole") if s != script.returning.shape)
    segments = list(script.segments)
    returned = dataclasses.replace(script.returning, shape=wrong_shape)
    segments[5] = dataclasses.replace(segments[5], entity=returned)
    video = render_script(dataclasses.replace(script, segments=tuple(segments)))
    scores = score_script(script, video, [0.01])
    assert scores.adherence == 1.0 and scores.first_looks
    assert not scores.return_looks and not scores.return_shape and scores.return_colour


def test_a_model_is_scored_only_on_scripts_of_its_edition():
    pipe = build_world_pipeline(seed=0)
    assert pipe.sampling.edition == "v1"
    with pytest.raises(ValueError, match=r"script.edition must be the model's world edition 'v1'"):
        generate_script(streaming_world(pipe, "reference"), make_script(0, "v2"), seed=0)


def test_a_model_folder_records_its_edition(tmp_path: Path):
    sampling = WorldSampling(edition="v2")
    sampling.save(tmp_path)
    assert WorldSampling.load(tmp_path) == sampling
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "sampling.json").write_text(
        '{"schedule": {"steps": [1000, 500], "shift": 2.0, "stochastic": false}, '
        '"guidance_scale": 2.0}', encoding="utf-8")
    assert WorldSampling.load(legacy).edition == "v1"
    with pytest.raises(ValueError, match="edition must be one of"):
        WorldSampling(edition="v9")


def test_a_v2_training_video_is_its_render_encoded():
    pipe = build_world_pipeline(seed=0)
    sample = script_sample(pipe, 1000, "v2")
    video = render_script(make_script(1000, "v2")).transpose(0, 1)[None]
    torch.testing.assert_close(sample.latents, pipe.vae.encode_normalised(video)[0],
                               rtol=0, atol=0)
    assert sample.prompts == tuple(make_script(1000, "v2").prompts)
