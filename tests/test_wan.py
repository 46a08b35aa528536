"""Wan integration specifics (the family-independent specification is test_families.py):
frame-by-frame cache content, the recache, RoPE offsets, text keys and attachment errors."""

from contextlib import contextmanager

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from integrations import WanIntegration
from integrations.wan import apply_wan_rotary
from memflow_adapter import MemFlowConfig, SessionStateError, StreamingSession
from memflow_adapter.hooks import apply_memflow, get_memflow, remove_memflow
from memflow_adapter.positions import RopeTable
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import ChunkEngine, PromptConditioning, PromptSchedule

from tiny_models import tiny_wan

CHUNK = 3
LATENT_H = LATENT_W = 4  # 2x2 patches: 4 tokens per latent frame
TOKENS = 4


class MaskedWanProcessor(WanAttnProcessor):
    """diffusers' own Wan processor under a fixed token mask; records post-RoPE keys."""

    def __init__(self, mask: torch.Tensor | None, keys_log: list):
        super().__init__()
        self.mask = mask
        self.keys_log = keys_log

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        self.keys_log.append(apply_wan_rotary(key, *rotary_emb))
        return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)


def reference_forward(model, latents, timestep, prompt_embeds, mask=None):
    """The model's own forward (diffusers processors) under ``mask``; returns the output and the
    post-RoPE keys of every layer ``[B, N, H, D]``."""
    originals = [block.attn1.processor for block in model.blocks]
    keys = [[] for _ in model.blocks]
    for block, log in zip(model.blocks, keys, strict=True):
        block.attn1.set_processor(MaskedWanProcessor(mask, log))
    try:
        output = model(latents, timestep, prompt_embeds, return_dict=False)[0]
    finally:
        for block, processor in zip(model.blocks, originals, strict=True):
            block.attn1.set_processor(processor)
    return output, [log[0] for log in keys]


@pytest.fixture
def model():
    return tiny_wan()


@pytest.fixture
def inputs(generator):
    latents = torch.randn(1, 16, 4 * CHUNK, LATENT_H, LATENT_W, generator=generator)
    prompt = torch.randn(1, 8, 16, generator=generator)
    other_prompt = torch.randn(1, 8, 16, generator=generator)
    return latents, prompt, other_prompt


def stream_context_passes(attachment, session, latents, timestep, prompt, chunks, denoise=0):
    outputs = []
    text_keys = attachment.text_keys(prompt)
    for chunk in range(chunks):
        frames = latents[:, :, chunk * CHUNK : (chunk + 1) * CHUNK]
        session.begin_chunk(text_keys)
        for _ in range(denoise):
            with session.denoise_pass():
                attachment.model(frames, timestep, prompt)
        with session.context_pass():
            outputs.append(attachment.model(frames, timestep, prompt, return_dict=False)[0])
    return torch.cat(outputs, dim=2)


@torch.no_grad()
def test_remove_memflow_restores_the_model_bit_for_bit(model, inputs):
    latents, prompt, _ = inputs
    timestep = torch.tensor([500.0])
    before = model(latents, timestep, prompt, return_dict=False)[0]
    processors = [block.attn1.processor for block in model.blocks]
    attachment = apply_memflow(model, MemFlowConfig.reference())
    with attachment.bind(attachment.create_session(LATENT_H, LATENT_W)) as session:
        session.begin_chunk(attachment.text_keys(prompt))
        with session.context_pass():
            model(latents[:, :, :CHUNK], timestep, prompt)
    remove_memflow(model)
    after = model(latents, timestep, prompt, return_dict=False)[0]
    assert torch.equal(before, after)
    assert [block.attn1.processor for block in model.blocks] == processors
    assert get_memflow(model) is None


@torch.no_grad()
@pytest.mark.parametrize(
    "config", [MemFlowConfig.longlive(), MemFlowConfig.reference()], ids=["longlive", "reference"]
)
def test_cached_frames_are_the_ones_design_predicts_frame_by_frame(model, generator, config):
    chunks = 8
    latents = torch.randn(1, 16, chunks * CHUNK, LATENT_H, LATENT_W, generator=generator)
    prompt = torch.randn(1, 8, 16, generator=generator)
    timestep = torch.tensor([0.0])
    # layer 0's keys do not depend on attention, so the full forward gives them per frame
    _, reference_keys = reference_forward(model, latents, timestep, prompt)
    frame_keys = reference_keys[0].unflatten(1, (-1, TOKENS))  # [B, F, T, H, D]

    runs = []
    for _ in range(2):
        attachment = apply_memflow(model, config)
        session = attachment.create_session(LATENT_H, LATENT_W)
        with attachment.bind(session):
            runs.append(
                stream_context_passes(
                    attachment, session, latents, timestep, prompt, chunks, denoise=1
                )
            )
        remove_memflow(model)
        cache = session.layers[0]
        assert list(cache.window_frames) == list(range(18, 24))
        sink = cache.memory()[0][:, : 3 * TOKENS]  # memory = sink frames, then the bank
        torch.testing.assert_close(sink.unflatten(1, (-1, TOKENS)), frame_keys[:, 0:3])
        window, _ = cache.window()
        torch.testing.assert_close(window.unflatten(1, (-1, TOKENS)), frame_keys[:, 18:24])
        if config.bank_frames:
            bank_frames = cache.bank_frame_index[0].tolist()
            assert bank_frames == [6, 15, 18]  # chunks 2, 5 fill slots 0, 1; chunk 6 slot 2
            torch.testing.assert_close(cache.bank_by_frame(), frame_keys[:, bank_frames])
            assert cache.staged_frame == 21
    assert torch.equal(runs[0], runs[1])


@torch.no_grad()
def test_recache_rewrites_the_window_under_the_new_prompt(model, inputs):
    latents, prompt, other_prompt = inputs
    clean = latents[:, :, : 2 * CHUNK]
    zero = torch.tensor([0.0])
    attachment = apply_memflow(model, MemFlowConfig.longlive())
    session = attachment.create_session(LATENT_H, LATENT_W)
    with attachment.bind(session):
        stream_context_passes(attachment, session, clean, zero, prompt, chunks=2)
        session.begin_chunk(attachment.text_keys(other_prompt))
        with session.switch_prompt() as window:
            model(clean[:, :, window.start_frame : window.stop_frame], zero, other_prompt)
    remove_memflow(model)
    # the video fits in the cache: the recache is a bidirectional pass over all 6 frames
    _, direct_keys = reference_forward(model, clean, zero, other_prompt)
    for layer, cache in enumerate(session.layers):
        keys, _ = cache.context()
        torch.testing.assert_close(keys, direct_keys[layer], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_recache_of_a_long_video_keeps_the_sink_and_the_bank(model, generator):
    chunks = 6
    latents = torch.randn(1, 16, chunks * CHUNK, LATENT_H, LATENT_W, generator=generator)
    prompt, other_prompt = (torch.randn(1, 8, 16, generator=generator) for _ in range(2))
    zero = torch.tensor([0.0])
    attachment = apply_memflow(model, MemFlowConfig.reference())
    session = attachment.create_session(LATENT_H, LATENT_W)
    with attachment.bind(session):
        stream_context_passes(attachment, session, latents, zero, prompt, chunks)
        session.begin_chunk(attachment.text_keys(other_prompt))
        before = [cache.state_dict() for cache in session.layers]
        with session.switch_prompt() as window:
            assert (window.start_frame, window.stop_frame, window.protect_sink) == (6, 18, True)
            model(latents[:, :, 6:18], zero, other_prompt)
    for cache, old in zip(session.layers[1:], before[1:], strict=True):
        t = TOKENS
        assert torch.equal(cache.keys.codes[:, : 6 * t], old["keys"][:, : 6 * t])  # sink and bank
        assert not torch.allclose(cache.keys.codes[:, 6 * t :], old["keys"][:, 6 * t :])  # window


@torch.no_grad()
def test_rope_offset_gives_the_absolute_positions_of_the_chunk(model):
    integration = WanIntegration(model)
    whole = torch.zeros(1, 16, 9, LATENT_H, LATENT_W)
    cos_all, sin_all = model.rope(whole)
    cos, sin = integration.rope_forward(model.rope, torch.tensor(6), whole[:, :, :3])
    assert torch.equal(cos, cos_all[:, 6 * TOKENS :]) and torch.equal(sin, sin_all[:, 6 * TOKENS :])


def test_a_session_that_does_not_know_the_models_rope_table_cannot_be_bound(model):
    attachment = apply_memflow(model, MemFlowConfig.reference())
    config, tokens = attachment.config, attachment.create_session(8, 8).tokens_per_frame
    no_table = StreamingSession(config, attachment.num_layers, tokens)
    longer = StreamingSession(
        config, attachment.num_layers, tokens, rope=RopeTable(2048, lambda keys, shift: keys)
    )
    for session in (no_table, longer):
        with pytest.raises(ValueError, match="must know the model's RoPE table"):
            attachment.session = session


@torch.no_grad()
def test_calls_outside_a_pass_or_without_a_session_are_refused(model, inputs):
    latents, prompt, _ = inputs
    attachment = apply_memflow(model, MemFlowConfig.reference())
    with pytest.raises(SessionStateError, match="no session is bound"):
        model(latents[:, :, :CHUNK], torch.tensor([0.0]), prompt)
    with (
        attachment.bind(attachment.create_session(LATENT_H, LATENT_W)),
        pytest.raises(SessionStateError, match="inside session.denoise_pass"),
    ):
        model(latents[:, :, :CHUNK], torch.tensor([0.0]), prompt)
    with pytest.raises(ValueError, match="already attached"):
        apply_memflow(model, MemFlowConfig.reference())


def test_a_session_of_another_config_cannot_be_bound(model):
    attachment = apply_memflow(model, MemFlowConfig.reference())
    other = apply_memflow(tiny_wan(), MemFlowConfig.longlive()).create_session(4, 4)
    with pytest.raises(ValueError, match="differs from the config"), attachment.bind(other):
        pass


@torch.no_grad()
def test_a_session_may_differ_from_its_attachment_in_sma_only(model, inputs):
    """A recipe rolls a dense-attached model out with SMA in some sessions: such a session
    computes exactly what the model attached with SMA computes; any other difference (a cache
    layout the hooks depend on) is refused."""
    latents, prompt, _ = inputs
    dense, sparse = MemFlowConfig.reference(), MemFlowConfig.reference_sma(sma_top_k=1)

    def stream(attachment, session):
        engine = ChunkEngine(model, session, FlowMatchSchedule(stochastic=False))
        cond = PromptConditioning.of(attachment, prompt)
        video = latents.float().clone()
        schedule = PromptSchedule.from_prompts(["a"], latents.shape[2])
        with attachment.bind(session):
            for chunk in schedule.plan(latents.shape[2], dense.frames_per_chunk):
                engine.step(chunk, cond, latents, video)
        return video

    attachment = apply_memflow(model, sparse)
    expected = stream(attachment, attachment.create_session(LATENT_H, LATENT_W))
    remove_memflow(model)
    attachment = apply_memflow(model, dense)
    session = attachment.create_session(LATENT_H, LATENT_W, config=sparse)
    assert session.config == sparse
    assert torch.equal(stream(attachment, session), expected)
    dense_video = stream(attachment, attachment.create_session(LATENT_H, LATENT_W))
    assert not torch.allclose(dense_video, expected)  # SMA did drop memory frames
    with pytest.raises(ValueError, match="in more than SMA"):
        attachment.create_session(LATENT_H, LATENT_W, config=MemFlowConfig.longlive())


def test_text_keys_are_the_cross_attention_keys_per_layer(model, inputs):
    _, prompt, _ = inputs
    keys = WanIntegration(model).text_keys(prompt)
    context = model.condition_embedder.text_embedder(prompt)
    assert len(keys) == 2
    for block, layer_keys in zip(model.blocks, keys, strict=True):
        direct = block.attn2.norm_k(block.attn2.to_k(context)).unflatten(2, (2, -1))
        assert layer_keys.shape == (1, 8, 2, 12)
        assert torch.equal(layer_keys, direct)


def test_the_attachments_text_keys_run_inside_its_outside_forward_context(model, inputs):
    """A trainer that shards the weights (the recipes' FSDP2) makes them whole around the calls
    MemFlow makes outside the model's forward: the attachment enters ``outside_forward`` once
    per ``text_keys`` call and computes the keys inside it."""
    _, prompt, _ = inputs
    attachment = apply_memflow(model, MemFlowConfig.reference())
    events = []

    @contextmanager
    def recorded():
        events.append("enter")
        yield
        events.append("exit")

    to_k = model.blocks[0].attn2.to_k
    hook = to_k.register_forward_hook(lambda *_: events.append("to_k"))
    attachment.outside_forward = recorded
    keys = attachment.text_keys(prompt)
    hook.remove()
    assert events == ["enter", "to_k", "exit"]
    assert all(torch.equal(a, b) for a, b in zip(keys, WanIntegration(model).text_keys(prompt),
                                                 strict=True))
