"""``memflow compare``: memories side by side on one model, on the narrative world and on prompt
groups; the retrieval score; memory names."""

import json

import pytest

from memflow_adapter import MemFlowConfig
from memflow_adapter.introspection import ChunkMemory
from memflow_apps.cli.main import main
from memflow_apps.shared import memories
from memflow_apps.shared.cli_choices import DEFAULT_MEMORIES
from memflow_apps.shared.memories import memory_config


def test_the_command_offers_every_built_in_bank_policy_by_default():
    assert DEFAULT_MEMORIES == memories.DEFAULT_MEMORIES
    assert {name for name in DEFAULT_MEMORIES if "+" not in name} - {"none"} == {
        "nam", "nam_no_sink", "recency", "uniform", "visual"
    }


def test_a_memory_name_sets_the_bank_and_activation_policies_of_the_layout():
    layout = MemFlowConfig.reference(sma_top_k=2)
    assert memory_config(layout, "uniform") == MemFlowConfig.reference(
        sma_top_k=2, bank_policy="uniform"
    )
    assert memory_config(layout, "visual+sma") == MemFlowConfig.reference(
        sma=True, sma_top_k=2, bank_policy="visual"
    )
    assert memory_config(layout, "none") == MemFlowConfig.reference(
        sma_top_k=2, nam=False, bank_frames=0
    )


@pytest.mark.parametrize("name", ["nope", "nam+nope", "none+sma", ""])
def test_unknown_memories_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match=r"a memory must be 'none', a bank policy \[.*'nam'"):
        memory_config(MemFlowConfig.reference(), name)


def test_memories_need_a_layout_with_a_bank():
    with pytest.raises(ValueError, match="base layout must have a memory bank"):
        memory_config(MemFlowConfig.longlive(), "nam")


def test_the_retrieval_score_is_the_share_of_layers_whose_bank_holds_a_wanted_frame():
    chunk = ChunkMemory(10, 20, {0: [[4, 12, 16]], 1: [[0, 12, 14]], 2: [[6, 8, 10]]}, {})
    assert chunk.bank_recall(range(4, 8)) == pytest.approx(2 / 3)
    assert chunk.bank_recall([99]) == 0.0
    assert ChunkMemory(0, 0, {}, {}).bank_recall([0]) == 0.0


def test_a_bad_memory_fails_in_one_line_before_any_model_loads(capsys):
    assert main(["compare", "--memories", "nam", "lru"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("memflow compare: error: a memory must be") and "'lru'" in error


@pytest.mark.slow
def test_the_world_comparison_writes_its_table_and_no_bank_retrieves_nothing(tmp_path, capsys):
    assert main(["compare", "--stories", "2", "--memories", "nam", "recency", "none",
                 "--output-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| memory | retrieval | return = first look |" in table
    report = json.loads((tmp_path / "comparison.json").read_text())
    rows = {row["memory"]: row for row in report["rows"]}
    assert list(rows) == ["nam", "recency", "none"]
    assert report["seeds"] == [700, 702]
    assert rows["none"]["retrieval"] == 0.0
    # recency's bank holds the newest staged frames: at the return (frame 20) frames 12..18,
    # never the first appearance (frames 4..7)
    assert rows["recency"]["retrieval"] == 0.0
    assert rows["none"]["cache_bytes"] < rows["nam"]["cache_bytes"]
    assert (tmp_path / "comparison.png").stat().st_size > 0


@pytest.mark.slow
def test_the_prompt_groups_comparison_scores_every_memory(tmp_path, capsys):
    assert main(["compare", "--prompts", "sample", "--limit", "1", "--frames-per-prompt", "6",
                 "--memories", "nam", "none", "--clip-model", "tiny-random", "--dino-model",
                 "tiny-random", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert [row["memory"] for row in report["rows"]] == ["nam", "none"]
    for row in report["rows"]:
        assert 0 <= row["clip_score"] <= 100 and row["seconds_per_chunk"] > 0
    assert report["rows"][1]["retrieval"] == 0.0
    assert "| nam |" in (tmp_path / "comparison.md").read_text()
