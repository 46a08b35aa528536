"""`memflow eval` end to end, offline: the tiny random Wan generates, tiny random CLIP / DINO
(saved to temporary folders) score; plus the feature extractors and the scorer on synthetic
videos with known answers."""

import contextlib
import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from memflow_apps.eval import (
    ClipFeatures,
    DinoFeatures,
    EvalProtocol,
    LinearAestheticPredictor,
    VideoReadError,
    VideoScorer,
    evaluate,
    generate_videos,
    iter_video_batches,
    load_prompt_groups,
)
from memflow_apps.eval.cli import main as eval_main
from memflow_apps.eval.features import load_linear_head
from memflow_apps.shared.prompts import save_prompt_groups
from memflow_apps.shared.tiny_scorers import (
    SAMPLE_PROMPTS,
    TINY_SCORER_SIZE,
    save_tiny_clip,
    save_tiny_dino,
)
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

FIXTURE = SAMPLE_PROMPTS
SIZE = TINY_SCORER_SIZE  # tiny CLIP / DINO input size, and the generated videos' size
# 3 prompts x 3 latent frames = 9 latent frames -> 4 * 8 + 1 = 33 decoded frames: 9 + 12 + 12
SEGMENTS = [(0, 9), (9, 21), (21, 33)]
GENERATE = (
    "--config reference longlive --frames-per-prompt 3 --height 32 --width 32 "
    "--max-sequence-length 16 --boundary-frames 4 --no-progress"
)


# ------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("scorers")
    return {"clip": save_tiny_clip(folder / "clip"), "dino": save_tiny_dino(folder / "dino")}


@pytest.fixture(scope="module")
def features(models) -> tuple[ClipFeatures, DinoFeatures]:
    return (
        ClipFeatures.from_pretrained(models["clip"], device="cpu"),
        DinoFeatures.from_pretrained(models["dino"], device="cpu"),
    )


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """2 groups of 3 prompts (the first three of the shipped sample's first two groups)."""
    groups = load_prompt_groups(FIXTURE)[:2]
    groups = [type(g)(g.id, g.prompts[:3], g.index) for g in groups]
    return save_prompt_groups(groups, tmp_path_factory.mktemp("prompts") / "groups.jsonl")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = eval_main(argv)
    return code, out.getvalue(), err.getvalue()


def scoring_args(models: dict[str, Path]) -> list[str]:
    return ["--clip-model", str(models["clip"]), "--dino-model", str(models["dino"])]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def generated(tmp_path_factory, models, prompts_file) -> dict:
    output = tmp_path_factory.mktemp("eval")
    argv = ["--prompts", str(prompts_file), "--output-dir", str(output), *GENERATE.split()]
    code, out, err = run_cli([*argv, *scoring_args(models)])
    return {"dir": output, "argv": argv, "code": code, "out": out, "err": err}


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_eval_generates_scores_and_reports_every_video_and_segment(generated):
    output = generated["dir"]
    assert generated["code"] == 0, generated["err"]
    assert "RANDOM" in generated["err"]
    for config in ("reference", "longlive"):
        for group in ("fox_in_snow", "lighthouse_storm"):
            marker = json.loads((output / "videos" / config / f"{group}.json").read_text())
            assert marker["complete"] is True and marker["config"] == config
            assert marker["num_latent_frames"] == 9 and marker["num_frames"] == 33
            assert len(marker["prompts"]) == 3
    videos = read_csv(output / "videos.csv")
    assert [(r["config"], r["group"], r["status"]) for r in videos] == [
        ("reference", "fox_in_snow", "ok"),
        ("reference", "lighthouse_storm", "ok"),
        ("longlive", "fox_in_snow", "ok"),
        ("longlive", "lighthouse_storm", "ok"),
    ]
    assert all(r["aesthetic_quality"] == "" for r in videos)  # absent, never a made-up number
    for row in videos:
        assert 0 < float(row["consistency"]) <= 100.0001
        assert row["num_frames"] == "33" and row["num_segments"] == "3"
    segments = read_csv(output / "segments.csv")
    assert len(segments) == 12
    ranges = [(int(r["start_frame"]), int(r["end_frame"])) for r in segments[:3]]
    assert ranges == SEGMENTS and [r["segment"] for r in segments[:3]] == ["1", "2", "3"]
    assert segments[0]["cross_segment_consistency"] == ""  # nothing before the first segment
    assert float(segments[1]["boundary_subject"]) > 0
    prompts = [r["prompt"] for r in segments[:3]]
    assert prompts[0] == "a red fox walks slowly through a snowy forest in the morning"
    # the video's score is the mean of its segments
    clip = [float(r["clip_score"]) for r in segments[:3]]
    assert float(videos[0]["clip_score"]) == pytest.approx(sum(clip) / 3, abs=1e-3)

    summary = read_csv(output / "summary.csv")
    assert [r["config"] for r in summary] == ["reference", "longlive"]
    assert all(r["scored"] == "2" and r["not_scored"] == "0" for r in summary)
    assert {"clip_seg1", "clip_seg2", "clip_seg3"} <= set(summary[0])
    markdown = (output / "summary.md").read_text()
    assert "| reference |" in markdown and "n/a" in markdown and "absent" in markdown
    assert "| config | videos | scored |" in generated["out"]
    assert (output / "segment_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_rerun_skips_finished_videos_and_regenerates_unfinished_ones(generated, tmp_path, models):
    output = tmp_path / "eval"
    shutil.copytree(generated["dir"], output)
    videos = sorted((output / "videos").glob("*/*.mp4"))
    before = {path: path.stat().st_mtime_ns for path in videos}
    argv = [*generated["argv"], *scoring_args(models)]
    argv[argv.index("--output-dir") + 1] = str(output)

    code, _, err = run_cli(argv)
    assert code == 0 and "4 finished video(s) skipped" in err
    assert {path: path.stat().st_mtime_ns for path in videos} == before

    def must_not_load():
        raise AssertionError("nothing is left to generate: the model must not be loaded")

    groups = load_prompt_groups(argv[argv.index("--prompts") + 1])
    protocol = EvalProtocol(frames_per_prompt=3, height=32, width=32, max_sequence_length=16)
    entries = generate_videos(
        groups, ["reference", "longlive"], output, protocol, must_not_load, "tiny-random",
        progress=False,
    )
    assert len(entries) == 4 and all(entry.status == "pending" for entry in entries)

    unfinished = output / "videos" / "longlive" / "fox_in_snow.json"
    unfinished.unlink()  # as if the run had stopped between the mp4 and its marker
    code, _, err = run_cli(argv)
    assert code == 0 and "3 finished video(s) skipped" in err
    changed = [path for path in videos if path.stat().st_mtime_ns != before[path]]
    assert changed == [output / "videos" / "longlive" / "fox_in_snow.mp4"]
    assert json.loads(unfinished.read_text())["complete"] is True


def test_scoring_existing_videos_reports_and_skips_corrupt_and_missing_ones(
    generated, tmp_path, models, prompts_file
):
    videos = tmp_path / "videos"
    shutil.copytree(generated["dir"] / "videos", videos)
    (videos / "reference" / "lighthouse_storm.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage")
    whole = (videos / "longlive" / "fox_in_snow.mp4").read_bytes()
    (videos / "longlive" / "fox_in_snow.mp4").write_bytes(whole[: len(whole) // 3])  # truncated
    (videos / "longlive" / "lighthouse_storm.mp4").unlink()
    shutil.copy(videos / "reference" / "fox_in_snow.mp4", videos / "reference" / "outtake.mp4")
    output = tmp_path / "scores"
    code, out, err = run_cli(
        ["--prompts", str(prompts_file), "--videos", str(videos), "--output-dir", str(output),
         "--boundary-frames", "4", "--no-progress", *scoring_args(models)]
    )
    assert code == 0, err
    rows = {(r["config"], r["video"]): r for r in read_csv(output / "videos.csv")}
    assert {key: row["status"] for key, row in rows.items()} == {
        ("longlive", "fox_in_snow"): "unreadable",
        ("longlive", "lighthouse_storm"): "missing",
        ("reference", "fox_in_snow"): "ok",
        ("reference", "lighthouse_storm"): "unreadable",
        ("reference", "outtake"): "unmatched",
    }
    for (config, video), row in rows.items():
        if row["status"] != "ok":
            assert f"memflow eval: {config}/{video}: {row['status']}" in err
            assert row["message"] and row["clip_score"] == ""
    assert "4 of 5 video(s) not scored" in err
    assert "4 video(s) not scored" in (output / "summary.md").read_text()
    # the one good video scores exactly as when it was generated (same file, same settings)
    scored = [r for r in read_csv(output / "segments.csv")]
    assert {(r["config"], r["video"]) for r in scored} == {("reference", "fox_in_snow")}
    reference = read_csv(generated["dir"] / "segments.csv")[:3]
    for mine, theirs in zip(scored, reference, strict=True):
        for name in ("clip_score", "consistency", "cross_segment_consistency", "start_frame"):
            assert mine[name] == theirs[name]


@pytest.mark.slow
def test_an_aesthetic_head_adds_aesthetic_quality(generated, tmp_path, models, prompts_file):
    head = torch.nn.Linear(16, 1)  # over the tiny CLIP's 16-dim embeddings
    with torch.no_grad():
        head.weight.fill_(0.5)
        head.bias.fill_(5.0)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    code, _, err = run_cli(
        ["--prompts", str(prompts_file), "--videos", str(generated["dir"] / "videos"),
         "--output-dir", str(tmp_path / "scores"), "--no-progress", *scoring_args(models),
         "--aesthetic-head", str(tmp_path / "head.pth"),
         "--aesthetic-clip-model", str(models["clip"])]
    )
    assert code == 0, err
    rows = read_csv(tmp_path / "scores" / "videos.csv")
    # (5 + 0.5 * sum of a unit vector's entries) / 10 lies in 50 +- 5 * sqrt(16) / 10 (x100)
    assert all(30 <= float(r["aesthetic_quality"]) <= 70 for r in rows)
    assert "absent" not in (tmp_path / "scores" / "summary.md").read_text()


def test_bad_settings_are_refused_before_any_work(tmp_path, prompts_file):
    base = ["--prompts", str(prompts_file), "--output-dir", str(tmp_path), "--no-progress",
            "--clip-model", "tiny-random", "--dino-model", "tiny-random"]
    code, _, err = run_cli([*base, "--frames-per-prompt", "3", "--latent-frames", "5"])
    assert code == 2 and "past the video" in err
    code, _, err = run_cli(["--prompts", str(tmp_path / "nope.jsonl")])
    assert code == 2 and "cannot read" in err
    code, _, err = run_cli([*base, "--videos", str(tmp_path), "--model", "x"])
    assert code == 2 and "--videos" in err
    code, _, err = run_cli([*base, "--videos", str(tmp_path / "empty")])
    assert code == 2 and "no such folder" in err
    assert not list(tmp_path.glob("*.csv"))


def test_a_failed_generation_is_reported_not_dropped(tmp_path, prompts_file):
    groups = load_prompt_groups(prompts_file)[:1]
    protocol = EvalProtocol(frames_per_prompt=3, height=36, width=32)  # 36: not a multiple of 8
    log = io.StringIO()
    entries = generate_videos(
        groups, ["longlive"], tmp_path, protocol, build_tiny_wan_pipeline, "tiny",
        progress=False, log=log,
    )
    assert [entry.status for entry in entries] == ["generation_failed"]
    assert "generation failed" in log.getvalue() and "multiples" in log.getvalue()
    assert not (tmp_path / "videos" / "longlive" / "fox_in_snow.json").exists()
    scorer = VideoScorer("/not/a/clip/model", "/not/a/dino/model")
    result = evaluate(entries, scorer, protocol, tmp_path, progress=False, log=log)
    assert not scorer.loaded  # nothing to score: the models were never loaded
    assert [row["status"] for row in read_csv(result.files["videos"])] == ["generation_failed"]


# ------------------------------------------------------------------ reading and features
def test_videos_are_read_in_uint8_batches(generated, tmp_path):
    path = generated["dir"] / "videos" / "reference" / "fox_in_snow.mp4"
    batches = list(iter_video_batches(path, batch_size=8))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 1]
    assert batches[0].dtype == np.uint8 and batches[0].shape[1:] == (32, 32, 3)
    with pytest.raises(VideoReadError, match="no such file"):
        list(iter_video_batches(tmp_path / "missing.mp4"))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match="cannot decode"):
        list(iter_video_batches(tmp_path / "bad.mp4"))


def test_feature_extractors_are_deterministic_and_batch_independent(features):
    clip, dino = features
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    repeated = np.stack([frames[0]] * 3)
    for extractor in (clip, dino):
        one_go = extractor.encode_images(frames)
        extractor.batch_size = 2
        try:
            torch.testing.assert_close(extractor.encode_images(frames), one_go)
        finally:
            extractor.batch_size = 32
        same = extractor.encode_images(repeated)
        torch.testing.assert_close(same[0], same[2])
        as_floats = extractor.encode_images(frames.astype(np.float32) / 255.0)
        torch.testing.assert_close(as_floats, one_go)
    fox = "a red fox in the snow"
    texts = clip.encode_texts([fox, "a boat on a lake", fox])
    assert texts.shape == (3, 16)
    torch.testing.assert_close(texts[0], texts[2])
    assert not torch.allclose(texts[0], texts[1])
    long_prompt = " ".join(["fox"] * 200)  # truncated to the text model's 32 positions
    assert clip.encode_texts([long_prompt]).shape == (1, 16)


def test_the_scorer_loads_its_models_only_when_it_scores(models):
    scorer = VideoScorer(models["clip"], models["dino"], device="cpu")
    assert not scorer.loaded and not scorer.has_aesthetic
    scorer.text_features(["a fox"])
    assert scorer.loaded


def test_a_static_video_is_perfectly_consistent_and_noise_is_not(features):
    clip, dino = features
    scorer = VideoScorer(clip, dino)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    static = np.stack([frame] * 33)
    noise = rng.integers(0, 256, (33, SIZE, SIZE, 3), dtype=np.uint8)
    prompts = ["a fox", "a boat", "a bird"]

    def score(video):
        return scorer.score_frames([video[:20], video[20:]], prompts, [0, 3, 6], 9, 4, 4)

    still = score(static)
    assert [(s.frames.start, s.frames.stop) for s in still.segments] == SEGMENTS
    assert still.subject_consistency == pytest.approx(100, abs=1e-4)
    assert still.background_consistency == pytest.approx(100, abs=1e-4)
    assert still.cross_segment_consistency == pytest.approx(100, abs=1e-4)
    noisy = score(noise)
    assert noisy.consistency < still.consistency - 0.5
    assert noisy.cross_segment_consistency < still.cross_segment_consistency - 0.5
    # every frame of the static video is the same image: the CLIP score is that image's cosine
    # with each prompt
    image = torch.nn.functional.normalize(clip.encode_images(frame), dim=-1)
    text = torch.nn.functional.normalize(clip.encode_texts(prompts), dim=-1)
    expected = (100 * image @ text.T).reshape(-1).tolist()
    assert [s.clip_score for s in still.segments] == pytest.approx(expected, abs=1e-4)
    assert still.aesthetic_quality is None


def test_the_linear_aesthetic_head_scores_normalised_clip_embeddings(features, tmp_path):
    clip, _ = features
    mlp = {  # the improved predictor's layout: layers.N, no activations between them
        "layers.0.weight": torch.randn(4, 16), "layers.0.bias": torch.randn(4),
        "layers.2.weight": torch.randn(1, 4), "layers.2.bias": torch.tensor([5.0]),
    }
    torch.save(mlp, tmp_path / "mlp.pth")
    predictor = LinearAestheticPredictor(clip, load_linear_head(tmp_path / "mlp.pth"))
    frames = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    embedding = torch.nn.functional.normalize(clip.encode_images(frames), dim=-1)
    hidden = embedding @ mlp["layers.0.weight"].T + mlp["layers.0.bias"]
    expected = (hidden @ mlp["layers.2.weight"].T + mlp["layers.2.bias"]).reshape(-1) / 10
    torch.testing.assert_close(predictor(frames).float(), expected)
    assert math.isfinite(float(predictor(frames[:1])[0]))


def test_generate_only_then_score_the_folder_later(tmp_path, models, prompts_file):
    output = tmp_path / "run"
    code, out, _ = run_cli(
        ["--prompts", str(prompts_file), "--limit", "1", "--config", "reference_sma",
         "--frames-per-prompt", "3", "--height", "32", "--width", "32",
         "--max-sequence-length", "16", "--output-dir", str(output), "--no-progress", "--no-score"]
    )
    assert code == 0 and "1 of 1 video(s) ready" in out
    assert (output / "videos" / "reference_sma" / "fox_in_snow.mp4").is_file()
    assert not (output / "videos.csv").exists()
    code, _, err = run_cli(
        ["--prompts", str(prompts_file), "--videos", str(output / "videos"), "--output-dir",
         str(output), "--no-progress", *scoring_args(models)]
    )
    assert code == 0, err
    rows = read_csv(output / "videos.csv")
    # the marker next to the video gives its geometry; the second group has no video
    assert [(r["config"], r["group"], r["status"]) for r in rows] == [
        ("reference_sma", "fox_in_snow", "ok"),
        ("reference_sma", "lighthouse_storm", "missing"),
    ]
    segments = read_csv(output / "segments.csv")
    assert [(int(r["start_frame"]), int(r["end_frame"])) for r in segments] == SEGMENTS


def test_dino_features_are_the_normalised_cls_token(features):
    _, dino = features
    frames = np.random.default_rng(2).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    pixels = dino.image_processor(images=list(frames), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = dino.model(pixel_values=pixels).pooler_output  # DINOv2: layernormed CLS
    torch.testing.assert_close(dino.encode_images(frames), pooled)


# ------------------------------------------------------------------------ offline smoke run
@pytest.mark.slow
def test_the_readme_smoke_run_is_offline_with_the_packaged_prompts_and_tiny_scorers(tmp_path):
    code, out, err = run_cli([
        "--prompts", "sample", "--limit", "1", "--frames-per-prompt", "3",
        "--clip-model", "tiny-random", "--dino-model", "tiny-random",
        "--output-dir", str(tmp_path), "--no-progress",
    ])
    assert code == 0, err
    assert [r["status"] for r in read_csv(tmp_path / "videos.csv")] == ["ok"]
    assert (tmp_path / "tiny-scorers" / "clip" / "config.json").is_file()


def test_feature_models_that_cannot_be_loaded_stop_the_run_before_generating(tmp_path):
    missing = str(tmp_path / "no-such-clip")
    code, _, err = run_cli([
        "--prompts", "sample", "--limit", "1", "--clip-model", missing,
        "--dino-model", "tiny-random", "--output-dir", str(tmp_path / "out"),
    ])
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"memflow eval: error: --clip-model {missing!r}")
    assert "--no-score" in err and not (tmp_path / "out" / "videos").exists()
