"""MemFlowAdapter: a MemFlow config plus optional weights, saved, loaded and shared on the Hub.

An adapter folder holds:

* ``memflow_config.json``: the ``MemFlowConfig``, the base model it targets (a Hub id and the
  transformer config fields that must match), the integration name, and the LoRA's alpha;
* ``adapter_model.safetensors`` (optional): LoRA weights in peft layout on the diffusers module
  names (``blocks.0.attn1.to_q.lora_A.weight`` ...);
* ``transformer.safetensors`` (optional): full transformer weights replacing the base's, for
  checkpoints that fine-tune the whole model (Self-Forcing, LongLive, MemFlow ``base.pt``);
* ``README.md``: a model card.

A folder laid out like the published MemFlow repository (``base.pt`` and/or ``lora.pt`` in a
family's original layout, ``Integration.checkpoints``) is converted on the fly, and the conversion
is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCardData, snapshot_download
from huggingface_hub.constants import HF_HUB_CACHE
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from integrations import INTEGRATIONS, REFERENCE_FAMILY, find_integration, integration_named
from integrations.checkpoints import (
    check_finite,
    check_state_dict_fits,
    load_checkpoint_file,
    load_lora_into,
    validate_lora,
)

from .config import MemFlowConfig
from .hooks import MemFlowAttachment, apply_memflow, get_memflow

CONFIG_NAME = "memflow_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
BASE_WEIGHTS_NAME = "transformer.safetensors"
MODEL_CARD_NAME = "README.md"
PUBLISHED_BASE_NAME = "base.pt"
PUBLISHED_LORA_NAME = "lora.pt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PublishedLayout:
    """How to read a repository in the published layout (``base.pt`` / ``lora.pt``, in a
    family's original layout).

    Attributes:
        base_model: Hub id of the diffusers base those checkpoints fine-tune (default: the one
            the family's ``CheckpointConversion`` declares).
        base_config: its transformer config, diffusers format (default: likewise).
        entry: the training-checkpoint entry of ``base.pt`` (default: ``generator_ema`` if
            present, else ``generator``).
        lora_alpha: alpha of ``lora.pt`` (default: its rank, as MemFlow publishes rank = alpha).
        config: the memory layout the checkpoints were trained for.
        integration: the family whose original layout the checkpoints are in (default: the
            reference family, MemFlow's); a family without a conversion is refused by name.
    """

    base_model: str | None = None
    base_config: dict[str, Any] | None = None
    entry: str | None = None
    lora_alpha: float | None = None
    config: MemFlowConfig = field(default_factory=MemFlowConfig.reference)
    integration: str = REFERENCE_FAMILY

    def __post_init__(self) -> None:
        conversion = integration_named(self.integration).checkpoint_conversion()
        if self.base_model is None:
            object.__setattr__(self, "base_model", conversion.base_model)
        if self.base_config is None:
            object.__setattr__(self, "base_config", dict(conversion.base_config))


@dataclass
class MemFlowAdapter:
    """A MemFlow configuration for one base model, with optional LoRA and full weights.

    Attributes:
        config: the memory layout.
        base_model: Hub id (or name) of the base diffusers model; ``None`` when not known (e.g.
            ``memflow convert`` with another ``--base-config`` and no ``--base-model``).
        integration: the model family (``Integration.name``; ``integrations``).
        base_model_config: transformer config fields the target model must match.
        lora_state: LoRA weights, peft layout on diffusers module names.
        lora_alpha: LoRA alpha (defaults to the rank when ``None``).
        base_weights: full transformer state dict (diffusers names) to load before the LoRA.
    """

    config: MemFlowConfig
    base_model: str | None
    integration: str
    base_model_config: dict[str, Any]
    lora_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    lora_alpha: float | None = None
    base_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def for_model(
        cls,
        transformer: nn.Module,
        config: MemFlowConfig,
        base_model: str | None,
        lora_state: dict[str, torch.Tensor] | None = None,
        lora_alpha: float | None = None,
        base_weights: dict[str, torch.Tensor] | None = None,
    ) -> MemFlowAdapter:
        """An adapter targeting ``transformer``'s architecture."""
        return cls(
            config=config,
            base_model=base_model,
            integration=find_integration(transformer).name,
            base_model_config=_architecture(transformer),
            lora_state=lora_state,
            lora_alpha=lora_alpha,
            base_weights=base_weights,
        )

    # ------------------------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the adapter folder (created if needed), every file with the mode the umask
        gives; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "memflow": self.config.to_dict(),
            "base_model": self.base_model,
            "integration": self.integration,
            "base_model_config": self.base_model_config,
            "lora": None if self.lora_state is None else {"alpha": self.lora_alpha},
            "base_weights": self.base_weights is not None,
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name, weights in ((LORA_WEIGHTS_NAME, self.lora_state),
                              (BASE_WEIGHTS_NAME, self.base_weights)):
            if weights is not None:
                save_file({k: v.contiguous() for k, v in weights.items()}, directory / name)
                chmod_as_umask(directory / name)  # safetensors writes 0600
        (directory / MODEL_CARD_NAME).write_text(self._model_card(), encoding="utf-8")
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str = "Upload MemFlow adapter",
    ) -> str:
        """Create ``repo_id`` if needed and upload the adapter folder; returns the commit URL."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message
            )
        return str(commit)

    def _model_card(self) -> str:
        metadata = ModelCardData(
            library_name="memflow-adapter",
            base_model=self.base_model,
            tags=["memflow", "video-generation", "streaming", "long-video"]
            + (["lora"] if self.lora_state is not None else []),
        ).to_yaml()
        family = {integration.name: integration for integration in INTEGRATIONS}.get(
            self.integration
        )
        video = None if family is None else family.default_video
        sizes = "" if video is None else f", height={video.height}, width={video.width}"
        base = self.base_model or "an unrecorded base model"
        repo = self.base_model or "<the base model's Hub id or folder>"
        rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in self.config.to_dict().items())
        contents = [name for name, present in (
            ("LoRA weights", self.lora_state is not None),
            ("full transformer weights", self.base_weights is not None),
        ) if present] or ["no weights (configuration only)"]
        return (
            f"---\n{metadata}\n---\n\n# MemFlow adapter for {base}\n\n"
            "Long-term narrative memory (MemFlow: Narrative Adaptive Memory and Sparse Memory "
            "Activation) for streaming video generation with "
            f"[memflow-adapter](https://pypi.org/project/memflow-adapter/).\n\n"
            f"Contents: {', '.join(contents)}. Integration: `{self.integration}`.\n\n"
            f"| memory setting | value |\n| --- | --- |\n{rows}\n\n"
            "## Usage\n\n```python\n"
            "from memflow_adapter import MemFlowAdapter, MemFlowStreamingPipeline\n\n"
            "adapter = MemFlowAdapter.from_pretrained(\"<this repo>\")\n"
            f"pipe = MemFlowStreamingPipeline.from_pretrained(\"{repo}\", "
            "adapter.config)\nadapter.apply_to(pipe.transformer)\n"
            "video = pipe([\"first prompt\", \"second prompt\"], frames_per_prompt=40,\n"
            f"             num_latent_frames=80{sizes})\n```\n"
        )

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike[str],
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | None = None,
        published: PublishedLayout | None = None,
    ) -> MemFlowAdapter:
        """Load an adapter from a local folder or a Hub repository.

        Args:
            repo_id_or_dir: an adapter folder, or a Hub repo id (downloaded and cached by
                huggingface_hub; ``HF_HUB_OFFLINE=1`` uses the cache only).
            revision, cache_dir, token: passed to ``huggingface_hub.snapshot_download``.
            published: how to read a repository in the published layout (default: MemFlow's,
                on Wan2.1-T2V-1.3B); its conversion is cached under ``cache_dir``.
        """
        folder = _resolve_folder(repo_id_or_dir, revision, cache_dir, token)
        if (folder / CONFIG_NAME).is_file():
            return cls._load_folder(folder)
        if (folder / PUBLISHED_BASE_NAME).is_file() or (folder / PUBLISHED_LORA_NAME).is_file():
            converted = _converted_cache_folder(folder, cache_dir)
            if not (converted / CONFIG_NAME).is_file():
                cls._convert_published(folder, published or PublishedLayout()).save_pretrained(
                    converted
                )
            return cls._load_folder(converted)
        raise FileNotFoundError(
            f"{repo_id_or_dir} holds no MemFlow adapter: expected {CONFIG_NAME}, or "
            f"{PUBLISHED_BASE_NAME} / {PUBLISHED_LORA_NAME} in the published layout"
        )

    @classmethod
    def _load_folder(cls, folder: Path) -> MemFlowAdapter:
        meta = _read_meta(folder / CONFIG_NAME)
        lora = _load_weights(folder / LORA_WEIGHTS_NAME) if meta["lora"] is not None else None
        base = _load_weights(folder / BASE_WEIGHTS_NAME) if meta["base_weights"] else None
        return cls(
            config=MemFlowConfig.from_dict(meta["memflow"]),
            base_model=meta["base_model"],
            integration=meta["integration"],
            base_model_config=meta["base_model_config"],
            lora_state=lora,
            lora_alpha=None if meta["lora"] is None else meta["lora"]["alpha"],
            base_weights=base,
        )

    @classmethod
    def _convert_published(cls, folder: Path, layout: PublishedLayout) -> MemFlowAdapter:
        """The published layout (the family's original keys) as an adapter on diffusers names."""
        family = integration_named(layout.integration)
        conversion = family.checkpoint_conversion()
        base_weights = lora_state = None
        if (folder / PUBLISHED_BASE_NAME).is_file():
            checkpoint = load_checkpoint_file(folder / PUBLISHED_BASE_NAME)
            base_weights = conversion.transformer_weights(checkpoint, layout.entry)
        if (folder / PUBLISHED_LORA_NAME).is_file():
            lora_state = conversion.lora_to_diffusers(
                load_checkpoint_file(folder / PUBLISHED_LORA_NAME)
            )
        architecture = {k: v for k, v in layout.base_config.items() if not k.startswith("_")}
        return cls(
            config=layout.config,
            base_model=layout.base_model,
            integration=family.name,
            base_model_config={
                "_class_name": conversion.model_class.__name__, **_json_ready(architecture)
            },
            lora_state=lora_state,
            lora_alpha=layout.lora_alpha,
            base_weights=base_weights,
        )

    # ---------------------------------------------------------------------------------- applying
    def apply_to(self, target: Any, merge_lora: bool = False) -> MemFlowAttachment:
        """Load the adapter's weights into a transformer (or a pipeline's) and attach MemFlow.

        Everything is checked before the model is changed: the integration, the architecture,
        the full weights' names, shapes and values (finite), and the LoRA's targets, shapes and
        values.
        """
        transformer = getattr(target, "transformer", target)
        integration = find_integration(transformer)
        if integration.name != self.integration:
            raise ValueError(
                f"this adapter is for the {self.integration!r} integration, the model is "
                f"{type(transformer).__name__} ({integration.name!r})"
            )
        architecture = _architecture(transformer)
        mismatched = {
            key: (value, architecture.get(key, "<missing>"))
            for key, value in self.base_model_config.items()
            if architecture.get(key, "<missing>") != value
        }
        if mismatched:
            details = ", ".join(f"{k}: adapter {a!r} vs model {m!r}"
                                for k, (a, m) in sorted(mismatched.items()))
            raise ValueError(
                f"this adapter targets another base model ({self.base_model or 'unrecorded'}): "
                f"{details}"
            )
        attachment = get_memflow(transformer)
        if attachment is not None and attachment.config != self.config:
            raise ValueError(
                f"the model already streams with {attachment.config}; remove_memflow() it first"
            )
        if self.base_weights is not None:
            check_state_dict_fits(transformer.state_dict(), self.base_weights)
            check_finite(self.base_weights, "the adapter's base_weights")
        if self.lora_state is not None:
            validate_lora(transformer, self.lora_state)
            check_finite(self.lora_state, "the adapter's lora_state")
        if self.base_weights is not None:
            transformer.load_state_dict(self.base_weights, strict=True)
        if self.lora_state is not None:
            load_lora_into(transformer, self.lora_state, self.lora_alpha, merge=merge_lora)
        return attachment or apply_memflow(transformer, self.config)


def chmod_as_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and, for a folder, everything under it) the mode a plain ``open`` or
    ``mkdir`` would have: 0o666 (files) or 0o777 (folders) less the process umask.
    ``safetensors`` writes its files through a temporary file (0600) and ``tempfile.mkdtemp``
    makes folders 0700, which other users of a shared machine then cannot read."""
    umask = os.umask(0)  # reading the umask means setting it; restored at once
    os.umask(umask)
    root = Path(path)
    for item in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _architecture(transformer: nn.Module) -> dict[str, Any]:
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    return {"_class_name": type(transformer).__name__, **_json_ready(config)}


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    """Tuples become lists, as they do through JSON, so saved and live configs compare equal."""
    return json.loads(json.dumps(values))


def _resolve_folder(
    repo_id_or_dir: str | os.PathLike[str],
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | None,
) -> Path:
    path = Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        return path
    if _looks_like_a_path(str(repo_id_or_dir)):
        raise FileNotFoundError(
            f"no MemFlow adapter folder at {str(repo_id_or_dir)!r} ({path.resolve()} does not "
            "exist), and it is not a Hub repo id"
        )
    try:
        return Path(snapshot_download(
            str(repo_id_or_dir),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=[CONFIG_NAME, LORA_WEIGHTS_NAME, BASE_WEIGHTS_NAME, MODEL_CARD_NAME,
                            PUBLISHED_BASE_NAME, PUBLISHED_LORA_NAME],
        ))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError) as error:
        raise OSError(
            f"cannot load the MemFlow adapter {repo_id_or_dir!r}: it is not a local folder and "
            f"the Hub repository could not be fetched ({type(error).__name__}: {error})"
        ) from error


def _looks_like_a_path(name: str) -> bool:
    """A local path, not a Hub repo id (``name`` or ``namespace/name``)."""
    if name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _converted_cache_folder(folder: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where the conversion of a published-layout folder is cached: keyed by the source files'
    resolved paths, sizes and modification times, so a changed checkpoint is converted again."""
    fingerprint = hashlib.sha256()
    for name in (PUBLISHED_BASE_NAME, PUBLISHED_LORA_NAME):
        source = folder / name
        if source.is_file():
            stat = source.resolve().stat()
            fingerprint.update(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(cache_dir or HF_HUB_CACHE) / "memflow-converted" / fingerprint.hexdigest()[:24]


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable MemFlow adapter config: {error}") from error
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}, this memflow-adapter reads version "
            f"{FORMAT_VERSION}"
        )
    required = ("memflow", "base_model", "integration", "base_model_config", "lora",
                "base_weights")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{path} is missing {missing}")
    return meta


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"the adapter config names weights that are missing: {path}")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    check_finite(weights, str(path))
    return weights
