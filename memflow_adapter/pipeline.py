"""The streaming multi-prompt pipeline: chunk-by-chunk few-step generation with MemFlow memory.

``stream()`` yields each chunk as it is made (its latents, its decoded frames, its memory trace
and timings) and takes prompt changes between chunks; ``__call__`` collects a whole stream. Each
chunk is one step of the core's streaming loop (``streaming.ChunkEngine``, architecture s.5b): NAM
refreshes the bank with the chunk's prompt, the first chunk of a new prompt segment recaches the
window under it, the chunk is denoised in a few read-only passes and its clean frames are run once
more at timestep 0 to write their keys and values (the context pass).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from integrations import find_integration

from .config import MemFlowConfig
from .context_parallel import check_same_on_every_rank, shared_generator
from .hooks import MemFlowAttachment, apply_memflow, get_memflow
from .schedule import FlowMatchSchedule
from .stream import (
    StreamingVideoOutput,
    VideoStream,
    load_stream_state,
    require_bool,
)
from .streaming import (
    Guidance,
    PromptSchedule,
    StepNoise,
    applied_segment_starts,
)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


class MemFlowStreamingPipeline:
    """Streams a diffusers video pipeline's transformer with MemFlow memory: latents
    ``[B, C, F, h, w]`` (``F`` latent frames of ``h x w``, ``B`` = ``num_videos``) made chunk by
    chunk, decoded to frames as each chunk is made.

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
        ulysses_degree: split every pass over this many ranks with diffusers' Ulysses context
            parallelism, each rank caching ``H / ulysses_degree`` heads (architecture s.6).
            Launch with ``torchrun --nproc_per_node N`` (``torch.distributed`` initialised);
            every rank then runs the same calls with the same prompts and gets the whole video.
            The default device is then the rank's GPU (``LOCAL_RANK``).
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        config: MemFlowConfig,
        schedule: FlowMatchSchedule | None = None,
        device: str | torch.device | None = None,
        ulysses_degree: int = 1,
    ) -> None:
        if not isinstance(config, MemFlowConfig):
            raise TypeError(f"config must be a MemFlowConfig, got {type(config).__name__}")
        if schedule is not None and not isinstance(schedule, FlowMatchSchedule):
            raise TypeError(
                f"schedule must be a FlowMatchSchedule or None, got {type(schedule).__name__}"
            )
        self.device = torch.device(device or _default_device(ulysses_degree))
        self.pipe = pipe.to(self.device)
        self.transformer = pipe.transformer
        self.dtype = self.transformer.dtype
        attachment = get_memflow(self.transformer)
        if attachment is not None and attachment.config != config:
            raise ValueError(
                f"the transformer already streams with {attachment.config}, not {config}; "
                "remove_memflow() it first"
            )
        if attachment is not None:
            attachment.config = config  # the same memory; runtime choices (the backend) apply
        self.attachment: MemFlowAttachment = attachment or apply_memflow(self.transformer, config)
        self.config = config
        self.schedule = schedule or FlowMatchSchedule()
        if ulysses_degree != 1:
            self.attachment.enable_context_parallel(ulysses_degree)
        self.ulysses_degree = ulysses_degree

    @classmethod
    def from_pretrained(
        cls, model: str, config: MemFlowConfig, **kwargs: Any
    ) -> MemFlowStreamingPipeline:
        """Load a diffusers pipeline (Hub id or local folder) and stream it. ``kwargs`` go to
        ``DiffusionPipeline.from_pretrained`` (``dtype`` defaults to bfloat16 on CUDA, float32 on
        CPU) except ``schedule``, ``device`` and ``ulysses_degree``."""
        names = ("schedule", "device", "ulysses_degree")
        own = {key: kwargs.pop(key) for key in names if key in kwargs}
        device = torch.device(own.get("device") or _default_device(own.get("ulysses_degree", 1)))
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
    def stream(
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
        record_trace: bool = True,
    ) -> VideoStream:
        """Stream ``num_latent_frames`` latent frames chunk by chunk: iterate the returned
        ``VideoStream`` to get each chunk (``StreamedChunk``) as soon as it is made, its frames
        decoded through the VAE's own temporal cache; call ``set_prompt(text)`` on it between
        chunks to change the prompt from the next chunk on (with the KV recache, exactly as the
        same switch given up front).

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
            record_trace: give each chunk its memory trace (bank frames, SMA activations);
                the stream keeps only the current chunk's, so a long stream stays bounded
                (``collect()`` gathers the chunks' traces).
        """
        schedule = _as_schedule(prompt, frames_per_prompt)
        for name, value in (("num_latent_frames", num_latent_frames), ("num_videos", num_videos),
                            ("max_sequence_length", max_sequence_length)):
            _require_count(name, value)
        _require_count("fps", fps, " (frames per second)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise TypeError(
                f"guidance_scale must be a number, finite and >= 1 (1 disables guidance), got "
                f"{guidance_scale!r}"
            )
        guidance = Guidance(float(guidance_scale))  # validates the scale
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str or None, got {negative_prompt!r}")
        if negative_prompt is not None and guidance.scale == 1.0:
            raise ValueError(
                f"negative_prompt is only used with guidance_scale > 1, got guidance_scale="
                f"{guidance_scale!r}; pass a guidance_scale or leave negative_prompt out"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (one seeds the whole batch) or None, got "
                f"{generator!r}"
            )
        if step_noise is not None and not callable(step_noise):
            raise TypeError(
                "step_noise must be a function (chunk_index, step_index, shape) -> tensor, got "
                f"{type(step_noise).__name__}"
            )
        require_bool("record_trace", record_trace)
        try:  # every scheduled prompt must get a chunk of its own
            applied_segment_starts(
                schedule.segment_starts, num_latent_frames, self.config.frames_per_chunk
            )
        except ValueError as error:
            raise ValueError(f"prompt schedule {list(schedule.entries)}: {error}") from None
        latent_height, latent_width = self._latent_size(height, width)
        shape = (
            num_videos,
            self.transformer.config.in_channels,
            num_latent_frames,
            latent_height,
            latent_width,
        )
        if latents is not None:
            _check_latents(latents, shape)
        if self.ulysses_degree != 1 and generator is None:
            generator = shared_generator(self.device)
        if latents is None:
            latents = randn_tensor(
                shape, generator=generator, device=self.device, dtype=torch.float32
            )
        if self.ulysses_degree != 1:
            check_same_on_every_rank(latents, "the initial noise (generator or latents)")
        if guidance.scale != 1.0 and negative_prompt is not None:
            guidance = Guidance(
                guidance.scale, self._embed(negative_prompt, num_videos, max_sequence_length)
            )
        integration = self.attachment.integration
        return VideoStream(
            self,
            schedule,
            noise=latents.to("cpu"),
            step_noise=step_noise,
            generator=generator,
            guidance=None if guidance.scale == 1.0 else guidance,
            session=self.attachment.create_session(
                latent_height, latent_width, record_trace=record_trace, trace_chunks=1
            ),
            decoder=None if output_type == "latent" else integration.latent_decoder(self.pipe.vae),
            output_type=output_type,
            conditioning=integration.conditioning_inputs(num_videos, fps),
            encode=lambda text: self._embed(text, num_videos, max_sequence_length),
            arguments={
                "height": height, "width": width, "output_type": output_type,
                "max_sequence_length": max_sequence_length, "fps": fps,
                "guidance_scale": guidance.scale, "negative_prompt": negative_prompt,
            },
        )

    def resume(
        self, state: str | os.PathLike[str] | Mapping[str, Any], *,
        step_noise: StepNoise | None = None, record_trace: bool = True,
    ) -> VideoStream:
        """The stream a ``VideoStream.save(path)`` (or ``state_dict()``) paused, ready to run
        its next chunk: made with the saved arguments (prompts and live switches, size, noise,
        guidance, output type, generator), so it continues the video bit-identically, in this
        process or another. The file is read with ``torch.load(weights_only=True)``.

        Args:
            state: the saved file, or the state dict itself.
            step_noise: the re-noising noise, needed again when the paused stream was given its
                own (a function cannot be saved); else it draws from the saved generator.
            record_trace: as for ``stream()``.
        """
        if not isinstance(state, Mapping):
            state = load_stream_state(state)
        if "arguments" not in state or "noise" not in state or "schedule" not in state:
            raise ValueError(
                "state must be a VideoStream.state_dict() (keys 'arguments', 'noise', "
                f"'schedule', ...), got keys {sorted(state)}"
            )
        arguments = dict(state["arguments"])
        if arguments.pop("step_noise_given") and step_noise is None:
            raise ValueError(
                "the paused stream was made with its own step_noise: pass the same step_noise "
                "to resume it"
            )
        noise = state["noise"]
        stream = self.stream(
            PromptSchedule(tuple(tuple(entry) for entry in state["schedule"])),
            noise.shape[2], num_videos=noise.shape[0], latents=noise, step_noise=step_noise,
            record_trace=record_trace, **arguments,
        )
        stream.load_state_dict(state)
        return stream

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | PromptSchedule,
        num_latent_frames: int,
        height: int,
        width: int,
        *,
        progress: bool = True,
        **kwargs: Any,
    ) -> StreamingVideoOutput:
        """Generate a whole video: ``stream(...)`` (same arguments) collected into one output;
        ``progress`` shows a bar over the chunks."""
        require_bool("progress", progress)
        stream = self.stream(prompt, num_latent_frames, height, width, **kwargs)
        return stream.collect(progress=progress)

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

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1 (pixels), got {value!r}")
        factor = self.pipe.vae_scale_factor_spatial
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of the VAE's spatial factor {factor}, "
                f"got {height}x{width}"
            )
        return height // factor, width // factor


def _default_device(ulysses_degree: int = 1) -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if ulysses_degree != 1 else "cuda"


def _as_schedule(
    prompt: str | Sequence[str] | PromptSchedule, frames_per_prompt: int | None
) -> PromptSchedule:
    if isinstance(prompt, PromptSchedule):
        if frames_per_prompt is not None:
            raise ValueError(
                f"frames_per_prompt is for a list of prompts; a PromptSchedule carries its own "
                f"start frames, got frames_per_prompt={frames_per_prompt!r}"
            )
        return prompt
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(
        isinstance(text, str) for text in prompts
    ):
        raise TypeError(
            "prompt must be a str, a non-empty list of str (one every frames_per_prompt latent "
            f"frames) or a PromptSchedule, got {prompt!r}"
        )
    if len(prompts) > 1 and frames_per_prompt is None:
        raise ValueError(
            "frames_per_prompt is required with a list of prompts (a prompt every N latent "
            "frames), or pass a PromptSchedule"
        )
    every = 1 if frames_per_prompt is None else frames_per_prompt
    return PromptSchedule.from_prompts(prompts, every)


def _require_count(name: str, value: Any, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{unit}, got {value!r}")


def _check_latents(latents: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        got = latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise TypeError(f"latents must be a floating-point torch.Tensor, got {got}")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents must be finite, got NaN or infinite values")
