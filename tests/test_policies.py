"""Memory policies: each built-in's picks on a probe stream are what its rule says, a policy
written here plugs in without touching the core, names round-trip and bad ones are refused."""

import dataclasses
import math

import pytest
import torch

from memflow_adapter import MemFlowConfig, StreamingSession
from memflow_adapter.hub import MemFlowAdapter
from memflow_adapter.policies import (
    ACTIVATION_POLICIES,
    BANK_POLICIES,
    ActivationPolicy,
    BankPolicy,
    register_activation_policy,
    register_bank_policy,
    top_k_in_time_order,
)

# The probe: 1-frame chunks, a 1-frame sink, a 3-slot bank that every chunk's frame enters, so
# the bank is full from chunk 4 on and each commit drops one of its frames.
PROBE = MemFlowConfig.reference(
    sink_frames=1, bank_frames=3, local_frames=2, frames_per_chunk=1, record_interval=1
)
TOKENS, HEADS, DIM = 2, 2, 16


def probe(**overrides) -> MemFlowConfig:
    return dataclasses.replace(PROBE, **overrides)

CHUNKS = 12
# Frame f's keys point at ANGLES[f] in the (e0, e1) plane: similarities between frames are the
# cosines of their angle differences (distinct, so no rule meets a tie).
ANGLES = torch.rand(64, generator=torch.Generator().manual_seed(3)) * math.pi
TEXT_ANGLE = 1.0  # the prompt's keys point there


def direction(angle: float) -> torch.Tensor:
    vector = torch.zeros(DIM)
    vector[0], vector[1] = math.cos(angle), math.sin(angle)
    return vector


def probe_qkv(layer: int, start: int, frames: int):
    """Keys (and queries) of frame f along ANGLES[f]; values one-hot e_f, so an output shows
    which frames a query attended to."""
    keys = torch.stack([direction(ANGLES[f]) for f in range(start, start + frames)])
    values = torch.eye(DIM)[[f % DIM for f in range(start, start + frames)]]
    as_tokens = lambda x: x.repeat_interleave(TOKENS, 0)[None, :, None, :].expand(1, -1, HEADS, -1)  # noqa: E731
    return as_tokens(keys), as_tokens(keys), as_tokens(values)


def run_probe(config: MemFlowConfig, chunks: int = CHUNKS) -> StreamingSession:
    session = StreamingSession(config, num_layers=1, tokens_per_frame=TOKENS)
    text_keys = [direction(TEXT_ANGLE).expand(1, 3, HEADS, DIM)]
    for _ in range(chunks):
        start = session.next_frame
        session.begin_chunk(text_keys)
        with session.context_pass():
            session.attend(0, *probe_qkv(0, start, config.frames_per_chunk))
    return session


def banks(session: StreamingSession) -> list[list[int]]:
    """The bank (layer 0, batch element 0) while each chunk was generated."""
    return [chunk.bank[0][0] if chunk.bank else [] for chunk in session.trace()]


def expected_banks(keep_score, admits_sink: bool = True) -> list[list[int]]:
    """The banks a policy's rule gives: the bank fills with each chunk's frame, then keeps the 2
    frames ``keep_score(bank, staged)`` ranks highest, in time order, and appends the staged."""
    bank, history = [], [[]]
    for chunk in range(1, CHUNKS):
        staged = chunk - 1
        if admits_sink or staged >= PROBE.sink_frames:
            if len(bank) == 3:
                scores = keep_score(bank, staged)
                assert len(set(scores)) == len(scores), "the probe must not meet a tie"
                kept = sorted(sorted(range(3), key=lambda i: -scores[i])[:2])
                bank = [bank[i] for i in kept]
            bank = [*bank, staged]
        history.append(list(bank))
    return history


def similarity(frame: int, angle: float) -> float:
    return math.cos(ANGLES[frame] - angle)


@pytest.mark.parametrize(
    ("policy", "rule"),
    [
        ("nam", lambda bank, staged: [similarity(f, TEXT_ANGLE) for f in bank]),
        ("recency", lambda bank, staged: list(bank)),
        ("visual", lambda bank, staged: [similarity(f, ANGLES[staged]) for f in bank]),
    ],
)
def test_a_bank_policy_keeps_the_frames_its_rule_ranks_highest(policy, rule):
    session = run_probe(probe(bank_policy=policy))
    assert banks(session) == expected_banks(rule)


def test_nam_without_the_sink_never_spends_a_slot_on_a_sink_frame():
    with_sink = banks(run_probe(PROBE))
    without = banks(run_probe(probe(bank_policy="nam_no_sink")))
    assert with_sink[1] == [0]  # the reference bank's first slot holds the sink's frame 0
    assert all(0 not in bank for bank in without)
    rule = lambda bank, staged: [similarity(f, TEXT_ANGLE) for f in bank]  # noqa: E731
    assert without == expected_banks(rule, admits_sink=False)


def test_nam_without_the_sink_fills_the_reference_bank_one_chunk_later():
    session = run_probe(MemFlowConfig.reference(bank_policy="nam_no_sink"), chunks=11)
    # the reference fills its bank with frames 6, 15, 24 (chunk 0 stages frame 0 in slot 0)
    assert banks(session)[-1] == [9, 18, 27]


def test_uniform_keyframes_drop_the_frame_whose_neighbours_are_closest():
    # gap each frame's removal leaves, from the sink's last frame (0) to the staged frame;
    # of equal gaps the newer frame leaves
    def rule(bank, staged):
        bounds = [PROBE.sink_frames - 1, *bank, staged]
        return [bounds[i + 2] - bounds[i] - bank[i] / (staged + 1) for i in range(3)]

    session = run_probe(probe(bank_policy="uniform"))
    history = banks(session)
    assert history == expected_banks(rule)
    # by hand: at chunk 5 the gaps of [1, 2, 3] are all 2, so the newest (3) leaves
    assert history[4:6] == [[1, 2, 3], [1, 2, 4]]


def test_top_k_in_time_order_returns_the_best_indices_ascending():
    scores = torch.tensor([[0.5, 3.0, -1.0, 2.0], [9.0, 0.0, 1.0, 8.0]])
    assert top_k_in_time_order(scores, 2).tolist() == [[1, 3], [0, 3]]


# ------------------------------------------------------------------------ policies of one's own
@pytest.fixture
def oldest_first():
    """A bank policy written here: keep the oldest frames."""

    @register_bank_policy("oldest_first_for_test")
    class OldestFirst(BankPolicy):
        def score(self, candidates):
            return -candidates.frames.float()

    yield "oldest_first_for_test"
    del BANK_POLICIES["oldest_first_for_test"]


@pytest.fixture
def along_e0():
    """An activation policy written here: attend to the memory frames whose keys point most
    along e0, whatever the queries."""

    @register_activation_policy("along_e0_for_test")
    class AlongE0(ActivationPolicy):
        def score(self, query, memory_keys):
            return memory_keys[..., 0].mean(dim=2).transpose(1, 2)  # [B, C, H] -> [B, H, C]

    yield "along_e0_for_test"
    del ACTIVATION_POLICIES["along_e0_for_test"]


def test_a_bank_policy_written_outside_the_library_plugs_in_by_name(oldest_first):
    session = run_probe(probe(bank_policy=oldest_first))
    assert banks(session)[4:7] == [[0, 1, 3], [0, 1, 4], [0, 1, 5]]


def test_an_activation_policy_written_outside_the_library_plugs_in_by_name(along_e0):
    # recency: the sink's frame 0 never stays in the bank, so no memory frame comes twice
    config = probe(bank_policy="recency", sma=True, sma_top_k=2, activation_policy=along_e0)
    session = StreamingSession(config, num_layers=1, tokens_per_frame=TOKENS)
    text_keys = [direction(TEXT_ANGLE).expand(1, 3, HEADS, DIM)]
    for chunk in range(CHUNKS):
        session.begin_chunk(text_keys)
        with session.context_pass():
            output = session.attend(0, *probe_qkv(0, chunk, 1))
    memory = [0, *banks(session)[-1]]  # the sink's frame, then the bank's
    alignment = [math.cos(ANGLES[f]) for f in memory]
    picked = sorted(memory[i] for i in sorted(range(4), key=lambda i: -alignment[i])[:2])
    activated = session.last_chunk_memory().activated[0][0].frames[0]
    assert activated == [picked, picked]  # both heads
    # one-hot values: the output holds the picked memory frames and the window, nothing else
    attended = (output[0, 0, 0] > 0).nonzero().flatten().tolist()
    window = [CHUNKS - 2, CHUNKS - 1]
    assert attended == sorted({*picked, *window})


# ------------------------------------------------------------------------------ names and files
def test_policy_names_round_trip_through_a_config_file_and_an_adapter(tmp_path):
    config = MemFlowConfig.reference_sma(bank_policy="visual")
    assert MemFlowConfig.from_json_string(config.to_json_string()) == config
    assert config.describe() == "sink 3, bank 3 (visual), local 9, 3-frame chunks, SMA top 3"
    adapter = MemFlowAdapter(config, None, "wan", {"num_layers": 2})
    assert MemFlowAdapter.from_pretrained(adapter.save_pretrained(tmp_path)).config == config


def test_a_config_saved_before_policies_existed_reads_as_the_reference():
    saved = MemFlowConfig.reference().to_dict()
    del saved["bank_policy"], saved["activation_policy"]
    assert MemFlowConfig.from_dict(saved) == MemFlowConfig.reference()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bank_policy": "nope"}, r"bank_policy must be one of \[.*'nam', 'nam_no_sink'"),
        ({"activation_policy": "nope", "sma": True}, "activation_policy must be one of"),
        ({"bank_policy": 3}, "bank_policy must be a str"),
        ({"bank_policy": "recency", "nam": False, "bank_frames": 0}, "needs nam=True"),
        ({"activation_policy": "sma_other"}, "activation_policy must be one of"),
    ],
)
def test_bad_policy_names_are_refused_by_parameter(overrides, message):
    with pytest.raises((TypeError, ValueError), match=message):
        MemFlowConfig.reference(**overrides)


def test_registering_refuses_what_is_not_a_policy_and_taken_names():
    with pytest.raises(TypeError, match="subclass of BankPolicy"):
        register_bank_policy("not_a_policy_for_test")(object)
    with pytest.raises(ValueError, match="'nam' is already registered"):
        register_bank_policy("nam")(type("Other", (BankPolicy,), {"score": lambda s, c: c}))
    with pytest.raises(ValueError, match="identifier"):
        register_bank_policy("two words")


def test_a_policy_returning_scores_of_the_wrong_shape_is_named():
    @register_bank_policy("one_score_for_test")
    class OneScore(BankPolicy):
        def score(self, candidates):
            return torch.zeros(1)

    try:
        config = probe(bank_policy="one_score_for_test")
        with pytest.raises(ValueError, match=r"OneScore returned scores of shape \(1,\)"):
            run_probe(config, chunks=5)
    finally:
        del BANK_POLICIES["one_score_for_test"]
