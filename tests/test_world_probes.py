"""The copy probes (``memflow_apps.world.probes``, ``bench/world_copy_probe.py``): each probed chunk
is the one its name says in every story, and a probe is a deterministic reading of the model."""

import math

import pytest

from memflow_adapter.streaming import plan_chunks
from memflow_apps.world import load_world_pipeline, make_script
from memflow_apps.world.grammar import SEGMENT_FRAMES
from memflow_apps.world.pipeline import WORLD_MEMORY
from memflow_apps.world.probes import PROBES, probe_story

#: Each probe's (segment of the story, chunk within the segment).
WHERE = {
    "return, bank": (5, 0),
    "return, window": (5, 1),
    "entrance, no prompt": (1, 1),
    "walker, prompt": (3, 1),
}


@pytest.mark.parametrize("edition", ["v1", "v2"])
def test_each_probe_reads_the_chunk_its_name_says(edition):
    script = make_script(100, edition)
    chunks = plan_chunks(script.segment_starts, script.num_frames, WORLD_MEMORY.frames_per_chunk)
    chunks_per_segment = SEGMENT_FRAMES // WORLD_MEMORY.frames_per_chunk
    for probe in PROBES:
        segment, within = WHERE[probe.name]
        assert chunks[probe.chunk].segment == segment
        assert probe.chunk - segment * chunks_per_segment == within
    # the return's prompt names the entity without describing it; the walker's describes it
    returning, walker = script.segments[5], script.segments[3]
    assert returning.entity.name in returning.prompt
    assert returning.entity.description not in returning.prompt
    assert walker.entity.description in walker.prompt


def test_a_probe_is_a_deterministic_reading_of_the_model():
    pipe = load_world_pipeline()
    first, second = (probe_story(pipe, "reference", 100) for _ in range(2))
    assert first == second
    # one result per probe, in the story's order
    assert [result.probe for result in first] == [
        probe.name for probe in sorted(PROBES, key=lambda probe: probe.chunk)
    ]
    assert all(math.isfinite(r.centre_error) and math.isfinite(r.place_error) for r in first)
