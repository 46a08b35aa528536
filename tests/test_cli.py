"""The `memflow` command: the offline demo and generation from a local diffusers folder."""

import io
import json

import pytest

from memflow_adapter.cli import main
from memflow_adapter.tiny_wan import build_tiny_wan_pipeline


@pytest.mark.slow
def test_demo_writes_the_video_the_timeline_and_the_report(tmp_path, capsys):
    command = f"demo --model tiny-random --output-dir {tmp_path} --chunks 9 --config reference_sma"
    assert main(command.split()) == 0
    printed = capsys.readouterr().out
    assert "RANDOM" in printed and "weights" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["random_weights"] is True
    assert report["num_chunks"] == 9
    assert [chunk["prompt"] for chunk in report["chunks"]][::3] == [p for p, _ in report["prompts"]]
    recached = [chunk["recached"] for chunk in report["chunks"]]
    assert recached == [False] * 3 + [True] + [False] * 2 + [True] + [False] * 2
    assert report["chunks"][8]["bank_frames"] == [6, 15, 21]
    assert all(len(chunk["sma_activated_frames"]) >= 3 for chunk in report["chunks"][1:])
    assert (tmp_path / "video.mp4").stat().st_size > 1000
    assert (tmp_path / "memory_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_generate_runs_a_local_diffusers_folder_offline(tmp_path, capsys):
    model_dir = tmp_path / "tiny-wan"
    build_tiny_wan_pipeline(seed=1).save_pretrained(model_dir)
    out = tmp_path / "out"
    prompts = ["--prompt", "a red fox in the snow", "--prompt", "a boat on a lake"]
    options = (
        f"--model {model_dir} --frames-per-prompt 6 --num-latent-frames 12 --height 32 "
        f"--width 32 --max-sequence-length 16 --output-dir {out} --config longlive"
    )
    assert main(["generate", *prompts, *options.split()]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == str(model_dir) and report["num_chunks"] == 4
    assert report["config"]["bank_frames"] == 0
    assert report["guidance_scale"] == 1.0 and report["negative_prompt"] is None

    guided = ["--guidance-scale", "3", "--negative-prompt", "", "--output-dir", str(out / "g")]
    assert main(["generate", *prompts, *options.split(), *guided]) == 0
    report = json.loads((out / "g" / "report.json").read_text())
    assert report["guidance_scale"] == 3.0 and report["negative_prompt"] == ""
    capsys.readouterr()
    assert main(["generate", *prompts, *options.split(), "--guidance-scale", "0.5"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "memflow generate: error: guidance_scale must be finite and >= 1 (1 disables guidance), "
        "got 0.5"
    )


def test_an_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--config", "memflow"])
    assert "invalid choice: 'memflow'" in capsys.readouterr().err


def test_eval_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--help"])
    assert stop.value.code == 0 and "--prompts" in capsys.readouterr().out


@pytest.mark.slow
def test_interactive_generation_takes_a_typed_prompt_from_the_next_chunk_on(
    tmp_path, capsys, monkeypatch
):
    """A line on stdin switches the prompt at a chunk boundary (when it arrives depends on the
    reading thread), that chunk recaches, the schedule after it is replaced, and the mp4 is
    written chunk by chunk."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a green frog on a leaf\n"))
    command = f"demo --model tiny-random --output-dir {tmp_path} --chunks 6 --interactive"
    assert main(command.split()) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    prompts = report["prompts"]
    assert prompts[-1][0] == "a green frog on a leaf"
    switch = prompts[-1][1]
    assert switch % 3 == 0 and all(start < switch for _, start in prompts[:-1])
    chunks = {chunk["start_frame"]: chunk for chunk in report["chunks"]}
    assert chunks[switch]["prompt"] == "a green frog on a leaf"
    assert chunks[switch]["recached"] == (switch > 0)
    assert [c["prompt"] for c in report["chunks"] if c["start_frame"] > switch] == [
        "a green frog on a leaf"
    ] * (5 - switch // 3)
    assert f"prompt from latent frame {switch}: 'a green frog on a leaf'" in printed
    assert "chunk 6/6: latent frames 15-17" in printed and "first frame after" in printed
    assert report["seconds_to_first_frame"] > 0
    assert report["denoise_fps"] > report["end_to_end_fps"] > 0  # decoding takes time too
    assert "CPU" in report["hardware"]
    assert (tmp_path / "video.mp4").stat().st_size > 1000


def test_interactive_is_refused_for_the_world_demo():
    with pytest.raises(SystemExit, match="--interactive applies to --model tiny-random"):
        main(["demo", "--interactive"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "--base", "missing.pt", "--output", "out"], "missing.pt"),
        (["generate", "--model", "no/such/folder/here", "--prompt", "a cat"], "no/such/folder"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMFLOW_TRACEBACK", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memflow {argv[0]}: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
