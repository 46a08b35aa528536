"""Memory fine-tuning: teach a streaming model to use its memory on real long videos, cheaply.

One training step (per process) takes one video of the latent dataset (``latents.py``; or a batch
of ``data.videos_per_step`` videos of one layout), a random window of ``data.chunks_per_sample``
chunks of it, and:

1. commits its clean chunks but the last into a fresh MemFlow session, each in its own chunk
   lifecycle (NAM fills and refreshes the bank, prompt switches recache the window, context
   passes write the frames), without gradient;
2. noises the last chunk at a random level and trains the student, with the memory active, to
   predict the flow ``noise - clean`` (flow matching; with ``data.prompt_dropout``, sometimes
   without its prompt, for classifier-free guidance); only its LoRA weights learn (every
   weight with ``model.train: full``).

Run with ``python -m recipes.memory_finetune --config FILE`` (or ``--tiny
data.dataset=FOLDER``), ``accelerate launch`` or ``torchrun``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator

from memflow_adapter.streaming import (
    ChunkEngine,
    ChunkPlan,
    PromptConditioning,
    plan_chunks,
    segment_at,
)
from memflow_apps.shared.latents import DatasetError, LatentVideoDataset, VideoLatents

from .config import check
from .flow import NoiseRange, StepRandomness, flow_matching_loss, seeded_generator
from .rollout import backward_chunk_by_chunk, commit_clean_chunks
from .sharding import gather_objects
from .training import Recipe, RecipeConfig, Trainable, exit_on_bad_input, main

NAME = "memory_finetune"
WINDOWS = ("random", "prefix")
LOSS_CHUNKS = ("last", "all")


@dataclass(frozen=True)
class LatentDataConfig:
    """The training videos.

    Args:
        dataset: a folder of ``*.safetensors`` videos (``recipes/README.md``; ``build_dataset``).
        chunks_per_sample: chunks of one training window (its last is the loss chunk; the others
            are the memory); shorter videos use all their chunks. At least 2.
        windows: ``random``: windows of ``chunks_per_sample`` chunks anywhere in the video;
            ``prefix``: windows from the video's first chunk to a random chunk (at most
            ``chunks_per_sample``), so that every chunk, the first included, learns with the whole
            history it has at generation time (the sink holds the video's first frames).
        loss_chunks: ``last``: the window's last chunk is the loss chunk, the others only fill
            the memory; ``all``: every chunk is one in turn (noised and denoised with the memory
            of the chunks before it, its loss backpropagated, then committed clean), the loss
            being their mean: a window's worth of signal for the cost of one rollout.
        noise: where the loss chunk's noise level is drawn.
        videos_per_step: videos per step and process, trained as one batch through one window
            (the same chunks of each, each with its own noise level); they must share their
            layout (latent size, frame count and segment starts), as the narrative world's
            scripts do. More than 1 mainly pays off for small models, whose passes cost little
            more for a few videos than for one.
        prompt_dropout: the probability that a loss chunk of one video is denoised with an
            empty prompt (zero embeddings) instead of its own, drawn per video and chunk, so that
            the model also learns the unconditional prediction that classifier-free guidance
            needs (``MemFlowStreamingPipeline(guidance_scale=...)``, whose default negative
            prompt is these zero embeddings). The memory keeps the real prompt, as at generation:
            NAM scores, recaches and context passes use it. 0 (the default) trains text-
            conditioned only, as distilled streaming models are.
        segment_loss_weights: with ``loss_chunks: all``, each chunk's loss weighted by the
            prompt segment of the video it lies in (one weight > 0 per segment, the video's
            first segment first), the step's loss their weighted mean: e.g. a story's returning
            segment, where only the memory knows what to draw, weighted up. ``null``: the mean.
    """

    dataset: Path = Path("data/latents")
    chunks_per_sample: int = 8
    windows: str = "random"
    loss_chunks: str = "last"
    noise: NoiseRange = field(default_factory=lambda: NoiseRange(0.0, 1.0))
    videos_per_step: int = 1
    prompt_dropout: float = 0.0
    segment_loss_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        weights = self.segment_loss_weights
        if weights is not None:
            check(bool(weights) and all(weight > 0 for weight in weights),
                  "segment_loss_weights", "null or weights > 0, one per prompt segment", weights)
            check(self.loss_chunks == "all", "loss_chunks",
                  "'all' when segment_loss_weights are given (they weight a window's chunks)",
                  self.loss_chunks)
        check(self.chunks_per_sample >= 2, "chunks_per_sample", "an int >= 2",
              self.chunks_per_sample)
        check(self.videos_per_step >= 1, "videos_per_step", "an int >= 1", self.videos_per_step)
        check(0.0 <= self.prompt_dropout < 1.0, "prompt_dropout", "a probability in [0, 1)",
              self.prompt_dropout)
        check(self.windows in WINDOWS, "windows", f"one of {WINDOWS}", self.windows)
        check(self.loss_chunks in LOSS_CHUNKS, "loss_chunks", f"one of {LOSS_CHUNKS}",
              self.loss_chunks)


@dataclass(frozen=True)
class MemoryFinetuneConfig(RecipeConfig):
    """``memory_finetune.yaml``: the common sections plus ``data``."""

    data: LatentDataConfig = field(default_factory=LatentDataConfig)


class MemoryFinetune(Recipe):
    """Memory fine-tuning: teacher-forced flow matching with clean past chunks in memory (LoRA)."""

    config: MemoryFinetuneConfig

    def __init__(self, config: MemoryFinetuneConfig, accelerator: Accelerator) -> None:
        super().__init__(config, accelerator)
        self.dataset = LatentVideoDataset(config.data.dataset)

    def trainables(self) -> dict[str, Trainable]:
        training = self.config.training
        student = Trainable(self.student.model, training.learning_rate, training.max_steps)
        return {"student": student}

    @property
    def batch_size(self) -> int:
        return self.config.data.videos_per_step

    def phases(self, step: int) -> list[str]:
        return ["student"]

    def train_phase(self, name: str, step: int, randomness: StepRandomness) -> torch.Tensor:
        indices = [self._video_index(step, j) for j in range(self.config.data.videos_per_step)]
        video, segment_starts, segments, first_segment = self._window(indices, randomness)
        chunks = plan_chunks(segment_starts, video.shape[2], self.config.memflow.frames_per_chunk)
        trained = chunks if self.config.data.loss_chunks == "all" else chunks[-1:]
        shares = self._loss_shares(trained, first_segment, indices[0])
        if self.sharded:
            self._require_same_passes(step, chunks, len(trained))
        conditions = [
            PromptConditioning.of(self.student.attachment, embeds.to(self.device, self.dtype))
            for embeds in segments
        ]
        session = self.student.attachment.create_session(
            video.shape[3], video.shape[4], record_trace=False
        )
        with self.student.attachment.bind(session):
            engine = self.student_engine(session, video.shape[0])
            commit_clean_chunks(engine, chunks[: len(chunks) - len(trained)], conditions, video)

            def share_of_loss(chunk: ChunkPlan, cond: PromptConditioning) -> torch.Tensor:
                loss = self._chunk_loss(engine, chunk, cond, video, randomness)
                return loss * shares[chunk.index]

            return backward_chunk_by_chunk(
                engine, self.accelerator, trained, conditions, video, share_of_loss
            )

    def _loss_shares(
        self, trained: Sequence[ChunkPlan], first_segment: int, video_index: int
    ) -> dict[int, float]:
        """Each trained chunk's share of the step's loss (by chunk index, adding up to 1): equal,
        or by ``data.segment_loss_weights`` of the chunk's segment in the video (the window's
        segment 0 is the video's ``first_segment``)."""
        weights = self.config.data.segment_loss_weights
        if weights is None:
            return {chunk.index: 1.0 / len(trained) for chunk in trained}
        last = first_segment + trained[-1].segment
        if last >= len(weights):
            raise DatasetError(
                f"{self.dataset.files[video_index]}: data.segment_loss_weights has "
                f"{len(weights)} weights, but the window reaches the video's segment {last} "
                f"(count from 0); give one weight per segment"
            )
        chunk_weights = {chunk.index: weights[first_segment + chunk.segment] for chunk in trained}
        total = sum(chunk_weights.values())
        return {index: weight / total for index, weight in chunk_weights.items()}

    def _require_same_passes(
        self, step: int, chunks: Sequence[ChunkPlan], num_trained: int
    ) -> None:
        """Sharded, every pass is collective: before the first, compare what each process's
        window plans (its prompt segments, which chunks recache, how many carry gradient) and
        stop every process with the same error if they differ."""
        plan = (len({chunk.segment for chunk in chunks}), [c.recache for c in chunks], num_trained)
        plans = gather_objects(plan)
        if any(other != plans[0] for other in plans):
            raise DatasetError(
                f"training.sharding=fsdp2 runs every pass on every process at once, but at step "
                f"{step + 1} the processes' windows plan different passes (per process: "
                f"segments, recaches per chunk, gradient chunks = {plans}); train on videos of "
                "one layout (chunk count and prompt segments) with data.windows=random, or use "
                "training.sharding=none"
            )

    def _chunk_loss(
        self,
        engine: ChunkEngine,
        chunk: ChunkPlan,
        cond: PromptConditioning,
        video: torch.Tensor,
        randomness: StepRandomness,
    ) -> torch.Tensor:
        """Flow matching on ``chunk`` of ``video`` noised at a random level (the chunk is open)."""
        clean = video[:, :, chunk.start : chunk.stop]
        noised = randomness.noised(clean, self.config.schedule, self.config.data.noise)
        embeds = self._dropped(cond, randomness).embeds
        flow = engine.flow(noised.noisy, noised.timestep, embeds, grad=True)
        return flow_matching_loss(flow, noised.noise, clean)

    def _dropped(
        self, cond: PromptConditioning, randomness: StepRandomness
    ) -> PromptConditioning:
        """``cond`` with each video's embeddings zeroed with probability
        ``data.prompt_dropout`` (NAM's text keys are kept: they were used before this pass)."""
        probability = self.config.data.prompt_dropout
        if probability == 0.0:
            return cond
        kept = randomness.rand() >= probability
        mask = kept.to(cond.embeds.device, cond.embeds.dtype)[:, None, None]
        return replace(cond, embeds=cond.embeds * mask)

    def _video_index(self, step: int, slot: int) -> int:
        """Each process takes its own videos per step (``slot`` of ``data.videos_per_step``);
        every epoch visits the dataset in a new order seeded by the epoch, so the order follows
        from the step alone."""
        process = step * self.accelerator.num_processes + self.accelerator.process_index
        position = process * self.config.data.videos_per_step + slot
        epoch, offset = divmod(position, len(self.dataset))
        order = torch.randperm(
            len(self.dataset), generator=seeded_generator(self.config.training.seed, epoch)
        )
        return int(order[offset])

    def _window(
        self, indices: Sequence[int], randomness: StepRandomness
    ) -> tuple[torch.Tensor, list[int], list[torch.Tensor], int]:
        """A random chunk-aligned window of the videos ``indices`` (one layout): latents
        ``[B, C, n * F_c, h, w]``, the window's segment starts (relative, the first 0), those
        segments' embeddings ``[B, L, D]`` and the video's segment the window starts in."""
        samples = [self.dataset[index] for index in indices]
        sample = samples[0]
        self._check_same_layout(samples, indices)
        frames = self.config.memflow.frames_per_chunk
        available = sample.latents.shape[1] // frames
        if available < 2:
            raise DatasetError(
                f"{self.dataset.files[indices[0]]}: {sample.latents.shape[1]} latent frames make "
                f"{available} chunk(s) of {frames}; memory_finetune needs at least 2"
            )
        count = min(self.config.data.chunks_per_sample, available)
        draw = randomness.samples[0]  # one window for the whole batch
        if self.config.data.windows == "prefix":
            first, count = 0, int(torch.randint(1, count + 1, (), generator=draw))
        else:
            first = int(torch.randint(available - count + 1, (), generator=draw)) * frames
        stop = first + count * frames
        starts = sample.segment_starts.tolist()
        active = segment_at(first, starts)
        later = [i for i, start in enumerate(starts) if first < start < stop]
        latents = torch.stack([s.latents[:, first:stop] for s in samples])
        embeds = [torch.stack([s.prompt_embeds[i] for s in samples]) for i in [active, *later]]
        relative = [0, *(starts[i] - first for i in later)]
        return latents.to(self.device, torch.float32), relative, embeds, active

    def _check_same_layout(self, samples: Sequence[VideoLatents], indices: Sequence[int]) -> None:
        """Videos trained as one batch must have the same latent and embedding shapes and
        segment starts."""
        first = samples[0]
        for sample, index in zip(samples[1:], indices[1:], strict=True):
            same = (
                sample.latents.shape == first.latents.shape
                and sample.prompt_embeds.shape == first.prompt_embeds.shape
                and torch.equal(sample.segment_starts, first.segment_starts)
            )
            if not same:
                raise DatasetError(
                    f"data.videos_per_step={len(samples)} needs videos of one layout, but "
                    f"{self.dataset.files[index]} ({_layout(sample)}) differs from "
                    f"{self.dataset.files[indices[0]]} ({_layout(first)}); use "
                    "data.videos_per_step=1"
                )


def _layout(sample: VideoLatents) -> str:
    return (
        f"latents {list(sample.latents.shape)}, embeddings {list(sample.prompt_embeds.shape)}, "
        f"segment starts {sample.segment_starts.tolist()}"
    )


def cli(argv: Sequence[str] | None = None) -> Path:
    return main(NAME, MemoryFinetuneConfig, MemoryFinetune, argv)


if __name__ == "__main__":
    exit_on_bad_input(NAME, cli)
