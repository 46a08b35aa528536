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
  of the DMD loss backpropagated (with ``dmd.regression_weight``, plus its part of a regression to
  the clip of the ``data.dataset`` video whose prompts the rollout follows).
* **critic** (every step): a fresh rollout without gradient; the critic learns to denoise its clip
  (flow matching).

The clip lies inside one prompt segment, so the teacher and the critic score it under one
prompt (the config is checked for it): the last one, or with ``rollout.clip_segment_weights`` a
segment drawn per step (the rollout then stops at that segment's end). With ``dmd.scoring:
streaming`` the teacher and the critic score the clip as streaming models, chunk by chunk in
their own MemFlow sessions teacher-forced on the rollout's earlier chunks (a streaming teacher
such as the narrative world's model, which sees the memory the student's video left); with
``rollout.sma_share`` a share of the steps roll the student out with SMA on.

Run with ``python -m recipes.streaming_long_tuning --config FILE`` (or
``--tiny``), ``accelerate launch`` or ``torchrun``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from memflow_adapter import MemFlowAttachment, MemFlowConfig, apply_memflow
from memflow_adapter.streaming import (
    ChunkEngine,
    ChunkPlan,
    PromptConditioning,
    call_transformer,
    guided_flow,
    plan_chunks,
)
from memflow_apps.shared.latents import DatasetError, LatentVideoDataset
from memflow_apps.shared.prompts import load_prompt_groups

from .config import ConfigError, check
from .dmd import distribution_matching_gradient, dmd_loss
from .flow import NoiseRange, StepRandomness, flow_matching_loss
from .models import LoraSettings, add_lora, load_teacher
from .rollout import (
    Rollout,
    backward_chunk_by_chunk,
    commit_clean_chunks,
    replay_with_gradient,
    self_forcing_rollout,
)
from .training import Recipe, RecipeConfig, Trainable, exit_on_bad_input, main

NAME = "streaming_long_tuning"
#: How the teacher and the critic score a clip (``dmd.scoring``).
SCORINGS = ("clip", "streaming")


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
        clip_segment_weights: where the clip lies: one weight per prompt segment; each step
            draws a segment with these weights, the rollout stops at its end and the clip is its
            last ``gradient_chunks`` chunks (e.g. more weight on a story's returning segment).
            ``null``: always the last segment, the whole rollout.
        sma_share: the probability that a step's student rollouts (and its replay) run with SMA
            on (``memflow`` with ``sma: true``), so that one run trains the dense and the sparse
            memory; 0: never.
    """

    num_chunks: int = 12
    gradient_chunks: int = 4
    chunks_per_prompt: int = 4
    batch_size: int = 1
    latent_height: int = 60
    latent_width: int = 104
    exit_step_per_chunk: bool = False
    clip_segment_weights: tuple[float, ...] | None = None
    sma_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_chunks", "gradient_chunks", "chunks_per_prompt", "batch_size",
                     "latent_height", "latent_width"):
            check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        check(
            self.gradient_chunks <= self.num_chunks,
            "gradient_chunks", f"<= num_chunks ({self.num_chunks})", self.gradient_chunks,
        )
        check(0.0 <= self.sma_share <= 1.0, "sma_share", "a probability in [0, 1]",
              self.sma_share)
        weights = self.clip_segment_weights
        if weights is not None:
            check(
                len(weights) == self.num_segments
                and all(weight >= 0 for weight in weights) and sum(weights) > 0,
                "clip_segment_weights",
                f"{self.num_segments} weights >= 0 (one per prompt segment), not all 0",
                weights,
            )
        for segment in self.clip_segments:
            chunks = self.segment_chunks(segment)
            check(
                self.gradient_chunks <= len(chunks),
                "gradient_chunks",
                f"<= {len(chunks)} so that the clip lies inside prompt segment {segment} (chunks "
                f"{chunks.start}..{chunks.stop - 1})",
                self.gradient_chunks,
            )

    @property
    def num_segments(self) -> int:
        return -(-self.num_chunks // self.chunks_per_prompt)

    @property
    def clip_segments(self) -> list[int]:
        """The prompt segments a clip can lie in."""
        if self.clip_segment_weights is None:
            return [self.num_segments - 1]
        return [segment for segment, weight in enumerate(self.clip_segment_weights) if weight > 0]

    def segment_chunks(self, segment: int) -> range:
        """The chunk indices of prompt segment ``segment``."""
        start = segment * self.chunks_per_prompt
        return range(start, min(start + self.chunks_per_prompt, self.num_chunks))


@dataclass(frozen=True)
class DMDConfig:
    """The teacher, the critic and their losses.

    Args:
        teacher: a diffusers Wan pipeline (Hub id or folder) whose transformer is the frozen
            bidirectional teacher (the paper: Wan2.1-T2V-14B), or a pipeline factory
            ``module:function`` (as ``model.pipeline``) whose transformer is.
        teacher_weights: optional full weights loaded into the teacher's transformer: an
            adapter folder or a recipe checkpoint of a model trained in full (as
            ``model.student_weights``; e.g. the memory fine-tuned model being distilled).
        tiny_teacher_seed: with ``model.tiny``, the teacher is the tiny pipeline of this seed.
        guidance_scale: the teacher's classifier-free guidance (1: no unconditional pass).
        noise: where the re-noising levels of the clip are drawn.
        critic_learning_rate: the critic's AdamW learning rate.
        critic_lora: the critic's LoRA (on a copy of the base transformer).
        generator_update_every: the student is updated every N steps, the critic every step.
        scoring: how the teacher and the critic score a clip: ``clip``, one bidirectional pass
            over it (a bidirectional teacher, the paper's); ``streaming``, chunk by chunk, each
            in its own MemFlow session (``memflow`` layout) teacher-forced on the rollout's
            earlier chunks, as a streaming teacher samples: the scores then see the memory the
            student's video left (a streaming teacher such as the narrative world's model).
        memory_guidance_scale: with ``streaming`` scoring, the teacher's score is pushed away
            from what it predicts without the NAM bank (a copy of the teacher streamed with
            ``bank_frames: 0, nam: false``), like classifier-free guidance on the memory:
            ``real + (scale - 1) * (cond - cond_without_bank)``, conditional flows; 1: none.
        regression_weight: the student's clean clip is also pulled towards the clip of the video
            whose prompts the rollout follows (``data.dataset``): the step's student loss is
            ``dmd + weight * 0.5 * mse(clip, video's clip)``, in the student's own rollout (the
            frames its memory holds are its own); for videos that are the truth given their
            history, as the narrative world's; 0: DMD alone.
    """

    teacher: str = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    teacher_weights: str | None = None
    tiny_teacher_seed: int = 1
    guidance_scale: float = 3.0
    noise: NoiseRange = field(default_factory=NoiseRange)
    critic_learning_rate: float = 1e-4
    critic_lora: LoraSettings = field(default_factory=LoraSettings)
    generator_update_every: int = 5
    scoring: str = "clip"
    memory_guidance_scale: float = 1.0
    regression_weight: float = 0.0

    def __post_init__(self) -> None:
        check(self.scoring in SCORINGS, "scoring", f"one of {SCORINGS}", self.scoring)
        check(self.regression_weight >= 0.0, "regression_weight", ">= 0",
              self.regression_weight)
        check(self.memory_guidance_scale >= 1.0, "memory_guidance_scale", ">= 1",
              self.memory_guidance_scale)
        check(
            self.memory_guidance_scale == 1.0 or self.scoring == "streaming",
            "memory_guidance_scale", "1 unless scoring is 'streaming' (a clip has no memory)",
            self.memory_guidance_scale,
        )
        check(self.guidance_scale >= 1.0, "guidance_scale", ">= 1", self.guidance_scale)
        check(self.critic_learning_rate > 0, "critic_learning_rate", "> 0",
              self.critic_learning_rate)
        check(self.generator_update_every >= 1, "generator_update_every", "an int >= 1",
              self.generator_update_every)


@dataclass(frozen=True)
class PromptDataConfig:
    """The prompts: a prompt-group file (``memflow_apps.shared.prompts`` formats: JSONL with a
    ``prompts`` list per line, ...); each video takes consecutive prompts of a random group.
    ``prompts: null`` uses the packaged ``example_prompts.jsonl`` (a few short narratives).
    ``dataset``, instead: a latent video folder (``memory_finetune``'s format, with prompts),
    each video a group, its latents the clip's target of ``dmd.regression_weight``."""

    prompts: Path | None = None
    dataset: Path | None = None
    negative_prompt: str = ""
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        check(self.max_sequence_length >= 1, "max_sequence_length", "an int >= 1",
              self.max_sequence_length)
        check(self.prompts is None or self.dataset is None, "prompts",
              "null when data.dataset is given (the dataset's videos carry their prompts)",
              self.prompts)


@dataclass(frozen=True)
class StreamingLongTuningConfig(RecipeConfig):
    """``streaming_long_tuning.yaml``: the common sections plus ``rollout``, ``dmd``, ``data``."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)

    def __post_init__(self) -> None:
        check(
            self.dmd.regression_weight == 0.0 or self.data.dataset is not None,
            "dmd.regression_weight", "0 unless data.dataset gives the videos to regress to",
            self.dmd.regression_weight,
        )


@dataclass(frozen=True)
class StepVideos:
    """One step's videos, drawn from its randomness.

    Attributes:
        chunks: the chunk plan up to the clip's end (the rollout stops there).
        exit_steps: the exit step of every chunk of the whole video.
        conditions: per prompt segment, the prompts ``[B, L, D]`` with the student's text keys.
        negative: ``[B, L, D]`` the negative prompt's embeddings (guidance).
        noise: ``[B, C, F, h, w]`` the initial noise of the whole video.
        memory: the student's memory layout for this step (``memflow``, SMA maybe on).
        gradient_chunks: the clip's length in chunks (the last ones of ``chunks``).
        targets: ``[B, C, F, h, w]`` the clips of the videos the prompts are from (the
            regression's targets; ``None`` without ``dmd.regression_weight``).
    """

    chunks: list[ChunkPlan]
    exit_steps: list[int]
    conditions: list[PromptConditioning]
    negative: torch.Tensor
    noise: torch.Tensor
    memory: MemFlowConfig
    gradient_chunks: int
    targets: torch.Tensor | None = None

    @property
    def clip_chunks(self) -> list[ChunkPlan]:
        return self.chunks[-self.gradient_chunks :]

    def clip_of(self, video: torch.Tensor) -> torch.Tensor:
        """The clip's frames ``[B, C, F, h, w]`` of ``video``."""
        return video[:, :, self.clip_chunks[0].start : self.clip_chunks[-1].stop]

    def clip_part(self, chunk: ChunkPlan) -> slice:
        """``chunk``'s frames within the clip."""
        first = self.clip_chunks[0].start
        return slice(chunk.start - first, chunk.stop - first)


class StreamingLongTuning(Recipe):
    """Streaming long tuning: Self-Forcing rollouts with MemFlow memory trained by DMD."""

    config: StreamingLongTuningConfig

    def __init__(self, config: StreamingLongTuningConfig, accelerator: Accelerator) -> None:
        super().__init__(config, accelerator)
        tiny = config.model.tiny
        self.teacher = load_teacher(
            config.dmd.teacher, config.dmd.tiny_teacher_seed if tiny else None, self.dtype,
            config.dmd.teacher_weights,
        ).to(self.device)
        # the fake score starts as the student does (DMD2)
        self.critic = config.model.build_start(self.dtype).to(self.device)
        add_lora(self.critic, config.dmd.critic_lora)
        if config.training.gradient_checkpointing:
            self.critic.enable_gradient_checkpointing()
        self.critic.train()
        self.scorers: dict[str, MemFlowAttachment] = {}
        self.teacher_without_bank: torch.nn.Module | None = None
        if config.dmd.memory_guidance_scale != 1.0:
            check(config.memflow.nam, "dmd.memory_guidance_scale",
                  "1 when memflow has no NAM bank (nothing to guide with)",
                  config.dmd.memory_guidance_scale)
            self.teacher_without_bank = copy.deepcopy(self.teacher)
            without_bank = dataclasses.replace(config.memflow, bank_frames=0, nam=False)
            self.scorers["teacher_without_bank"] = apply_memflow(
                self.teacher_without_bank, without_bank
            )
        if config.dmd.scoring == "streaming":
            self.scorers["teacher"] = apply_memflow(self.teacher, config.memflow)
            self.scorers["critic"] = apply_memflow(self.critic, config.memflow)
        if config.rollout.sma_share > 0:
            check(not config.memflow.sma, "rollout.sma_share",
                  "0 when memflow.sma is true (every rollout already runs SMA)",
                  config.rollout.sma_share)
        self.dataset: LatentVideoDataset | None = None
        if config.data.dataset is not None:
            self.dataset = LatentVideoDataset(config.data.dataset)
            self.groups = [
                list(self.dataset.segment_prompts(i)) for i in range(len(self.dataset))
            ]
        else:
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
        frozen = {"teacher": self.teacher}
        if self.teacher_without_bank is not None:
            frozen["teacher_without_bank"] = self.teacher_without_bank
        return {**super().transformers(), **frozen}

    def attachments(self) -> list[MemFlowAttachment]:
        return [*super().attachments(), *self.scorers.values()]

    def phases(self, step: int) -> list[str]:
        if step % self.config.dmd.generator_update_every == 0:
            return ["student", "critic"]
        return ["critic"]

    def train_phase(self, name: str, step: int, randomness: StepRandomness) -> torch.Tensor:
        videos = self._sample(randomness)
        rollout = self.config.rollout
        session = self.student.attachment.create_session(
            rollout.latent_height, rollout.latent_width, record_trace=False,
            config=videos.memory,
        )
        with self.student.attachment.bind(session):
            engine = self.student_engine(session, rollout.batch_size)
            gradient_from = videos.clip_chunks[0].index if name == "student" else len(videos.chunks)
            generated = self_forcing_rollout(
                engine, videos.chunks, videos.exit_steps, videos.conditions, videos.noise,
                randomness, gradient_from,
            )
            if name == "critic":
                return self._critic_loss(generated.video, videos, randomness)
            target = self._dmd_target(generated.video, videos, randomness)
            return self._student_loss(engine, generated, videos, target)

    # ------------------------------------------------------------------------------------ losses
    def _student_loss(
        self, engine: ChunkEngine, generated: Rollout, videos: StepVideos, target: torch.Tensor
    ) -> torch.Tensor:
        clip_start = videos.clip_chunks[0].start
        weight = self.config.dmd.regression_weight

        def chunk_loss(index: int, clean: torch.Tensor) -> torch.Tensor:
            chunk = videos.chunks[index]
            frames = slice(chunk.start - clip_start, chunk.stop - clip_start)
            loss = dmd_loss(clean, target[:, :, frames], target.numel())
            if videos.targets is not None:
                # the same surrogate with the video's frames as the target: 0.5 * mse
                loss = loss + weight * dmd_loss(clean, videos.targets[:, :, frames], target.numel())
            return loss

        return replay_with_gradient(
            engine, self.accelerator, generated, videos.chunks, videos.exit_steps,
            videos.conditions, chunk_loss,
        )

    @torch.no_grad()
    def _dmd_target(
        self, video: torch.Tensor, videos: StepVideos, randomness: StepRandomness
    ) -> torch.Tensor:
        """``stopgrad(clip - grad)`` for the clip ``[B, C, F, h, w]`` (float64) of the rolled-out
        ``video`` ``[B, C, F', h, w]``."""
        schedule, scale = self.config.schedule, self.config.dmd.guidance_scale
        clip = videos.clip_of(video)
        noisy, _, sigma, timestep = randomness.noised(clip, schedule, self.config.dmd.noise)
        if self.config.dmd.scoring == "clip":
            embeds = videos.conditions[-1].embeds
            real = self._flow(self.teacher, noisy, timestep, embeds)
            if scale != 1.0:
                negative = self._flow(self.teacher, noisy, timestep, videos.negative)
                real = guided_flow(real, negative, scale)
            fake = self._flow(self.critic, noisy, timestep, embeds)
        else:
            cond, uncond = self._streamed_flows("teacher", video, videos, noisy, timestep,
                                                guided=scale != 1.0)
            real = guided_flow(cond, uncond, scale)
            memory_scale = self.config.dmd.memory_guidance_scale
            if memory_scale != 1.0:
                without_bank, _ = self._streamed_flows(
                    "teacher_without_bank", video, videos, noisy, timestep, guided=False
                )
                real = real + (memory_scale - 1.0) * (cond - without_bank)
            fake, _ = self._streamed_flows("critic", video, videos, noisy, timestep, guided=False)
        real_clean = schedule.predict_clean(noisy, real, sigma)
        fake_clean = schedule.predict_clean(noisy, fake, sigma)
        return clip.double() - distribution_matching_gradient(clip, real_clean, fake_clean)

    def _critic_loss(
        self, video: torch.Tensor, videos: StepVideos, randomness: StepRandomness
    ) -> torch.Tensor:
        """The critic's flow-matching loss on the re-noised clip of ``video``, backpropagated."""
        clip = videos.clip_of(video)
        noisy, noise, _, timestep = randomness.noised(
            clip, self.config.schedule, self.config.dmd.noise
        )
        if self.config.dmd.scoring == "clip":
            embeds = videos.conditions[-1].embeds
            flow = self._flow(self.prepared["critic"], noisy, timestep, embeds)
            loss = flow_matching_loss(flow, noise, clip)
            self.accelerator.backward(loss)
            return loss.detach()
        with self._scoring_engine("critic", video, videos) as (engine, conditions):

            def chunk_loss(chunk: ChunkPlan, cond: PromptConditioning) -> torch.Tensor:
                part = videos.clip_part(chunk)
                flow = engine.flow(noisy[:, :, part], timestep, cond.embeds, grad=True)
                share = chunk.num_frames / clip.shape[2]  # the chunks' losses add up to the mean
                return share * flow_matching_loss(flow, noise[:, :, part], clip[:, :, part])

            return backward_chunk_by_chunk(
                engine, self.accelerator, videos.clip_chunks, conditions, video, chunk_loss
            )

    def _streamed_flows(
        self, name: str, video: torch.Tensor, videos: StepVideos, noisy: torch.Tensor,
        timestep: torch.Tensor, guided: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The flows ``[B, C, F, h, w]`` of scorer ``name`` for the re-noised clip ``noisy``,
        chunk by chunk in its own session over ``video``'s memory: with the prompt, and (when
        ``guided``) with the negative prompt reading the same memory, else ``None``."""
        conds, unconds = [], []
        with self._scoring_engine(name, video, videos) as (engine, conditions):
            for opened in engine.chunks(videos.clip_chunks, conditions, video, commit_last=False):
                part = noisy[:, :, videos.clip_part(opened.chunk)]
                conds.append(engine.flow(part, timestep, opened.cond.embeds))
                if guided:
                    unconds.append(engine.flow(part, timestep, videos.negative))
        return torch.cat(conds, dim=2), torch.cat(unconds, dim=2) if guided else None

    @contextmanager
    def _scoring_engine(
        self, name: str, video: torch.Tensor, videos: StepVideos
    ) -> Iterator[tuple[ChunkEngine, list[PromptConditioning]]]:
        """The chunk engine over the teacher or the critic (``name``) in a fresh session of the
        ``memflow`` layout, bound, with ``video``'s chunks before the clip committed (teacher
        forcing: NAM, recaches); yields it and the prompts' conditioning with its text keys."""
        attachment = self.scorers[name]
        model, rollout = attachment.model, self.config.rollout
        session = attachment.create_session(
            rollout.latent_height, rollout.latent_width, record_trace=False
        )
        conditions = [PromptConditioning.of(attachment, cond.embeds) for cond in videos.conditions]
        with attachment.bind(session):
            engine = ChunkEngine(
                model,
                session,
                self.config.schedule,
                dtype=self.dtype,
                conditioning=self.conditioning_inputs(model, rollout.batch_size),
                trained=self.prepared.get(name, model),
            )
            history = videos.chunks[: -rollout.gradient_chunks]
            commit_clean_chunks(engine, history, conditions, video)
            yield engine, conditions

    def _flow(
        self, model: torch.nn.Module, noisy: torch.Tensor, timestep: torch.Tensor,
        embeds: torch.Tensor,
    ) -> torch.Tensor:
        """A bidirectional forward of the teacher or the critic over a whole clip."""
        conditioning = self.conditioning_inputs(self.accelerator.unwrap_model(model),
                                                noisy.shape[0])
        return call_transformer(model, noisy, timestep, embeds, self.dtype, conditioning)

    # --------------------------------------------------------------------------------- sampling
    def _sample(self, randomness: StepRandomness) -> StepVideos:
        """One step's videos (``StepVideos``)."""
        rollout, memflow = self.config.rollout, self.config.memflow
        frames = memflow.frames_per_chunk
        num_steps = len(self.config.schedule.steps)
        exits = torch.randint(
            num_steps,
            (rollout.num_chunks if rollout.exit_step_per_chunk else 1,),
            generator=randomness.shared,
        ).expand(rollout.num_chunks)
        segment = rollout.num_segments - 1
        if rollout.clip_segment_weights is not None:
            weights = torch.tensor(rollout.clip_segment_weights, dtype=torch.float64)
            segment = int(torch.multinomial(weights, 1, generator=randomness.shared))
        memory = memflow
        if rollout.sma_share > 0:
            sma = float(torch.rand((), generator=randomness.shared)) < rollout.sma_share
            memory = dataclasses.replace(memflow, sma=sma)
        segment_starts = [
            s * rollout.chunks_per_prompt * frames for s in range(rollout.num_segments)
        ]
        chunks = plan_chunks(segment_starts, rollout.num_chunks * frames, frames)
        chunks = chunks[: rollout.segment_chunks(segment).stop]

        videos, targets = [], []
        for draw in randomness.samples:
            index = int(torch.randint(len(self.groups), (), generator=draw))
            group = self.groups[index]
            offset = int(torch.randint(len(group) - rollout.num_segments + 1, (), generator=draw))
            videos.append(group[offset : offset + rollout.num_segments])
            if self.config.dmd.regression_weight > 0:
                targets.append(self._regression_target(
                    index, offset, segment_starts[: segment + 1], chunks
                ))
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
        return StepVideos(
            chunks, exits.tolist(), conditions, negative, randomness.randn(shape, self.device),
            memory, rollout.gradient_chunks,
            torch.stack(targets).to(self.device) if targets else None,
        )

    def _regression_target(
        self, index: int, offset: int, rollout_starts: list[int], chunks: list[ChunkPlan]
    ) -> torch.Tensor:
        """The clip ``[C, f, h, w]`` of dataset video ``index`` whose segments ``offset ..`` the
        rollout ``chunks`` (segments starting at ``rollout_starts``) follow; the video's segments
        must start where the rollout's do."""
        assert self.dataset is not None
        video = self.dataset[index]
        starts = video.segment_starts.tolist()
        first = starts[offset]
        video_starts = [start - first for start in starts[offset:]][: len(rollout_starts)]
        frames = video.latents.shape[1] - first
        if video_starts != rollout_starts or frames < chunks[-1].stop:
            raise DatasetError(
                f"{self.dataset.files[index]}: dmd.regression_weight needs videos whose segments "
                f"start where the rollout's do ({rollout_starts}) and that last "
                f">= {chunks[-1].stop} latent frames; its segments start at {video_starts} "
                f"of {frames} frames"
            )
        clip = chunks[-self.config.rollout.gradient_chunks :]
        return video.latents[:, first + clip[0].start : first + clip[-1].stop].float()

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
