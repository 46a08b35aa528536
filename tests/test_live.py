"""Prompts while a stream plays: typed or piped on stdin (``LivePrompts``) and timed in a file
(``read_prompt_file``, ``memflow generate --prompt-file``)."""

import io
import re
import time

import pytest

from memflow_apps.cli.live import LivePrompts, read_prompt_file


def read_all(live: LivePrompts, lines: int) -> LivePrompts:
    """``live`` once its reading thread has queued ``lines`` lines."""
    deadline = time.monotonic() + 5
    while live.unused() < lines and time.monotonic() < deadline:
        time.sleep(0.001)
    assert live.unused() == lines
    return live


def test_piped_lines_are_taken_one_per_chunk_boundary():
    live = read_all(LivePrompts(io.StringIO("a fox\n\nb boat\nc cat\n"), one_per_boundary=True), 3)
    assert [live.take(), live.take(), live.take(), live.take()] == [
        ["a fox"], ["b boat"], ["c cat"], []
    ]
    assert live.unused() == 0


def test_typed_lines_are_all_taken_at_the_next_boundary():
    live = read_all(LivePrompts(io.StringIO("a fox\nb boat\n"), one_per_boundary=False), 2)
    assert live.take() == ["a fox", "b boat"]
    assert live.take() == []


def test_a_prompt_file_of_frames_and_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# the story\n0 a red fox in the snow\n\n40\ta boat on a lake\n"
                    "85 the fox returns  \n")
    schedule = read_prompt_file(path, num_latent_frames=120)
    assert schedule.entries == (
        ("a red fox in the snow", 0), ("a boat on a lake", 40), ("the fox returns", 85)
    )


def test_a_jsonl_prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"frame": 0, "prompt": "a red fox"}\n\n{"prompt": "a boat", "frame": 6}\n')
    assert read_prompt_file(path, num_latent_frames=9).entries == (("a red fox", 0), ("a boat", 6))


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", None, "no prompts"),
        ("# only a comment\n", None, "no prompts"),
        ("a red fox\n", 1, "expected '<latent frame> <prompt>'"),
        ("0 a fox\n-3 a boat\n", 2, "expected '<latent frame> <prompt>'"),
        ("0 a fox\n3\n", 2, "expected '<latent frame> <prompt>'"),
        ("0 a fox\nthree a boat\n", 2, "expected '<latent frame> <prompt>'"),
        ("3 a fox\n", 1, "the first prompt must start at latent frame 0, got 3"),
        ("0 a fox\n6 a boat\n6 a cat\n", 3, "latent frames must increase, got 6 after 6"),
        ("0 a fox\n9 a boat\n", 2, "latent frame 9 is past the video's 9 latent frames"),
        ('{"frame": 0, "prompt": "a fox"}\n{"frame": 3\n', 2, "not JSON"),
        ('{"frame": 0, "prompt": "a fox"}\n# a comment\n', 2, "not JSON"),
        ('{"frame": 0, "text": "a fox"}\n', 1, "exactly the keys 'frame' and 'prompt'"),
        ('{"frame": 0, "prompt": "a fox", "seed": 1}\n', 1, "exactly the keys"),
        ('{"frame": "0", "prompt": "a fox"}\n', 1, "'frame' must be an int >= 0, got '0'"),
        ('{"frame": true, "prompt": "a fox"}\n', 1, "'frame' must be an int >= 0, got True"),
        ('{"frame": 0, "prompt": " "}\n', 1, "'prompt' must be a non-empty string, got ' '"),
        ('[0, "a fox"]\n', 1, "expected '<latent frame> <prompt>'"),
    ],
)
def test_a_bad_prompt_file_is_refused_naming_the_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    where = f"--prompt-file {path}" + ("" if line is None else f", line {line}")
    with pytest.raises(ValueError, match="^" + re.escape(where)) as refused:
        read_prompt_file(path, num_latent_frames=9)
    assert message in str(refused.value)


def test_a_prompt_file_that_is_not_text_is_refused_by_name(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"0 a fox\n\xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(f"--prompt-file {path}: not UTF-8 text")):
        read_prompt_file(path, num_latent_frames=9)
