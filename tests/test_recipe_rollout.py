"""Self-Forcing rollouts with MemFlow memory: the replay gives a rollout exactly its gradient."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from memflow_adapter import MemFlowConfig, apply_memflow
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_adapter.streaming import ChunkEngine, PromptConditioning, plan_chunks
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline
from recipes.dmd import dmd_loss
from recipes.flow import StepRandomness
from recipes.models import LoraSettings, add_lora, trainable_parameters
from recipes.rollout import replay_with_gradient, self_forcing_rollout

CONFIG = MemFlowConfig.reference_sma(
    sink_frames=1, bank_frames=2, local_frames=4, frames_per_chunk=2, record_interval=1,
    sma_top_k=2,
)
SCHEDULE = FlowMatchSchedule()


@pytest.fixture(scope="module")
def setup():
    pipe = build_tiny_wan_pipeline(0)
    model = pipe.transformer
    add_lora(model, LoraSettings(rank=2, alpha=2))
    with torch.no_grad():  # a LoRA that is not zero, so that every LoRA weight gets gradient
        for parameter in trainable_parameters(model):
            parameter.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(parameter.numel()))
    attachment = apply_memflow(model, CONFIG)
    with torch.no_grad():
        embeds = [pipe.encode_prompt(text, do_classifier_free_guidance=False,
                                     max_sequence_length=8)[0]
                  for text in ("a fox in the snow", "the fox jumps", "the fox sleeps")]
    conditions = [PromptConditioning.of(attachment, e) for e in embeds]
    # Prompt switches at chunks 2 and 4; gradient through chunks 3 to 5.
    chunks = plan_chunks([0, 4, 8], 12, 2)
    yield model, attachment, conditions, chunks
    AcceleratorState._reset_state(reset_partial_state=True)


EXIT_STEPS = [3, 1, 0, 2, 3, 1]


def one_graph_gradient(model, attachment, conditions, chunks, noise, target, gradient_from):
    """The reference: one autograd graph through the exit steps of the gradient chunks, one
    backward of the whole loss (no replay)."""
    randomness = StepRandomness.for_step(0, 0, 0)
    session = attachment.create_session(4, 4, record_trace=False)
    video = torch.zeros_like(noise)
    loss = 0.0
    with attachment.bind(session):
        engine = ChunkEngine(model, session, SCHEDULE)
        for index, chunk in enumerate(chunks):
            cond = conditions[chunk.segment]
            engine.open_chunk(chunk, cond, video)
            noisy = noise[:, :, chunk.start : chunk.stop].double()
            for step in range(EXIT_STEPS[index] + 1):
                timestep = SCHEDULE.timesteps[step]
                grad = index >= gradient_from and step == EXIT_STEPS[index]
                flow = engine.flow(noisy, timestep, cond.embeds, grad)
                clean = SCHEDULE.predict_clean(noisy, flow, SCHEDULE.sigma_at(timestep))
                if step < EXIT_STEPS[index]:
                    eps = randomness.randn(noisy.shape, noisy.device)
                    next_sigma = SCHEDULE.sigma_at(SCHEDULE.timesteps[step + 1])
                    noisy = SCHEDULE.renoise(clean.detach(), eps, next_sigma)
            if index >= gradient_from:
                part = target[:, :, chunk.start - chunks[gradient_from].start :][:, :, :2]
                loss = loss + dmd_loss(clean, part, target.numel())
            video[:, :, chunk.start : chunk.stop] = clean.detach().float()
            engine.commit(video[:, :, chunk.start : chunk.stop], cond)
    loss.backward()
    return video, [parameter.grad.clone() for parameter in trainable_parameters(model)]


def test_the_replay_gives_the_gradient_of_one_graph_over_the_rollout(setup):
    model, attachment, conditions, chunks = setup
    noise = torch.randn(1, 16, 12, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(2)).double()
    gradient_from = 3
    model.zero_grad(set_to_none=True)
    expected_video, expected = one_graph_gradient(
        model, attachment, conditions, chunks, noise, target, gradient_from
    )

    model.zero_grad(set_to_none=True)
    session = attachment.create_session(4, 4, record_trace=False)
    with attachment.bind(session):
        engine = ChunkEngine(model, session, SCHEDULE)
        rollout = self_forcing_rollout(
            engine, chunks, EXIT_STEPS, conditions, noise, StepRandomness.for_step(0, 0, 0),
            gradient_from,
        )
        replayed = []

        def chunk_loss(index, clean):
            replayed.append(clean.detach().float())
            start = chunks[index].start - chunks[gradient_from].start
            return dmd_loss(clean, target[:, :, start : start + 2], target.numel())

        replay_with_gradient(
            engine, Accelerator(cpu=True), rollout, chunks, EXIT_STEPS, conditions, chunk_loss
        )
    assert torch.equal(rollout.video, expected_video)
    assert torch.equal(torch.cat(replayed, dim=2), rollout.video[:, :, 6:])
    actual = [parameter.grad for parameter in trainable_parameters(model)]
    assert all(grad.abs().sum() > 0 for grad in expected)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert sorted(rollout.exit_inputs) == [3, 4, 5]
    assert [chunk.recache for chunk in chunks] == [False, False, True, False, True, False]
