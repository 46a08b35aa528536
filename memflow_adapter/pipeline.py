"""The streaming multi-prompt pipeline: chunk-by-chunk few-step generation with MemFlow memory.

Per chunk (DESIGN.md s.1, s.4b): NAM refreshes the bank with the chunk's prompt; after a prompt
switch the window is recached under the new prompt; the chunk is denoised in a few read-only
passes (x0 prediction and re-noising between steps); the clean chunk is run once more at timestep 0
to write its keys/values (the context pass).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import export_to_video
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .config import MemFlowConfig
from .hooks import MemFlowAttachment, apply_memflow, get_memflow
from .integrations import find_integration
from .introspection import ChunkMemory
from .schedule import FlowMatchSchedule
from .session import StreamingSession

#: ``step_noise(chunk_index, step_index, shape) -> noise`` for re-noising between steps.
StepNoise = Callable[[int, int, torch.Size], torch.Tensor]


@dataclass(frozen=True)
class PromptSchedule:
    """Which prompt each chunk is generated with: ``(prompt, start_frame)`` entries in latent
    frames. A chunk uses the last entry starting at or before its first frame, so a switch takes
    effect at the first chunk boundary at or after its frame."""

    entries: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a prompt schedule needs at least one (prompt, start_frame) entry")
        previous = -1
        for prompt, start in self.entries:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"every prompt must be a non-empty string, got {prompt!r}")
            if isinstance(start, bool) or not isinstance(start, int) or start <= previous:
                raise ValueError(
                    f"start frames must be increasing ints, got {start!r} after {previous}"
                )
            previous = start
        if self.entries[0][1] != 0:
            raise ValueError(f"the first prompt must start at frame 0, got {self.entries[0][1]}")

    @classmethod
    def from_prompts(cls, prompts: Sequence[str], frames_per_prompt: int) -> PromptSchedule:
        """One prompt every ``frames_per_prompt`` latent frames."""
        if frames_per_prompt < 1:
            raise ValueError(f"frames_per_prompt must be >= 1, got {frames_per_prompt}")
        return cls(tuple((prompt, i * frames_per_prompt) for i, prompt in enumerate(prompts)))

    def prompt_at(self, frame: int) -> str:
        return [prompt for prompt, start in self.entries if start <= frame][-1]

    @property
    def prompts(self) -> list[str]:
        return [prompt for prompt, _ in self.entries]


@dataclass(frozen=True)
class ChunkReport:
    """What one chunk cost and which prompt it used."""

    chunk_index: int
    start_frame: int
    num_frames: int
    prompt: str
    recached: bool
    seconds: float
    cache_bytes: int


@dataclass
class StreamingVideoOutput:
    """Result of one streaming generation.

    Attributes:
        latents: ``[B, C, F, h, w]`` generated clean latents.
        frames: the decoded video in ``output_type`` (``None`` for ``"latent"``).
        trace: the session's memory trace (bank frames and SMA activations per chunk).
        chunks: per-chunk timings and cache sizes.
        peak_memory_bytes: CUDA peak allocation during the run (``None`` on CPU).
    """

    latents: torch.Tensor
    frames: Any
    trace: list[ChunkMemory]
    chunks: list[ChunkReport] = field(default_factory=list)
    peak_memory_bytes: int | None = None

    def save_video(self, path: str | Path, fps: int = 16, batch_index: int = 0) -> Path:
        """Write the decoded video to ``path`` (mp4 needs the ``video`` extra)."""
        if self.frames is None:
            raise ValueError("no decoded frames: generate with output_type='np' or 'pil'")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        export_to_video(list(self.frames[batch_index]), str(path), fps=fps)
        return path


class MemFlowStreamingPipeline:
    """Streams a diffusers video pipeline's transformer with MemFlow memory.

    Args:
        pipe: a diffusers pipeline of a supported family (e.g. ``WanPipeline``): its
            transformer, text encoder, tokenizer and VAE are used; its scheduler is not (the
            streaming schedule is ``schedule``).
        config: the memory layout.
        schedule: the per-chunk denoising steps.
        device: where to run (the pipeline is moved there); default CUDA when available. The
            compute dtype is the transformer's: choose it when loading (``from_pretrained``
            defaults to bfloat16 on CUDA and float32 on CPU), since casting a loaded diffusers
            model would also cast the modules it keeps in float32 (RoPE tables, norms).
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        config: MemFlowConfig,
        schedule: FlowMatchSchedule | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = torch.device(device or _default_device())
        self.pipe = pipe.to(self.device)
        self.transformer = pipe.transformer
        self.dtype = self.transformer.dtype
        attachment = get_memflow(self.transformer)
        if attachment is not None and attachment.config != config:
            raise ValueError(
                f"the transformer already streams with {attachment.config}, not {config}; "
                "remove_memflow() it first"
            )
        self.attachment: MemFlowAttachment = attachment or apply_memflow(self.transformer, config)
        self.config = config
        self.schedule = schedule or FlowMatchSchedule()

    @classmethod
    def from_pretrained(
        cls, model: str, config: MemFlowConfig, **kwargs: Any
    ) -> MemFlowStreamingPipeline:
        """Load a diffusers pipeline (Hub id or local folder) and stream it. ``kwargs`` go to
        ``DiffusionPipeline.from_pretrained`` (``dtype`` defaults to bfloat16 on CUDA, float32 on
        CPU) except ``schedule`` and ``device``."""
        own = {key: kwargs.pop(key) for key in ("schedule", "device") if key in kwargs}
        device = torch.device(own.get("device") or _default_device())
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = torch.bfloat16 if device.type == "cuda" else torch.float32
        return cls(DiffusionPipeline.from_pretrained(model, **kwargs), config, **own)

    @classmethod
    def from_components(
        cls,
        config: MemFlowConfig,
        *,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        **kwargs: Any,
    ) -> MemFlowStreamingPipeline:
        """Assemble the family's diffusers pipeline from components, then stream it."""
        pipeline_class = find_integration(transformer).pipeline_class
        pipe = pipeline_class(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        )
        return cls(pipe, config, **kwargs)

    # --------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | PromptSchedule,
        num_latent_frames: int,
        height: int,
        width: int,
        *,
        frames_per_prompt: int | None = None,
        num_videos: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        step_noise: StepNoise | None = None,
        output_type: str = "np",
        max_sequence_length: int = 512,
        fps: int = 16,
        guidance_scale: float = 1.0,
        negative_prompt: str | None = None,
        progress: bool = True,
    ) -> StreamingVideoOutput:
        """Generate ``num_latent_frames`` latent frames chunk by chunk.

        Args:
            prompt: one prompt, a list of prompts (one every ``frames_per_prompt`` latent
                frames), or a ``PromptSchedule``.
            num_latent_frames: video length in latent frames (any length; memory stays bounded).
            height, width: video size in pixels (multiples of the VAE factor times the patch).
            generator: seeds the initial and the re-noising noise.
            latents: the initial noise ``[B, C, F, h, w]`` instead of drawing it.
            step_noise: the re-noising noise per chunk and step instead of drawing it.
            output_type: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"`` (no decoding).
            fps: the frame rate the video is meant for; only families conditioned on it
                (SkyReels-V2-DF-1.3B's fps embedding) use it.
            guidance_scale: classifier-free guidance: above 1, every denoising step also runs
                the transformer on the negative prompt (reading the same memory) and uses
                ``negative + guidance_scale * (prompt - negative)``; 1 (the default, as for
                distilled streaming models) runs the prompt only. Costs a second pass per step.
            negative_prompt: the unconditional input of guidance: ``None`` (default) is a zero
                embedding, what ``memory_finetune``'s ``data.prompt_dropout`` trains; a string
                is encoded like the prompts (``""`` for diffusers' Wan base models, trained with
                the encoded empty prompt). Memory (NAM scores, recaches, context passes) always
                uses the prompt.
        """
        schedule = _as_schedule(prompt, frames_per_prompt)
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(
                f"output_type must be 'np', 'pil', 'pt' or 'latent', got {output_type!r}"
            )
        latent_height, latent_width = self._latent_size(height, width)
        shape = (
            num_videos,
            self.transformer.config.in_channels,
            num_latent_frames,
            latent_height,
            latent_width,
        )
        if latents is None:
            latents = randn_tensor(
                shape, generator=generator, device=self.device, dtype=torch.float32
            )
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if not guidance_scale >= 1.0:
            raise ValueError(
                f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}"
            )
        step_noise = step_noise or _drawn_noise(generator, self.device)
        prompts = self._encode_prompts(schedule.prompts, num_videos, max_sequence_length)
        guidance = self._guidance(guidance_scale, negative_prompt, num_videos, max_sequence_length)
        conditioning = self.attachment.integration.conditioning_inputs(num_videos, fps)

        session = self.attachment.create_session(latent_height, latent_width)
        output = torch.zeros(shape, dtype=torch.float32, device=self.device)
        reports: list[ChunkReport] = []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        chunk_starts = range(0, num_latent_frames, self.config.frames_per_chunk)
        with self.attachment.bind(session):
            for chunk_index, start in enumerate(
                tqdm(chunk_starts, disable=not progress, desc="MemFlow chunks")
            ):
                stop = min(start + self.config.frames_per_chunk, num_latent_frames)
                text = schedule.prompt_at(start)
                recache = chunk_index > 0 and text != schedule.prompt_at(start - 1)
                began = time.perf_counter()
                embeds, text_keys = prompts[text]
                session.begin_chunk(text_keys)
                if recache:
                    with session.switch_prompt() as window:
                        window_latents = output[:, :, window.start_frame : window.stop_frame]
                        self._run(window_latents, 0.0, embeds, conditioning)
                output[:, :, start:stop] = self._denoise_chunk(
                    session,
                    latents[:, :, start:stop],
                    embeds,
                    conditioning,
                    chunk_index,
                    step_noise,
                    None if guidance is None else guidance.for_prompt(embeds),
                )
                with session.context_pass():
                    self._run(output[:, :, start:stop], 0.0, embeds, conditioning)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                reports.append(
                    ChunkReport(
                        chunk_index,
                        start,
                        stop - start,
                        text,
                        recache,
                        time.perf_counter() - began,
                        session.cache_bytes,
                    )
                )
        frames = None
        if output_type != "latent":
            video = self.attachment.integration.decode_latents(self.pipe.vae, output)
            frames = self.pipe.video_processor.postprocess_video(video, output_type=output_type)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return StreamingVideoOutput(output, frames, session.trace(), reports, peak)

    def _denoise_chunk(
        self,
        session: StreamingSession,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        conditioning: dict[str, Any],
        chunk_index: int,
        step_noise: StepNoise,
        guidance: tuple[float, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Few-step denoising of one chunk in read-only passes; returns the clean chunk.
        ``guidance``: the scale and the negative embeddings of classifier-free guidance."""
        timesteps = self.schedule.timesteps
        noisy = noise.double()
        for step, timestep in enumerate(timesteps):
            with session.denoise_pass():
                flow = self._run(noisy, float(timestep), embeds, conditioning)
            if guidance is not None:
                scale, negative = guidance
                with session.denoise_pass():
                    unconditional = self._run(noisy, float(timestep), negative, conditioning)
                flow = unconditional + scale * (flow - unconditional)
            clean = self.schedule.predict_clean(noisy, flow, self.schedule.sigma_at(timestep))
            if step + 1 < len(timesteps):
                next_sigma = self.schedule.sigma_at(timesteps[step + 1])
                if self.schedule.stochastic:
                    eps = step_noise(chunk_index, step, noise.shape).to(self.device)
                else:
                    eps = self.schedule.predict_noise(clean, flow)
                noisy = self.schedule.renoise(clean, eps, next_sigma)
        return clean.float()

    def _run(
        self,
        latents: torch.Tensor,
        timestep: float,
        embeds: torch.Tensor,
        conditioning: dict[str, Any],
    ) -> torch.Tensor:
        """One transformer forward over a chunk (the session decides what it attends to);
        ``conditioning`` is the family's extra forward inputs.

        The input is made contiguous so that a view (a slice of the video) and a copy of the same
        frames take the same kernels and give bit-identical keys and values."""
        timesteps = torch.full((latents.shape[0],), timestep, device=self.device)
        return self.transformer(
            hidden_states=latents.to(self.dtype).contiguous(),
            timestep=timesteps,
            encoder_hidden_states=embeds,
            return_dict=False,
            **conditioning,
        )[0]

    def _encode_prompts(
        self, prompts: list[str], num_videos: int, max_sequence_length: int
    ) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Per distinct prompt: its embeddings and every layer's NAM text keys, computed once."""
        encoded = {}
        for text in dict.fromkeys(prompts):
            embeds = self._embed(text, num_videos, max_sequence_length)
            encoded[text] = (embeds, self.attachment.text_keys(embeds))
        return encoded

    def _embed(self, text: str, num_videos: int, max_sequence_length: int) -> torch.Tensor:
        """The text encoder's embeddings of ``text``, ``[num_videos, L, D]``."""
        embeds, _ = self.pipe.encode_prompt(
            text,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=num_videos,
            max_sequence_length=max_sequence_length,
            device=self.device,
            dtype=self.dtype,
        )
        return embeds

    def _guidance(
        self,
        scale: float,
        negative_prompt: str | None,
        num_videos: int,
        max_sequence_length: int,
    ) -> Guidance | None:
        """Classifier-free guidance's negative embeddings, or ``None`` at scale 1."""
        if scale == 1.0:
            return None
        if negative_prompt is None:
            return Guidance(scale, None)
        return Guidance(scale, self._embed(negative_prompt, num_videos, max_sequence_length))

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor_spatial
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of the VAE's spatial factor {factor}, "
                f"got {height}x{width}"
            )
        return height // factor, width // factor


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: its scale and the negative embeddings ``[B, L, D]``
    (``None``: zeros shaped like each prompt's)."""

    scale: float
    negative: torch.Tensor | None

    def for_prompt(self, embeds: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The scale and the negative embeddings to pair with prompt embeddings ``embeds``."""
        return self.scale, torch.zeros_like(embeds) if self.negative is None else self.negative


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _as_schedule(
    prompt: str | Sequence[str] | PromptSchedule, frames_per_prompt: int | None
) -> PromptSchedule:
    if isinstance(prompt, PromptSchedule):
        return prompt
    if isinstance(prompt, str):
        return PromptSchedule(((prompt, 0),))
    prompts = list(prompt)
    if len(prompts) > 1 and frames_per_prompt is None:
        raise ValueError(
            "frames_per_prompt is required with a list of prompts (a prompt every N latent "
            "frames), or pass a PromptSchedule"
        )
    return PromptSchedule.from_prompts(prompts, frames_per_prompt or 1)


def _drawn_noise(generator: torch.Generator | None, device: torch.device) -> StepNoise:
    def draw(chunk_index: int, step_index: int, shape: torch.Size) -> torch.Tensor:
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    return draw
