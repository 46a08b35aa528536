"""Prompt-group files (JSONL, JSON, text) and matching video files to groups."""

import json

import pytest

from memflow_apps.shared.prompts import (
    PromptFileError,
    PromptGroup,
    load_prompt_groups,
    match_videos,
    parse_prompt_groups,
    sanitize_id,
    save_prompt_groups,
)
from memflow_apps.shared.tiny_scorers import SAMPLE_PROMPTS

FIXTURE = SAMPLE_PROMPTS


def prompts_of(groups):
    return [list(group.prompts) for group in groups]


def test_the_shipped_sample_has_narrative_groups_of_six_prompts():
    groups = load_prompt_groups(FIXTURE)
    ids = ["fox_in_snow", "lighthouse_storm", "chef_market", "paper_boat"]
    assert [g.id for g in groups] == ids
    assert [g.index for g in groups] == [0, 1, 2, 3]
    assert all(len(g.prompts) == 6 for g in groups)
    assert groups[0].prompts[0] == "a red fox walks slowly through a snowy forest in the morning"


def test_jsonl_accepts_the_usual_keys_plain_lists_and_prompt_objects():
    text = "\n".join(
        [
            json.dumps({"prompts": ["a", "b"]}),
            json.dumps({"name": "second", "prompt_list": ["c", "d"]}),
            "",
            "# a comment line",
            json.dumps(["e", "f", "g"]),
            json.dumps({"idx": 7, "texts": [{"text": "h"}, {"prompt": "i"}]}),
            json.dumps({"story": "ignored", "shots": ["j", "k"]}),  # the only list of strings
        ]
    )
    groups = parse_prompt_groups(text)
    assert [g.id for g in groups] == ["000", "second", "002", "7", "004"]
    assert prompts_of(groups) == [["a", "b"], ["c", "d"], ["e", "f", "g"], ["h", "i"], ["j", "k"]]
    assert [g.index for g in groups] == [0, 1, 2, 3, 4]


def test_jsonl_may_start_with_comment_lines():
    text = '# the benchmark\n\n{"prompts": ["a"]}\n["b", "c"]\n'
    assert prompts_of(parse_prompt_groups(text)) == [["a"], ["b", "c"]]


def test_a_json_document_may_hold_a_list_of_groups_or_one_group():
    as_list = json.dumps([{"id": "x", "prompts": ["a", "b"]}, ["c"]], indent=2)
    assert prompts_of(parse_prompt_groups(as_list)) == [["a", "b"], ["c"]]
    wrapped = json.dumps({"groups": [{"prompts": ["a"]}, {"prompts": ["b"]}]}, indent=2)
    assert len(parse_prompt_groups(wrapped)) == 2
    single = json.dumps({"id": "only", "prompts": ["a", "b", "c"]}, indent=2)
    assert [(g.id, len(g.prompts)) for g in parse_prompt_groups(single)] == [("only", 3)]
    assert prompts_of(parse_prompt_groups('["a", "b"]')) == [["a", "b"]]


def test_text_lines_hold_one_group_with_pipe_separated_prompts():
    text = "# groups\na fox | a boat |a bird\n[sea] waves | calm water\n"
    groups = parse_prompt_groups(text)
    assert [g.id for g in groups] == ["000", "sea"]
    assert prompts_of(groups) == [["a fox", "a boat", "a bird"], ["waves", "calm water"]]


def test_text_blocks_separated_by_blank_lines_hold_one_prompt_per_line():
    text = "a fox\na boat\n\n\n[city]\na street\na bus\n\n# trailing comment\n"
    groups = parse_prompt_groups(text)
    assert [g.id for g in groups] == ["000", "city"]
    assert prompts_of(groups) == [["a fox", "a boat"], ["a street", "a bus"]]
    named_single_block = "[only]\nfirst prompt\nsecond prompt\n"
    expected = [["first prompt", "second prompt"]]
    assert prompts_of(parse_prompt_groups(named_single_block)) == expected
    spaced_lines = "a | b\n\nc | d\n"  # blocks of single lines are read line by line
    assert prompts_of(parse_prompt_groups(spaced_lines)) == [["a", "b"], ["c", "d"]]


def test_ids_are_made_file_name_safe():
    assert sanitize_id(" scene 1/take:2 ") == "scene_1_take_2"
    assert sanitize_id(12) == "12"
    groups = parse_prompt_groups(json.dumps({"id": "a b/c", "prompts": ["x"]}))
    assert groups[0].id == "a_b_c"
    with pytest.raises(ValueError):
        sanitize_id("///")
    with pytest.raises(ValueError, match="file-name safe"):
        PromptGroup("a/b", ("x",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ('{"prompts": ["a"]}\n{"prompts": ["b"]\n', r":2: not valid JSON"),
        ('{"id": "x", "prompts": ["a"]}\n{"id": "x", "prompts": ["b"]}\n', "duplicate group id"),
        ('{"prompts": ["a", ""]}\n{"prompts": ["b"]}', "non-empty string"),
        ('{"prompts": []}\n{"prompts": ["b"]}', "no prompts"),
        ('{"title": "x", "count": 3}\n{"prompts": ["b"]}', "no list of prompts"),
        ("a | | b\n", "empty prompt"),
    ],
)
def test_bad_prompt_files_are_refused_with_the_line(text, message):
    with pytest.raises(PromptFileError, match=message):
        parse_prompt_groups(text, source="groups.jsonl")


def test_a_missing_file_is_a_prompt_file_error(tmp_path):
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompt_groups(tmp_path / "nope.jsonl")


def test_groups_round_trip_through_jsonl(tmp_path):
    groups = load_prompt_groups(FIXTURE)
    path = save_prompt_groups(groups, tmp_path / "out" / "groups.jsonl")
    assert load_prompt_groups(path) == groups


def test_videos_match_groups_by_id_index_or_official_name():
    groups = parse_prompt_groups('{"id": "fox", "prompts": ["a"]}\n["b"]\n["c"]\n')
    assert [g.id for g in groups] == ["fox", "001", "002"]
    paths = [
        "v/fox.mp4",
        "v/001.mp4",
        "v/rank0-2-0_lora.mp4",  # the official scripts: rank{r}-{line index}-{sample}_{model}
        "v/rank1-2-1_lora.mp4",
        "v/2.mp4",  # a bare index
        "v/notes.mp4",
    ]
    matches, unmatched = match_videos(groups, paths)
    assert sorted((p.name, g.id) for p, g in matches) == [
        ("001.mp4", "001"),
        ("2.mp4", "002"),
        ("fox.mp4", "fox"),
        ("rank0-2-0_lora.mp4", "002"),
        ("rank1-2-1_lora.mp4", "002"),
    ]
    assert [p.name for p in unmatched] == ["notes.mp4"]


def test_an_id_pattern_extracts_the_key_from_the_file_name():
    groups = parse_prompt_groups('{"id": "fox", "prompts": ["a"]}\n["b"]\n')
    named = match_videos(groups, ["seed3_fox_final.mp4", "seed3_1_final.mp4", "x.mp4"],
                         r"seed\d+_(?P<id>\w+?)_final")
    assert [(p.name, g.id) for p, g in named[0]] == [
        ("seed3_1_final.mp4", "001"),
        ("seed3_fox_final.mp4", "fox"),
    ]
    assert [p.name for p in named[1]] == ["x.mp4"]
    unnamed = match_videos(groups, ["video-fox.mp4"], r"video-(\w+)")
    assert [g.id for _, g in unnamed[0]] == ["fox"]
