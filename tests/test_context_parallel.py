"""Streaming across ranks with diffusers' Ulysses context parallelism, the memory sharded by heads
(architecture s.6): two gloo processes stream what one process streams, each caching half the
heads and keeping the same bank frames; what the engine does not support is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ContextParallelConfig
from diffusers.models._modeling_parallel import ParallelConfig

from memflow_adapter import MemFlowConfig, MemFlowStreamingPipeline, apply_memflow
from memflow_apps.cli.main import main
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

from family_helios import tiny_helios
from tiny_models import tiny_wan

WORKER = Path(__file__).with_name("context_parallel_worker.py")
PRESETS = ("reference", "reference_sma")
TINY_WAN_HEADS = 4
# the reference layouts fill their 3 bank slots by chunk 7 (record_interval 3); NAM's top-k picks
# the kept frames from chunk 10 on
NAM_SELECTS_FROM = 10


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> Path:
    """The worker's results, streamed by one process and by two (torchrun, gloo)."""
    out = tmp_path_factory.mktemp("context_parallel")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = [sys.executable, str(WORKER), str(out), *PRESETS]
    pair = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(WORKER), str(out), *PRESETS]
    for command in (single, pair):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
    return out


def result(out: Path, preset: str, rank: int, world: int) -> dict:
    return torch.load(out / f"{preset}-rank{rank}-of-{world}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_two_ranks_stream_the_single_process_video(streams, preset):
    single = result(streams, preset, 0, 1)
    ranks = [result(streams, preset, rank, 2) for rank in (0, 1)]
    assert any(single["recached"]), "the stream must include a prompt switch"
    for rank in ranks:
        # the same math in another order (the split projections, the exchanged heads):
        # float32 rounding, far below the 1e-5 the streams must agree to
        torch.testing.assert_close(rank["latents"], single["latents"], rtol=0, atol=1e-5)
    # proj_out's gather gives every rank the whole video
    assert torch.equal(ranks[0]["latents"], ranks[1]["latents"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_rank_keeps_the_single_process_bank_frames(streams, preset):
    single = result(streams, preset, 0, 1)
    bank_frames = MemFlowConfig.preset(preset).bank_frames
    selecting = single["bank"][NAM_SELECTS_FROM:]
    assert selecting and all(len(chunk[0][0]) == bank_frames for chunk in selecting)
    for rank in (0, 1):
        assert result(streams, preset, rank, 2)["bank"] == single["bank"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_each_rank_caches_half_the_heads(streams, preset):
    single = result(streams, preset, 0, 1)
    assert single["cached_heads"] == TINY_WAN_HEADS
    for rank in (0, 1):
        sharded = result(streams, preset, rank, 2)
        assert sharded["cached_heads"] == TINY_WAN_HEADS // 2
        assert sharded["cache_bytes"] * 2 == single["cache_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_each_rank_resumes_a_paused_stream_from_its_own_state(streams, preset):
    for rank in (0, 1):
        sharded = result(streams, preset, rank, 2)
        assert torch.equal(sharded["resumed_latents"], sharded["latents"])


@pytest.mark.slow
def test_remove_memflow_leaves_diffusers_context_parallel_model(streams):
    single = result(streams, "reference", 0, 1)["detached_forward"]
    for rank in (0, 1):
        detached = result(streams, "reference", rank, 2)["detached_forward"]
        torch.testing.assert_close(detached, single, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_ranks_session_state_is_refused_by_a_session_of_other_heads(streams):
    pipeline = MemFlowStreamingPipeline(
        build_tiny_wan_pipeline(0), MemFlowConfig.reference(), device="cpu"
    )
    session = pipeline.attachment.create_session(8, 8)
    state = result(streams, "reference", 1, 2)["session_state"]
    with pytest.raises(ValueError, match="heads of rank 1 of 2"):
        session.load_state_dict(state)


# ---------------------------------------------------------------------------- refused setups
def with_context_parallel(model, config: ContextParallelConfig):
    """``model`` as diffusers' ``enable_parallelism`` leaves it, as far as MemFlow reads it."""
    model._parallel_config = ParallelConfig(context_parallel_config=config)
    return model


def test_ring_attention_is_refused_naming_ring_degree():
    model = tiny_wan()
    attachment = apply_memflow(model, MemFlowConfig.reference())
    with_context_parallel(model, ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match="ring_degree must be 1"):
        attachment.create_session(8, 8)


def test_a_degree_that_does_not_divide_the_heads_is_refused():
    attachment = apply_memflow(tiny_wan(), MemFlowConfig.reference())
    with pytest.raises(ValueError, match="ulysses_degree=3 must divide the model's 2 attention"):
        attachment.enable_context_parallel(3)


def test_a_degree_that_does_not_divide_a_frames_tokens_is_refused():
    model = tiny_wan()
    attachment = apply_memflow(model, MemFlowConfig.reference())
    with_context_parallel(model, ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(ValueError, match=r"divide the tokens of one latent frame \(9\)"):
        attachment.create_session(6, 6)


@pytest.mark.parametrize("degree", [1, 0, 2.0])
def test_a_degree_below_two_or_not_an_int_is_refused(degree):
    attachment = apply_memflow(tiny_wan(), MemFlowConfig.reference())
    with pytest.raises(ValueError, match="ulysses_degree must be an int >= 2"):
        attachment.enable_context_parallel(degree)


def test_context_parallelism_needs_a_torchrun_launch():
    attachment = apply_memflow(tiny_wan(), MemFlowConfig.reference())
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node 2"):
        attachment.enable_context_parallel(2)


def test_memflow_must_be_attached_before_context_parallelism():
    model = with_context_parallel(tiny_wan(), ContextParallelConfig(ulysses_degree=2))
    with pytest.raises(ValueError, match="apply MemFlow before enable_parallelism"):
        apply_memflow(model, MemFlowConfig.reference())


def test_a_family_not_validated_under_context_parallelism_is_refused():
    attachment = apply_memflow(tiny_helios(), MemFlowConfig.reference())
    with pytest.raises(ValueError, match="helios family does not stream under context"):
        attachment.enable_context_parallel(2)


# --------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_memflow_generate_under_torchrun_streams_the_single_process_video(tmp_path):
    model_dir = tmp_path / "tiny-wan"
    build_tiny_wan_pipeline(seed=1).save_pretrained(model_dir)
    options = [
        "generate", "--model", str(model_dir), "--prompt", "a red fox in the snow",
        "--prompt", "a boat on a lake", "--frames-per-prompt", "6", "--num-latent-frames", "12",
        "--height", "32", "--width", "32", "--max-sequence-length", "16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        1: [sys.executable, "-m", "memflow_apps.cli"],
        2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "memflow_apps.cli"],
    }
    reports = {}
    for degree, launch in runs.items():
        out = tmp_path / f"degree-{degree}"
        command = [*launch, *options, "--output-dir", str(out), "--ulysses-degree", str(degree)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        reports[degree] = json.loads((out / "report.json").read_text())
        assert (out / "video.mp4").stat().st_size > 1000
    assert reports[2]["ulysses_degree"] == 2
    for single, sharded in zip(reports[1]["chunks"], reports[2]["chunks"], strict=True):
        assert sharded["bank_frames"] == single["bank_frames"]
        assert sharded["recached"] == single["recached"]
        # rank 0 reports its own cache: half the heads
        assert sharded["cache_bytes"] * 2 == single["cache_bytes"]


def test_memflow_generate_with_a_degree_but_no_launch_ends_in_one_line(tmp_path, capsys):
    # refused before the model is read
    argv = ["generate", "--model", str(tmp_path / "never-read"), "--prompt", "a cat",
            "--ulysses-degree", "2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "memflow generate: error: --ulysses-degree 2 needs a launch of 2 processes, got 1: "
        "torchrun --nproc_per_node 2 -m memflow_apps.cli generate ..."
    )
