"""The `memflow` command: the offline demo, generation from a local diffusers folder or the
embedded tiny-random Wan, timed and piped prompts, Ctrl-C, convert, and a light parser."""

import argparse
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from memflow_apps.cli.main import build_parser, main, one_line
from memflow_apps.shared import cli_choices
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

from tiny_models import tiny_wan
from wan_fixtures import original_lora, training_state

#: The smallest stream the tiny-random Wan makes: 32x32 pixels, 16 text tokens, plain memory.
TINY_STREAM = ["--height", "32", "--width", "32", "--max-sequence-length", "16",
               "--config", "longlive"]


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
def test_interactive_generation_takes_piped_prompts_one_per_chunk_boundary(
    tmp_path, capsys, monkeypatch
):
    """Piped lines apply as if each had been typed during one chunk: the first from the second
    chunk on, the next one chunk later; each switch recaches and the mp4 is written chunk by
    chunk."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a green frog on a leaf\na dog on a road\n"))
    command = (f"demo --model tiny-random --output-dir {tmp_path} --chunks 4 --interactive "
               "--height 32 --width 32 --max-sequence-length 16")
    assert main(command.split()) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prompts"] == [
        ["a red fox walks through a snowy forest", 0],
        ["a green frog on a leaf", 3],
        ["a dog on a road", 6],
    ]
    assert [(c["prompt"], c["recached"]) for c in report["chunks"]] == [
        ("a red fox walks through a snowy forest", False),
        ("a green frog on a leaf", True),
        ("a dog on a road", True),
        ("a dog on a road", False),
    ]
    assert "prompt from latent frame 3: 'a green frog on a leaf'" in printed
    assert "chunk 4/4: latent frames 9-11" in printed and "first frame after" in printed
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


# ------------------------------------------------------------------------------ a light parser
def test_building_the_parser_imports_neither_torch_nor_diffusers_nor_the_world():
    """``memflow --help`` answers at once: the handlers import what they run."""
    code = (
        "import sys, memflow_apps.cli.main as cli\n"
        "parser = cli.build_parser()\n"
        "for sub in parser._subparsers._group_actions[0].choices.values(): sub.format_help()\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'memflow_apps.world', "
        "'memflow_apps.eval.features')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


@pytest.mark.parametrize("command", ["demo", "generate", "live", "convert", "eval"])
def test_every_option_of_every_subcommand_has_help(command):
    parser = subcommand_parsers()[command]
    silent = [a.option_strings[0] for a in parser._actions
              if a.help in (None, "", argparse.SUPPRESS)]
    assert silent == []


def test_the_parser_choices_are_the_library_values():
    from integrations import reference_integration
    from memflow_adapter.config import PRESETS
    from memflow_adapter.frame_buffer import CACHE_DTYPES
    from memflow_apps.eval import features
    from memflow_apps.shared import tiny_scorers as tiny
    from memflow_apps.world import demo

    library = {
        "PRESETS": PRESETS,
        "CACHE_DTYPES": tuple(sorted(CACHE_DTYPES)),
        "WORLD_DEMO_MODEL_NAME": demo.WORLD_DEMO_MODEL.name,
        "WORLD_OTHER_MODEL_NAME": demo.WORLD_OTHER_MODEL.name,
        "DEFAULT_CLIP_MODEL": features.DEFAULT_CLIP_MODEL,
        "DEFAULT_DINO_MODEL": features.DEFAULT_DINO_MODEL,
        "DEFAULT_AESTHETIC_CLIP_MODEL": features.DEFAULT_AESTHETIC_CLIP_MODEL,
        "TINY_RANDOM": tiny.TINY_SCORER,
        "REFERENCE_BASE_MODEL": reference_integration().checkpoints.base_model,
    }
    assert {name: getattr(cli_choices, name) for name in library} == library


def test_the_tiny_model_is_tiny_random_in_every_command():
    parsers = subcommand_parsers()
    assert "tiny-random" in parsers["demo"].format_help()
    for command in ("generate", "eval"):
        model = next(a for a in parsers[command]._actions if "--model" in a.option_strings)
        assert "'tiny-random'" in model.help and "'tiny'" not in model.help


# ------------------------------------------------------------------------------ one-line errors
def test_an_error_is_one_line_with_the_causes_it_was_raised_from():
    """As diffusers reports a failed load: the reason is in the cause, not the message."""
    try:
        try:
            raise ConnectionError("Name or service not known\n(host huggingface.co)")
        except ConnectionError as cause:
            raise OSError("Cannot load model x. Please check out the root cause in the "
                          "stacktrace above.") from cause
    except OSError as error:
        line = one_line(error)
    assert line == (
        "Cannot load model x. Please check out the root cause in the stacktrace above.; caused "
        "by ConnectionError: Name or service not known (host huggingface.co)"
    )


def test_a_cause_already_in_the_message_is_not_repeated():
    try:
        try:
            raise KeyError("noise")
        except KeyError as cause:
            raise ValueError(f"state has no {cause}") from cause
    except ValueError as error:
        assert one_line(error) == "state has no 'noise'"
    try:
        try:
            raise FileNotFoundError("no such file: a.pt")
        except FileNotFoundError as cause:
            raise ValueError(f"cannot read: {cause}") from cause
    except ValueError as error:
        assert one_line(error) == "cannot read: no such file: a.pt"


# ------------------------------------------------------------------- generate --model tiny-random
def write_prompts(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_generate_runs_the_tiny_random_wan_offline_with_timed_prompts(tmp_path, capsys):
    prompts = write_prompts(tmp_path, "0 a red fox in the snow\n5 a boat on a lake\n")
    out = tmp_path / "out"
    argv = ["generate", "--model", "tiny-random", "--prompt-file", str(prompts),
            "--num-latent-frames", "9", "--output-dir", str(out), *TINY_STREAM]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "tiny-random" and report["random_weights"] is True
    assert report["interrupted"] is False and report["num_chunks"] == 3
    assert report["prompts"] == [["a red fox in the snow", 0], ["a boat on a lake", 5]]
    # a switch applies from the first chunk boundary at or after its frame
    assert [c["prompt"] for c in report["chunks"]] == ["a red fox in the snow"] * 2 + [
        "a boat on a lake"
    ]
    assert "chunk 3/3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt-file", "{bad}"], "--prompt-file {bad}, line 2: latent frames must increase"),
        (["--prompt-file", "{bad}", "--frames-per-prompt", "3"],
         "--frames-per-prompt spaces the --prompt prompts"),
        (["--prompt-file", "{missing}"], "No such file or directory"),
    ],
)
def test_generate_refuses_a_bad_prompt_file_in_one_line_before_loading_a_model(
    extra, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("MEMFLOW_TRACEBACK", raising=False)
    names = {"bad": write_prompts(tmp_path, "0 a fox\n0 a boat\n"),
             "missing": tmp_path / "missing.txt"}
    extra = [part.format(**names) for part in extra]
    # a model that would take a minute to fail: the prompts are refused first
    assert main(["generate", "--model", "no/such/model", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memflow generate: error: ") and message.format(**names) in err
    assert len(err.strip().splitlines()) == 1


def test_generate_takes_prompts_or_a_prompt_file_not_both(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny-random", "--prompt", "a fox", "--prompt-file", "p"])
    assert "not allowed with argument --prompt" in capsys.readouterr().err


def count_frames(path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.slow
def test_ctrl_c_stops_generate_between_chunks_and_keeps_what_was_made(tmp_path):
    """A real SIGINT to ``memflow generate`` once its first chunk is reported: one line, the
    chunk being made is finished, the mp4 holds every frame made, report.json and the timeline
    describe them, exit status 130."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "memflow_apps.cli", "generate", "--model", "tiny-random",
               "--prompt", "a red fox in the snow", "--num-latent-frames", "30",
               "--output-dir", str(out), *TINY_STREAM]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        printed = []
        for line in child.stdout:
            printed.append(line)
            if line.startswith("chunk 1/10"):
                break
        child.send_signal(signal.SIGINT)
        rest, err = child.communicate(timeout=300)
    finally:
        child.kill()
    printed = "".join(printed) + rest
    assert child.returncode == 130, err
    assert err.count("\n") == 1 and "Ctrl-C: stopping after this chunk" in err
    report = json.loads((out / "report.json").read_text())
    made = report["num_chunks"]
    # the signal lands after chunk 1 was reported: during chunk 2 (kept, then stop) or between
    # the two (stop at that boundary), whichever the scheduler gives; never the whole video
    assert report["interrupted"] is True and report["planned_chunks"] == 10 and 1 <= made < 10
    assert f"{made} chunks of 10 (stopped by Ctrl-C)" in printed
    # 3 latent frames a chunk; Wan's VAE gives 4 * (F - 1) + 1 frames for F latent frames
    assert count_frames(out / "video.mp4") == 4 * (3 * made - 1) + 1
    assert (out / "memory_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ convert
@pytest.fixture
def original_checkpoints(tmp_path):
    """GENERATOR: a tiny Wan's training checkpoint, its config.json and a LoRA that fits it,
    in the original layout. Returns (base, config, lora) paths."""
    model = tiny_wan(seed=1)
    base, config, lora = tmp_path / "base.pt", tmp_path / "config.json", tmp_path / "lora.pt"
    torch.save({"generator": training_state(model)}, base)
    config.write_text(json.dumps(dict(model.config)))
    torch.save({"generator_lora": original_lora(model)}, lora)
    return base, config, lora


def convert(base, config, output, *extra):
    return main(["convert", "--base", str(base), "--base-config", str(config), "--output",
                 str(output), *extra])


def test_convert_writes_readable_folders_with_the_umask_modes(original_checkpoints, tmp_path):
    base, config, lora = original_checkpoints
    output = tmp_path / "converted"
    previous = os.umask(0o027)
    try:
        assert convert(base, config, output, "--lora", str(lora), "--base-model", "org/tiny") == 0
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(output)): p.stat().st_mode & 0o777 for p in output.rglob("*")}
    assert output.stat().st_mode & 0o777 == 0o750
    assert {name for name, mode in modes.items() if mode == 0o750} == {"transformer", "adapter"}
    assert {mode for name, mode in modes.items() if name not in ("transformer", "adapter")} == {
        0o640
    }
    assert "adapter/adapter_model.safetensors" in modes
    meta = json.loads((output / "adapter" / "memflow_config.json").read_text())
    assert meta["base_model"] == "org/tiny"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_convert_records_no_base_model_for_another_config_unless_told(
    original_checkpoints, tmp_path
):
    base, config, _ = original_checkpoints
    assert convert(base, config, tmp_path / "converted") == 0
    meta = json.loads((tmp_path / "converted" / "adapter" / "memflow_config.json").read_text())
    assert meta["base_model"] is None
    card = (tmp_path / "converted" / "adapter" / "README.md").read_text()
    assert "Wan-AI" not in card


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("lora-misfit", "does not fit --base"),
        ("lora-missing", "missing.pt"),
        ("alpha-without-lora", "--lora-alpha 8.0 scales --lora, which is not given"),
        ("alpha-zero", "--lora-alpha must be a finite number > 0, got 0.0"),
        ("output-taken", "already exists and is not an empty folder"),
    ],
)
def test_convert_checks_everything_before_writing_anything(
    mutate, message, original_checkpoints, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("MEMFLOW_TRACEBACK", raising=False)
    base, config, lora = original_checkpoints
    output = tmp_path / "out" / "converted"
    extra = {
        "lora-misfit": ["--lora", str(tmp_path / "other_lora.pt")],
        "lora-missing": ["--lora", str(tmp_path / "missing.pt")],
        "alpha-without-lora": ["--lora-alpha", "8"],
        "alpha-zero": ["--lora", str(lora), "--lora-alpha", "0"],
        "output-taken": [],
    }[mutate]
    if mutate == "lora-misfit":  # a LoRA of a wider model
        torch.save({"generator_lora": original_lora(tiny_wan(num_attention_heads=4))},
                   tmp_path / "other_lora.pt")
    if mutate == "output-taken":
        output.mkdir(parents=True)
        (output / "notes.txt").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    assert convert(base, config, output, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("memflow convert: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing left behind


def test_convert_leaves_nothing_when_writing_fails(original_checkpoints, tmp_path, monkeypatch):
    from memflow_adapter.hub import MemFlowAdapter

    def full_disk(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MemFlowAdapter, "save_pretrained", full_disk)
    base, config, _ = original_checkpoints
    before = sorted(tmp_path.rglob("*"))
    assert convert(base, config, tmp_path / "converted") == 2
    assert sorted(tmp_path.rglob("*")) == before
