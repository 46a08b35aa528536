"""Streaming long tuning: the student rolls out long videos chunk by chunk with its own KV cache and
MemFlow memory (sink, bank refreshed by NAM, optional SMA), prompt switches and KV recache, and is
trained by distribution matching distillation against a frozen bidirectional teacher and a
learned critic; only LoRA weights are trained.

One training step (per process):

* **student** (every ``dmd.generator_update_every`` steps): a Self-Forcing rollout of
  ``rollout.num_chunks`` chunks without gradient, each chunk denoised with the few-step schedule up
  to a random exit step; the last ``rollout.gradient_chunks`` chunks (the clip) are re-noised at a
  random level and scored by the teacher (classifier-free guidance ``dmd.guidance_scale``) and the
  critic; each clip chunk's exit step is then replayed with gradient (``rollout.py``) and its part
  of the DMD loss backpropagated.
* **critic** (every step): a fresh rollout without gradient; the critic learns to denoise its clip
  (flow matching).

The clip lies inside the last prompt segment, so the teacher and the critic score it under one
prompt (the config is checked for it). Run with ``python -m memflow_adapter.recipes.
streaming_long_tuning --config FILE`` (or ``--tiny``), ``accelerate launch`` or ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from memflow_adapter.eval.prompts import load_prompt_groups
from memflow_adapter.schedule import TABLE_SIZE
from memflow_adapter.streaming import (
    ChunkEngine,
    ChunkPlan,
    PromptConditioning,
    call_transformer,
    guided_flow,
    plan_chunks,
)

from .config import ConfigError, check
from .dmd import distribution_matching_gradient, dmd_loss
from .flow import NoiseRange, StepRandomness, flow_matching_loss, per_sample
from .models import LoraSettings, add_lora, load_transformer
from .rollout import Rollout, replay_with_gradient, self_forcing_rollout
from .training import Recipe, RecipeConfig, Trainable, exit_on_bad_input, main

NAME = "streaming_long_tuning"


@dataclass(frozen=True)
class RolloutConfig:
    """The videos the student generates at each step.

    Args:
        num_chunks: chunks per video.
        gradient_chunks: the last N chunks (the clip): DMD scores them and they carry gradient.
        chunks_per_prompt: a prompt switch (with KV recache) every N chunks.
        batch_size: videos per process and step.
        latent_height, latent_width: the latent size (pixels / 8 for Wan).
        exit_step_per_chunk: draw the exit step per chunk (else one per rollout, as Self-Forcing).
    """

    num_chunks: int = 12
    gradient_chunks: int = 4
    chunks_per_prompt: int = 4
    batch_size: int = 1
    latent_height: int = 60
    latent_width: int = 104
    exit_step_per_chunk: bool = False

    def __post_init__(self) -> None:
        for name in ("num_chunks", "gradient_chunks", "chunks_per_prompt", "batch_size",
                     "latent_height", "latent_width"):
            check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        check(
            self.gradient_chunks <= self.num_chunks,
            "gradient_chunks", f"<= num_chunks ({self.num_chunks})", self.gradient_chunks,
        )
        last_switch = (self.num_chunks - 1) // self.chunks_per_prompt * self.chunks_per_prompt
        check(
            self.num_chunks - self.gradient_chunks >= last_switch,
            "gradient_chunks",
            f"<= {self.num_chunks - last_switch} so that the clip lies inside the last prompt "
            f"segment (it starts at chunk {last_switch})",
            self.gradient_chunks,
        )

    @property
    def num_segments(self) -> int:
        return -(-self.num_chunks // self.chunks_per_prompt)


@dataclass(frozen=True)
class DMDConfig:
    """The teacher, the critic and their losses.

    Args:
        teacher: a diffusers Wan pipeline (Hub id or folder) whose transformer is the frozen
            bidirectional teacher (the paper: Wan2.1-T2V-14B).
        tiny_teacher_seed: with ``model.tiny``, the teacher is the tiny pipeline of this seed.
        guidance_scale: the teacher's classifier-free guidance (1: no unconditional pass).
        noise: where the re-noising levels of the clip are drawn.
        critic_learning_rate: the critic's AdamW learning rate.
        critic_lora: the critic's LoRA (on a copy of the base transformer).
        generator_update_every: the student is updated every N steps, the critic every step.
    """

    teacher: str = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    tiny_teacher_seed: int = 1
    guidance_scale: float = 3.0
    noise: NoiseRange = field(default_factory=NoiseRange)
    critic_learning_rate: float = 1e-4
    critic_lora: LoraSettings = field(default_factory=LoraSettings)
    generator_update_every: int = 5

    def __post_init__(self) -> None:
        check(self.guidance_scale >= 1.0, "guidance_scale", ">= 1", self.guidance_scale)
        check(self.critic_learning_rate > 0, "critic_learning_rate", "> 0",
              self.critic_learning_rate)
        check(self.generator_update_every >= 1, "generator_update_every", "an int >= 1",
              self.generator_update_every)


@dataclass(frozen=True)
class PromptDataConfig:
    """The prompts: a prompt-group file (``memflow_adapter.eval.prompts`` formats: JSONL with a
    ``prompts`` list per line, ...); each video takes consecutive prompts of a random group.
    ``prompts: null`` uses the packaged ``example_prompts.jsonl`` (a few short narratives)."""

    prompts: Path | None = None
    negative_prompt: str = ""
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        check(self.max_sequence_length >= 1, "max_sequence_length", "an int >= 1",
              self.max_sequence_length)


@dataclass(frozen=True)
class StreamingLongTuningConfig(RecipeConfig):
    """``streaming_long_tuning.yaml``: the common sections plus ``rollout``, ``dmd``, ``data``."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)


class StreamingLongTuning(Recipe):
    """Streaming long tuning: Self-Forcing rollouts with MemFlow memory trained by DMD (LoRA)."""

    config: StreamingLongTuningConfig

    def __init__(self, config: StreamingLongTuningConfig, accelerator: Accelerator) -> None:
        super().__init__(config, accelerator)
        tiny = config.model.tiny
        self.teacher = load_transformer(
            config.dmd.teacher, config.dmd.tiny_teacher_seed if tiny else None, self.dtype
        ).to(self.device)
        self.critic = load_transformer(
            config.model.base_model, config.model.tiny_seed if tiny else None, self.dtype
        ).to(self.device)
        add_lora(self.critic, config.dmd.critic_lora)
        if config.training.gradient_checkpointing:
            self.critic.enable_gradient_checkpointing()
        self.critic.train()
        prompts = config.data.prompts or Path(__file__).with_name("example_prompts.jsonl")
        self.groups = [group.prompts for group in load_prompt_groups(prompts)]
        needed = config.rollout.num_segments
        short = [i for i, prompts in enumerate(self.groups) if len(prompts) < needed]
        if short:
            raise ConfigError(
                f"data.prompts: groups {short[:5]} have fewer than the {needed} prompts a rollout "
                f"uses (rollout.num_chunks / rollout.chunks_per_prompt)"
            )
        texts = {text for group in self.groups for text in group} | {config.data.negative_prompt}
        self.embeds = self._encode(sorted(texts))

    # ------------------------------------------------------------------------------ the loop's API
    def trainables(self) -> dict[str, Trainable]:
        max_steps = self.config.training.max_steps
        every = self.config.dmd.generator_update_every
        return {
            "student": Trainable(
                self.student.model, self.config.training.learning_rate, -(-max_steps // every)
            ),
            "critic": Trainable(self.critic, self.config.dmd.critic_learning_rate, max_steps),
        }

    @property
    def batch_size(self) -> int:
        return self.config.rollout.batch_size

    def transformers(self) -> dict[str, torch.nn.Module]:
        return {**super().transformers(), "teacher": self.teacher}

    def phases(self, step: int) -> list[str]:
        if step % self.config.dmd.generator_update_every == 0:
            return ["student", "critic"]
        return ["critic"]

    def train_phase(self, name: str, step: int, randomness: StepRandomness) -> torch.Tensor:
        chunks, exit_steps, conditions, negative, noise = self._sample(randomness)
        rollout = self.config.rollout
        first = rollout.num_chunks - rollout.gradient_chunks
        session = self.student.attachment.create_session(
            rollout.latent_height, rollout.latent_width, record_trace=False
        )
        with self.student.attachment.bind(session):
            engine = self.student_engine(session, rollout.batch_size)
            gradient_from = first if name == "student" else len(chunks)
            generated = self_forcing_rollout(
                engine, chunks, exit_steps, conditions, noise, randomness, gradient_from
            )
            clip = generated.video[:, :, chunks[first].start :]
            if name == "critic":
                return self._critic_loss(clip, conditions[-1], randomness)
            target = self._dmd_target(clip, conditions[-1], negative, randomness)
            return self._student_loss(engine, generated, chunks, exit_steps, conditions, target)

    # ------------------------------------------------------------------------------------ losses
    def _student_loss(
        self,
        engine: ChunkEngine,
        generated: Rollout,
        chunks: Sequence[ChunkPlan],
        exit_steps: Sequence[int],
        conditions: Sequence[PromptConditioning],
        target: torch.Tensor,
    ) -> torch.Tensor:
        clip_start = chunks[-self.config.rollout.gradient_chunks].start

        def chunk_loss(index: int, clean: torch.Tensor) -> torch.Tensor:
            chunk = chunks[index]
            part = target[:, :, chunk.start - clip_start : chunk.stop - clip_start]
            return dmd_loss(clean, part, target.numel())

        return replay_with_gradient(
            engine, self.accelerator, generated, chunks, exit_steps, conditions, chunk_loss
        )

    @torch.no_grad()
    def _dmd_target(
        self,
        clip: torch.Tensor,
        cond: PromptConditioning,
        negative: torch.Tensor,
        randomness: StepRandomness,
    ) -> torch.Tensor:
        """``stopgrad(clip - grad)`` for the clip ``[B, C, F, h, w]`` (float64)."""
        schedule, scale = self.config.schedule, self.config.dmd.guidance_scale
        noisy, _, sigma, timestep = self._renoise(clip, randomness)
        flow = self._flow(self.teacher, noisy, timestep, cond.embeds)
        if scale != 1.0:
            flow = guided_flow(flow, self._flow(self.teacher, noisy, timestep, negative), scale)
        real = schedule.predict_clean(noisy, flow, sigma)
        fake = schedule.predict_clean(noisy, self._flow(self.critic, noisy, timestep, cond.embeds),
                                      sigma)
        return clip.double() - distribution_matching_gradient(clip, real, fake)

    def _critic_loss(
        self, clip: torch.Tensor, cond: PromptConditioning, randomness: StepRandomness
    ) -> torch.Tensor:
        noisy, noise, _, timestep = self._renoise(clip, randomness)
        flow = self._flow(self.prepared["critic"], noisy, timestep, cond.embeds)
        loss = flow_matching_loss(flow, noise, clip)
        self.accelerator.backward(loss)
        return loss.detach()

    def _flow(
        self, model: torch.nn.Module, noisy: torch.Tensor, timestep: torch.Tensor,
        embeds: torch.Tensor,
    ) -> torch.Tensor:
        """A bidirectional forward of the teacher or the critic over a whole clip."""
        conditioning = self.conditioning_inputs(self.accelerator.unwrap_model(model),
                                                noisy.shape[0])
        return call_transformer(model, noisy, timestep, embeds, self.dtype, conditioning)

    def _renoise(
        self, clip: torch.Tensor, randomness: StepRandomness
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The clip at a random noise level per sample: noisy latents, the noise, sigma
        ``[B, 1, 1, 1, 1]`` and the model timesteps ``[B]``."""
        schedule = self.config.schedule
        sigmas = randomness.sigmas(schedule, self.config.dmd.noise)
        sigma = per_sample(sigmas.to(self.device))
        noise = randomness.randn(tuple(clip.shape), self.device)
        return schedule.renoise(clip, noise, sigma), noise, sigma, TABLE_SIZE * sigma.flatten()

    # --------------------------------------------------------------------------------- sampling
    def _sample(
        self, randomness: StepRandomness
    ) -> tuple[list[ChunkPlan], list[int], list[PromptConditioning], torch.Tensor, torch.Tensor]:
        """One step's videos: chunk plan, exit step per chunk, per-segment conditioning,
        negative embeddings ``[B, L, D]`` and initial noise ``[B, C, F, h, w]``."""
        rollout, memflow = self.config.rollout, self.config.memflow
        frames = memflow.frames_per_chunk
        num_steps = len(self.config.schedule.steps)
        exits = torch.randint(
            num_steps,
            (rollout.num_chunks if rollout.exit_step_per_chunk else 1,),
            generator=randomness.shared,
        ).expand(rollout.num_chunks)
        segment_starts = [
            s * rollout.chunks_per_prompt * frames for s in range(rollout.num_segments)
        ]
        chunks = plan_chunks(segment_starts, rollout.num_chunks * frames, frames)

        videos = []
        for draw in randomness.samples:
            group = self.groups[int(torch.randint(len(self.groups), (), generator=draw))]
            offset = int(torch.randint(len(group) - rollout.num_segments + 1, (), generator=draw))
            videos.append(group[offset : offset + rollout.num_segments])
        conditions = [
            PromptConditioning.of(self.student.attachment, self._stack([v[s] for v in videos]))
            for s in range(rollout.num_segments)
        ]
        negative = self._stack([self.config.data.negative_prompt] * rollout.batch_size)
        shape = (
            rollout.batch_size,
            self.student.model.config.in_channels,
            rollout.num_chunks * frames,
            rollout.latent_height,
            rollout.latent_width,
        )
        return chunks, exits.tolist(), conditions, negative, randomness.randn(shape, self.device)

    def _stack(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.cat([self.embeds[text] for text in texts]).to(self.device, self.dtype)

    @torch.no_grad()
    def _encode(self, texts: list[str], batch_size: int = 16) -> dict[str, torch.Tensor]:
        """Every prompt's embeddings ``[1, L, D]``, computed once and kept on the CPU."""
        pipe = self.student.pipe
        pipe.text_encoder.to(self.device)
        embeds = {}
        for first in range(0, len(texts), batch_size):
            batch = texts[first : first + batch_size]
            encoded, _ = pipe.encode_prompt(
                batch,
                do_classifier_free_guidance=False,
                max_sequence_length=self.config.data.max_sequence_length,
                device=self.device,
                dtype=self.dtype,
            )
            embeds.update({text: row[None].cpu() for text, row in zip(batch, encoded, strict=True)})
        pipe.text_encoder.to("cpu")
        return embeds


def cli(argv: Sequence[str] | None = None) -> Path:
    return main(NAME, StreamingLongTuningConfig, StreamingLongTuning, argv)


if __name__ == "__main__":
    exit_on_bad_input(NAME, cli)
