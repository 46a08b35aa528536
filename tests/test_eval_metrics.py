"""The benchmark's metrics on hand-made features with known cosines, and segment splitting."""

import math

import pytest
import torch

from memflow_apps.eval.metrics import (
    SegmentScores,
    VideoScores,
    anchor_similarity,
    boundary_similarity,
    chunk_aligned_starts,
    clip_score,
    cosine_matrix,
    nanmean,
    pixel_frame_of_latent,
    score_video_features,
    segment_ranges,
    temporal_consistency,
)


def unit(angle_degrees: float) -> torch.Tensor:
    """A 2-D unit vector at ``angle_degrees``: cos between two of them is cos(angle difference)."""
    radians = math.radians(angle_degrees)
    return torch.tensor([math.cos(radians), math.sin(radians)])


def frames_at(*angles: float) -> torch.Tensor:
    return torch.stack([unit(a) for a in angles])


# --------------------------------------------------------------------------------- cosines
def test_cosine_matrix_is_scale_invariant_and_exact_on_known_angles():
    a = frames_at(0, 90) * torch.tensor([[3.0], [0.5]])
    b = frames_at(0, 60, 180)
    expected = torch.tensor([[1.0, 0.5, -1.0], [0.0, math.sqrt(3) / 2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(cosine_matrix(a, b), expected, atol=1e-6, rtol=0)


def test_nanmean_skips_none_and_nan():
    assert nanmean([1.0, None, math.nan, 3.0]) == 2.0
    assert math.isnan(nanmean([None, math.nan]))
    assert math.isnan(nanmean([]))


# ------------------------------------------------------------------------------ CLIP score
def test_clip_score_is_100_times_the_mean_cosine_to_the_prompt():
    text = unit(0)
    assert clip_score(frames_at(0, 0, 0), text) == pytest.approx(100.0)
    assert clip_score(frames_at(90), text) == pytest.approx(0.0, abs=1e-9)
    # mean of cos 0 and cos 60 -> (1 + 0.5) / 2; not clamped: an opposite frame counts -1
    assert clip_score(frames_at(0, 60), text) == pytest.approx(75.0)
    assert clip_score(frames_at(0, 180), text) == pytest.approx(0.0, abs=1e-9)
    assert clip_score(frames_at(180), text[None]) == pytest.approx(-100.0)


def test_clip_score_of_no_frames_is_nan_and_one_prompt_is_required():
    assert math.isnan(clip_score(torch.zeros(0, 2), unit(0)))
    with pytest.raises(ValueError, match="one embedding"):
        clip_score(frames_at(0), frames_at(0, 90))


# --------------------------------------------------------------------- temporal consistency
def test_a_static_video_is_perfectly_consistent():
    features = torch.randn(1, 16).repeat(10, 1) * torch.linspace(0.5, 2.0, 10)[:, None]
    assert temporal_consistency(features) == pytest.approx(1.0)


def test_temporal_consistency_matches_the_vbench_formula_on_known_angles():
    # t=1: (cos 30 + cos 30) / 2; t=2: (cos 60 [to first] + cos 30 [to previous]) / 2
    c30, c60 = math.cos(math.radians(30)), 0.5
    expected = ((c30 + c30) / 2 + (c60 + c30) / 2) / 2
    assert temporal_consistency(frames_at(0, 30, 60)) == pytest.approx(expected)


def test_temporal_consistency_clamps_negative_cosines_at_zero_like_vbench():
    # t=1: cos 60 = 0.5 twice; t=2 at 120 deg: to the first frame cos 120 = -0.5 (clamped to 0),
    # to the previous one 0.5
    features = frames_at(0, 60, 120)
    assert temporal_consistency(features) == pytest.approx((0.5 + (0.0 + 0.5) / 2) / 2)
    assert temporal_consistency(features, clamp=False) == pytest.approx((0.5 + 0.0) / 2)


def test_temporal_consistency_of_a_single_frame_is_undefined():
    assert math.isnan(temporal_consistency(frames_at(0)))


def test_shuffled_and_noise_frames_are_less_consistent_than_an_ordered_video():
    # two shots: 9 frames of scene A (0 deg) then 9 of scene B (90 deg), a single cut
    ordered = frames_at(*[0] * 9, *[90] * 9)
    # t=1..8: 1; t=9: (0 + 0) / 2; t=10..17: (0 + 1) / 2
    assert temporal_consistency(ordered) == pytest.approx((8 + 0 + 8 * 0.5) / 17)
    interleaved = ordered[[i // 2 + 9 * (i % 2) for i in range(18)]]  # A B A B ...: 17 cuts
    assert temporal_consistency(interleaved) == pytest.approx((8 * 1 / 2 + 9 * 0) / 17)
    assert temporal_consistency(interleaved) < temporal_consistency(ordered)
    noise = torch.randn(18, 256, generator=torch.Generator().manual_seed(0))
    assert temporal_consistency(noise) < 0.1


# ---------------------------------------------------------------------- across a switch
def test_boundary_similarity_averages_all_pairs_of_the_two_windows():
    before = frames_at(90, 90, 0, 0)  # its last 2 frames point at 0 deg
    after = frames_at(60, 0, 90)  # its first 2 frames: 60 and 0 deg
    assert boundary_similarity(before, after, window=2) == pytest.approx((0.5 + 1.0) / 2)
    # window 1: the last frame of before against the first frame of after
    assert boundary_similarity(before, after, window=1) == pytest.approx(0.5)
    # windows are capped at the segments' lengths (here all 4 x 3 pairs)
    everything = cosine_matrix(before, after).clamp_min(0).mean().item()
    assert boundary_similarity(before, after, window=100) == pytest.approx(everything)


def test_boundary_and_anchor_similarity_clamp_and_handle_edge_cases():
    assert boundary_similarity(frames_at(0), frames_at(180), window=1) == 0.0
    assert boundary_similarity(frames_at(0), frames_at(180), 1, clamp=False) == pytest.approx(-1)
    assert math.isnan(boundary_similarity(torch.zeros(0, 2), frames_at(0), window=1))
    with pytest.raises(ValueError):
        boundary_similarity(frames_at(0), frames_at(0), window=0)
    assert anchor_similarity(unit(0), unit(60)) == pytest.approx(0.5)
    assert anchor_similarity(unit(0), unit(0) * 7) == pytest.approx(1.0)
    assert anchor_similarity(unit(0), unit(180)) == 0.0
    assert anchor_similarity(unit(0), unit(180), clamp=False) == pytest.approx(-1.0)


# ---------------------------------------------------------------------- segment splitting
def test_prompt_switches_take_effect_at_chunk_boundaries():
    assert chunk_aligned_starts(6, 40, 240, 1) == [0, 40, 80, 120, 160, 200]
    # 3-frame chunks (the reference): ceil(40 k / 3) * 3
    assert chunk_aligned_starts(6, 40, 240, 3) == [0, 42, 81, 120, 162, 201]
    assert chunk_aligned_starts(3, 3, 9, 3) == [0, 3, 6]
    with pytest.raises(ValueError, match="past the video"):
        chunk_aligned_starts(6, 40, 200, 3)
    with pytest.raises(ValueError, match="frames_per_prompt"):
        chunk_aligned_starts(6, 0, 240, 3)


def test_a_causal_vae_decodes_latent_frame_j_from_pixel_frame_4j_minus_3():
    assert [pixel_frame_of_latent(j, 4) for j in (0, 1, 2, 40, 240)] == [0, 1, 5, 157, 957]


def test_the_protocol_video_splits_into_six_10_second_segments():
    ranges = segment_ranges(957, [0, 40, 80, 120, 160, 200], 240, 4)
    assert ranges[0] == range(0, 157)  # latent frame 0 decodes to a single frame
    assert [len(r) for r in ranges[1:]] == [160] * 5  # 10 s at 16 fps
    assert ranges[-1].stop == 957
    # with the reference's 3-frame chunks the first switch is at latent 42 -> pixel 165
    assert segment_ranges(957, [0, 42, 81, 120, 162, 201], 240, 4)[1].start == 165


def test_videos_of_another_length_are_split_in_proportion():
    assert segment_ranges(960, [0, 40, 80, 120, 160, 200], 240, 4) == [
        range(160 * k, 160 * (k + 1)) for k in range(6)
    ]
    assert [len(r) for r in segment_ranges(12, [0, 40, 80, 120, 160, 200], 240, 4)] == [2] * 6
    with pytest.raises(ValueError, match="increase"):
        segment_ranges(12, [0, 40, 40], 240, 4)
    with pytest.raises(ValueError):
        segment_ranges(12, [1, 40], 240, 4)


# ---------------------------------------------------------------------------- aggregation
def test_scores_of_a_two_segment_video_with_known_features():
    # segment 1: 4 frames at 0 deg, segment 2: 4 frames at 90 deg; prompts point the same way
    subject = frames_at(*[0] * 4, *[90] * 4)
    background = subject.clone()
    texts = frames_at(0, 90)
    ranges = [range(0, 4), range(4, 8)]
    scores = score_video_features(subject, background, texts, ranges, boundary_frames=2)
    first, second = scores.segments
    assert first.clip_score == pytest.approx(100) and second.clip_score == pytest.approx(100)
    assert first.consistency == pytest.approx(100) and second.consistency == pytest.approx(100)
    assert math.isnan(first.cross_segment_consistency)
    assert second.boundary_subject == pytest.approx(0, abs=1e-9)
    assert second.anchor_background == pytest.approx(0, abs=1e-9)
    assert scores.cross_segment_consistency == pytest.approx(0, abs=1e-9)
    assert scores.clip_score == pytest.approx(100)
    assert scores.aesthetic_quality is None and first.aesthetic_quality is None


def test_a_switch_that_keeps_the_scene_is_fully_consistent_across_segments():
    same = frames_at(*[30] * 6)
    scores = score_video_features(
        same, same, frames_at(30, 120, 30), [range(0, 2), range(2, 4), range(4, 6)], 16
    )
    assert [s.cross_segment_consistency for s in scores.segments[1:]] == pytest.approx([100, 100])
    assert [s.clip_score for s in scores.segments] == pytest.approx([100, 0, 100], abs=1e-9)


def test_cross_segment_scores_use_subject_and_background_features_separately():
    subject = frames_at(0, 0, 60, 60)  # subject drifts by 60 deg at the switch
    background = frames_at(0, 0, 0, 0)  # background stays
    scores = score_video_features(subject, background, frames_at(0, 0), [range(2), range(2, 4)], 1)
    second = scores.segments[1]
    assert second.boundary_subject == pytest.approx(50)
    assert second.anchor_subject == pytest.approx(50)
    assert second.boundary_background == pytest.approx(100)
    assert second.cross_segment_consistency == pytest.approx(75)


def test_aesthetic_quality_is_the_mean_per_frame_score_times_100():
    same = frames_at(0, 0, 0, 0)
    aesthetic = torch.tensor([0.2, 0.4, 0.6, 0.6])
    scores = score_video_features(
        same, same, frames_at(0, 0), [range(2), range(2, 4)], aesthetic=aesthetic
    )
    assert [s.aesthetic_quality for s in scores.segments] == pytest.approx([30, 60])
    assert scores.aesthetic_quality == pytest.approx(45)


def test_score_video_features_checks_its_inputs():
    same = frames_at(0, 0, 0)
    with pytest.raises(ValueError, match="same number of frames"):
        score_video_features(same, same[:2], frames_at(0), [range(3)])
    with pytest.raises(ValueError, match="prompt embeddings"):
        score_video_features(same, same, frames_at(0, 0), [range(3)])
    with pytest.raises(ValueError, match="do not cover"):
        score_video_features(same, same, frames_at(0), [range(2)])


def test_video_scores_average_their_segments():
    def segment(k, clip, consistency, cross=math.nan):
        return SegmentScores(k, range(k, k + 1), clip, consistency, consistency, cross, cross)

    scores = VideoScores([segment(0, 10.0, 90.0), segment(1, 30.0, 100.0, 80.0)])
    assert scores.clip_score == 20.0
    assert scores.consistency == 95.0
    assert scores.subject_consistency == 95.0
    assert scores.cross_segment_consistency == 80.0
    assert math.isnan(VideoScores([segment(0, 1.0, 1.0)]).cross_segment_consistency)
