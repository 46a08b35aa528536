"""The narrative world's diffusers pipeline: a tiny Wan transformer over the world's pixel
autoencoder and text encoder, and the trained model shipped with the package.

``NarrativeWorldPipeline`` offers what ``MemFlowStreamingPipeline`` uses of a Wan pipeline
(``transformer``, ``vae``, ``encode_prompt``, ``vae_scale_factor_spatial``, ``video_processor``),
so the world streams through the same code as a real Wan model::

    pipe = load_world_pipeline()  # the packaged trained model (or a folder of your own)
    streaming = MemFlowStreamingPipeline(pipe, WORLD_MEMORY)
    video = streaming(script.prompts, num_latent_frames=24, height=32, width=32,
                      frames_per_prompt=4, max_sequence_length=WORLD_SEQUENCE_LENGTH)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, WanTransformer3DModel
from diffusers.video_processor import VideoProcessor

from memflow_adapter.config import MemFlowConfig
from memflow_adapter.schedule import FlowMatchSchedule
from memflow_apps.shared.tiny_wan import reinitialise

from .components import PixelAutoencoder, WorldTextEncoder, WorldTokenizer
from .grammar import DEFAULT_EDITION, world_edition

#: The tiny Wan2.1-architecture transformer (about 1.6M parameters): 12 latent channels (2x2
#: pixel patches), 1x2x2 token patches, 6 blocks of width 128 (4 heads of 32).
WORLD_TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 12,
    "out_channels": 12,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 384,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
#: Prompt length in tokens (the grammar's longest prompt has 11 words).
WORLD_SEQUENCE_LENGTH = 16
#: The trained world transformer shipped with the package (``train.yaml``, then
#: ``train_guided.yaml``; ``export.py``).
WORLD_MODEL_DIR = Path(__file__).with_name("model")
#: The packaged few-step student distilled from it by ``streaming_long_tuning``
#: (``distill.yaml``; ``export.py``).
WORLD_STUDENT_DIR = Path(__file__).with_name("student")
#: The memory layout the world model is trained and demonstrated with (latent frames): a
#: 2-frame sink (the first chunk), a 4-frame NAM bank, a 4-frame local window, 2-frame chunks.
WORLD_MEMORY = MemFlowConfig.reference(
    sink_frames=2, bank_frames=4, local_frames=4, frames_per_chunk=2, record_interval=1
)
#: How the world model samples: it is trained by plain flow matching (not distilled), so it
#: takes deterministic flow-matching steps (chosen on validation stories 900..; see README.md).
WORLD_SCHEDULE = FlowMatchSchedule(tuple(range(1000, 0, -100)), shift=2.0, stochastic=False)
#: Classifier-free guidance of the world model's sampling (negative: the zero embedding its
#: prompt dropout trains): at scale 2 entities come out solid instead of speckled (README.md).
WORLD_GUIDANCE_SCALE = 2.0
#: The file of a world model folder that says how the model samples (``WorldSampling``).
SAMPLING_FILE = "sampling.json"


@dataclass(frozen=True)
class WorldSampling:
    """How a world model samples: its denoising schedule, classifier-free guidance scale
    (1: none) and the world edition it was trained on (``grammar.EDITIONS``: the scripts it is
    scored on). A model folder keeps it in ``sampling.json``; a folder without one samples as the
    packaged many-step model (``WORLD_SCHEDULE``, ``WORLD_GUIDANCE_SCALE``, edition v1)."""

    schedule: FlowMatchSchedule = WORLD_SCHEDULE
    guidance_scale: float = WORLD_GUIDANCE_SCALE
    edition: str = DEFAULT_EDITION

    def __post_init__(self) -> None:
        world_edition(self.edition)
        if not 1.0 <= self.guidance_scale < math.inf:
            raise ValueError(
                f"guidance_scale must be >= 1 and finite (1: no guidance), got "
                f"{self.guidance_scale}"
            )

    def describe(self) -> str:
        """E.g. ``10 deterministic steps, guidance scale 2``."""
        kind = "stochastic" if self.schedule.stochastic else "deterministic"
        guidance = (f"guidance scale {self.guidance_scale:g}" if self.guidance_scale != 1.0
                    else "no guidance")
        return f"{len(self.schedule.steps)} {kind} steps, {guidance}"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SAMPLING_FILE
        schedule = dataclasses.asdict(self.schedule)
        data = {"schedule": {**schedule, "steps": list(schedule["steps"])},
                "guidance_scale": self.guidance_scale, "edition": self.edition}
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> WorldSampling:
        """The sampling of model ``folder`` (the packaged model's when it has no file)."""
        path = Path(folder) / SAMPLING_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            schedule = data["schedule"]
            return cls(
                FlowMatchSchedule(tuple(schedule["steps"]), schedule["shift"],
                                  schedule["stochastic"]),
                float(data["guidance_scale"]),
                str(data.get("edition", DEFAULT_EDITION)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a world sampling file ({error!r})") from error


class NarrativeWorldPipeline(DiffusionPipeline):
    """Transformer + ``PixelAutoencoder`` + ``WorldTextEncoder`` (+ its tokenizer)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        vae: PixelAutoencoder,
        text_encoder: WorldTextEncoder,
        sampling: WorldSampling | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder)
        #: how the transformer samples (its model folder's ``sampling.json``)
        self.sampling = sampling or WorldSampling()
        self.tokenizer = WorldTokenizer()
        self.vae_scale_factor_spatial = vae.config.patch
        self.vae_scale_factor_temporal = 1
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        do_classifier_free_guidance: bool = False,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int = WORLD_SEQUENCE_LENGTH,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings ``[B * num_videos_per_prompt, max_sequence_length, 64]`` (and those
        of ``negative_prompt`` with classifier-free guidance, else ``None``), as Wan's."""
        def embed(texts: str | Sequence[str]) -> torch.Tensor:
            texts = [texts] if isinstance(texts, str) else list(texts)
            ids, mask = self.tokenizer(texts, max_sequence_length)
            embeds = self.text_encoder(ids.to(self.text_encoder.device), mask.to(ids.device))
            embeds = embeds.repeat_interleave(num_videos_per_prompt, dim=0)
            return embeds.to(device or self.text_encoder.device, dtype or embeds.dtype)

        positive = embed(prompt)
        if not do_classifier_free_guidance:
            return positive, None
        negative = negative_prompt if negative_prompt is not None else ""
        if isinstance(negative, str):
            negative = [negative] * (1 if isinstance(prompt, str) else len(prompt))
        return positive, embed(negative)


def build_world_pipeline(seed: int = 0) -> NarrativeWorldPipeline:
    """The world pipeline with a RANDOM transformer of seed ``seed`` (the base the recipes train
    LoRA on); the global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**WORLD_TRANSFORMER)
        reinitialise(transformer)
    calm_modulation(transformer)
    pass_input_through(transformer)
    return _assemble(transformer)


@torch.no_grad()
def calm_modulation(transformer: WanTransformer3DModel, time_scale: float = 0.1) -> None:
    """Make a random Wan transformer a trainable base for LoRA: its blocks start as plain
    residual blocks (gates 1, shifts and scales 0) and the timestep's embedding is scaled by
    ``time_scale``, so the timestep modulates every block a little instead of gating channels
    on and off at random (LoRA cannot retrain the modulation: it sits outside the blocks'
    Linear layers)."""
    time_embedder = transformer.condition_embedder.time_embedder
    time_embedder.linear_2.weight.mul_(time_scale)
    time_embedder.linear_2.bias.zero_()
    transformer.scale_shift_table.zero_()
    for block in transformer.blocks:
        block.scale_shift_table.zero_()
        block.scale_shift_table[:, 2].fill_(1.0)  # gate of self-attention
        block.scale_shift_table[:, 5].fill_(1.0)  # gate of the feed-forward


@torch.no_grad()
def pass_input_through(transformer: WanTransformer3DModel) -> None:
    """Give a random Wan transformer a skip path from its input to its output: ``proj_out`` is
    set to the pseudo-inverse of the patch embedding (in the unpatchify order), the patch bias to
    zero, so that with quiet blocks the model returns its (per-token normalised) input. The flow
    target ``noise - clean`` is close to the input at high noise; a frozen random ``proj_out``
    would leave LoRA to learn that identity through the blocks."""
    embedding = transformer.patch_embedding
    # [dim, C, pt, ph, pw] -> [dim, pt * ph * pw * C]: proj_out's features are (pt, ph, pw, C)
    forward = embedding.weight.permute(0, 2, 3, 4, 1).flatten(1).double()
    transformer.proj_out.weight.copy_(torch.linalg.pinv(forward).to(embedding.weight.dtype))
    transformer.proj_out.bias.zero_()
    embedding.bias.zero_()


def load_world_pipeline(folder: str | Path = WORLD_MODEL_DIR) -> NarrativeWorldPipeline:
    """The world pipeline with the trained transformer of ``folder`` (a diffusers transformer
    folder written by ``python -m memflow_apps.world.export``, with its ``sampling.json``;
    by default the packaged many-step model; see ``README.md``)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no trained world transformer (config.json + safetensors)"
        )
    return _assemble(WanTransformer3DModel.from_pretrained(folder), WorldSampling.load(folder))


def load_world_student() -> NarrativeWorldPipeline:
    """The packaged distilled student (``distill.yaml``): 4 stochastic steps, no guidance."""
    return load_world_pipeline(WORLD_STUDENT_DIR)


def _assemble(
    transformer: WanTransformer3DModel, sampling: WorldSampling | None = None
) -> NarrativeWorldPipeline:
    text_encoder = WorldTextEncoder(len(WorldTokenizer()), WORLD_TRANSFORMER["text_dim"])
    return NarrativeWorldPipeline(
        transformer.eval(), PixelAutoencoder(), text_encoder.eval(), sampling
    )
