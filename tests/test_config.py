"""MemFlowConfig: presets, validation and the JSON round trip."""

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memflow_adapter import MemFlowConfig


def test_reference_preset_is_the_papers_inference_setting():
    config = MemFlowConfig.reference()
    assert (config.sink_frames, config.bank_frames, config.local_frames) == (3, 3, 9)
    assert config.frames_per_chunk == 3
    assert config.nam and not config.sma
    # local_attn_size=12 of the reference = sink 3 + local window 9
    assert config.cache_frames == 12
    # the window stores 6 past frames; the chunk's own 3 complete it
    assert config.window_capacity == 6


def test_reference_sma_turns_on_top3_activation_only():
    config = MemFlowConfig.reference_sma()
    assert config.sma and config.sma_top_k == 3
    assert dataclasses.replace(config, sma=False) == MemFlowConfig.reference()


def test_longlive_has_no_bank():
    config = MemFlowConfig.longlive()
    assert config.bank_frames == 0 and not config.nam
    assert (config.sink_frames, config.local_frames) == (3, 9)


def test_full_history_never_evicts():
    config = MemFlowConfig.full_history()
    assert config.local_frames is None
    assert config.window_capacity is None and config.cache_frames is None
    assert config.bank_frames == 0 and config.sink_frames == 0


def test_presets_take_overrides():
    config = MemFlowConfig.reference(frames_per_chunk=4, local_frames=12)
    assert config.frames_per_chunk == 4 and config.window_capacity == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sma_top_k": 0}, "sma_top_k must be >= 1, got 0"),
        ({"bank_frames": -1}, "bank_frames must be >= 0, got -1"),
        ({"sink_frames": -2}, "sink_frames must be >= 0, got -2"),
        ({"frames_per_chunk": 0}, "frames_per_chunk must be >= 1, got 0"),
        ({"record_interval": 0}, "record_interval must be >= 1, got 0"),
        ({"local_frames": 2}, "local_frames must be >= frames_per_chunk (3)"),
        ({"bank_frames": 0}, "bank_frames must be >= 1 when nam=True"),
        ({"nam": False}, "bank_frames must be 0 when nam=False"),
        ({"attention_backend": "cudnn"}, "attention_backend must be one of"),
        ({"sink_frames": 10**12}, "sink_frames must be <= 16384 (latent frames a cache can hold)"),
        ({"local_frames": 10**9}, "local_frames must be <= 16384"),
    ],
)
def test_invalid_values_are_rejected_with_the_parameter_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MemFlowConfig.reference(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sink_frames": 2.5}, "sink_frames must be an int"),
        ({"bank_frames": True}, "bank_frames must be an int"),
        ({"local_frames": "9"}, "local_frames must be an int"),
        ({"sma": 1}, "sma must be a bool"),
    ],
)
def test_wrong_types_are_rejected(overrides, message):
    with pytest.raises(TypeError, match=message):
        MemFlowConfig.reference(**overrides)


valid_configs = st.builds(
    lambda sink, bank, chunk, extra, unbounded, interval, sma, top_k, backend: MemFlowConfig(
        sink_frames=sink,
        bank_frames=bank,
        nam=bank > 0,
        frames_per_chunk=chunk,
        local_frames=None if unbounded else chunk + extra,
        record_interval=interval,
        sma=sma and top_k <= sink + bank,  # SMA selects among the sink and bank frames
        sma_top_k=top_k,
        attention_backend=backend,
    ),
    st.integers(0, 8),
    st.integers(0, 8),
    st.integers(1, 6),
    st.integers(0, 12),
    st.booleans(),
    st.integers(1, 6),
    st.booleans(),
    st.integers(1, 8),
    st.sampled_from(["sdpa", "math", "flex", "xformers"]),
)


@given(valid_configs)
def test_json_round_trip_is_lossless(config):
    assert MemFlowConfig.from_json_string(config.to_json_string()) == config


def test_json_file_round_trip(tmp_path):
    path = tmp_path / "memflow_config.json"
    MemFlowConfig.reference_sma().to_json_file(path)
    assert MemFlowConfig.from_json_file(path) == MemFlowConfig.reference_sma()


def test_keys_from_a_newer_version_are_warned_about_and_ignored():
    saved = {**MemFlowConfig.reference_sma().to_dict(), "bank_size": 3,
             "memflow_adapter_version": "9.0"}
    expected = r"ignoring MemFlowConfig keys \['bank_size'\] \(written by memflow-adapter 9.0"
    with pytest.warns(UserWarning, match=expected):
        assert MemFlowConfig.from_dict(saved) == MemFlowConfig.reference_sma()


def test_a_saved_config_carries_the_version_and_no_runtime_choice():
    import memflow_adapter

    saved = MemFlowConfig.reference(attention_backend="math").to_dict()
    assert saved["memflow_adapter_version"] == memflow_adapter.__version__
    assert "attention_backend" not in saved
    # files written before the stamp, with the backend, still load
    old = {k: v for k, v in saved.items() if k != "memflow_adapter_version"}
    assert MemFlowConfig.from_dict({**old, "attention_backend": "math"}).attention_backend == "math"


def test_the_attention_backend_is_not_part_of_a_configs_identity():
    """The same memory run with another kernel is the same config: sessions, adapters and
    pipelines accept it, and a pipeline on an attached model runs the backend it was given."""
    from memflow_adapter.pipeline import MemFlowStreamingPipeline
    from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

    assert MemFlowConfig(attention_backend="math") == MemFlowConfig()
    assert hash(MemFlowConfig(attention_backend="math")) == hash(MemFlowConfig())
    pipe = build_tiny_wan_pipeline(0)
    MemFlowStreamingPipeline(pipe, MemFlowConfig.reference(), device="cpu")
    streaming = MemFlowStreamingPipeline(
        pipe, MemFlowConfig.reference(attention_backend="math"), device="cpu"
    )
    assert streaming.attachment.create_session(4, 4).config.attention_backend == "math"


def test_json_must_be_an_object():
    with pytest.raises(ValueError, match="must be an object"):
        MemFlowConfig.from_json_string("[1, 2]")


def test_presets_are_reachable_by_name():
    assert MemFlowConfig.preset("reference_sma") == MemFlowConfig.reference_sma()
    assert MemFlowConfig.preset("longlive", local_frames=12).local_frames == 12
    with pytest.raises(ValueError, match=r"preset must be one of \['reference', 'reference_sma'"):
        MemFlowConfig.preset("memflow")
