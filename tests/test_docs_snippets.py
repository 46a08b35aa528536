"""Every Python snippet of README.md and docs/*.md runs as written.

A file's snippets run in order in one namespace (a later snippet may use an earlier one's
names), in a scratch folder, offline. Where a snippet names a Hub id, ``from_pretrained``
builds the tiny random Wan (``memflow_apps.shared.tiny_wan``) instead, the sizes in ``SIZES`` are
scaled down to what 2 CPU cores run in seconds, a device ``"cuda"`` is the CPU and
``torch.compile`` returns the model as it is; nothing else of a snippet is changed.
A snippet that names a Hub id must say so to the reader (``<!-- snippet: hub -->`` and a
"Needs the Hub" line before its fence). A snippet that cannot run offline is marked
``<!-- snippet: skip REASON -->`` and listed in ``SKIPPED``; it is still compiled.
"""

import re
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from integrations.wan_checkpoints import original_lora_to_diffusers
from memflow_adapter import MemFlowAdapter, MemFlowConfig, MemFlowStreamingPipeline
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

from wan_fixtures import ALPHA, original_lora

REPOSITORY = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
HUB_MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
HUB_ADAPTER = "KlingTeam/MemFlow"
#: Sizes of a real 480x832 video -> a 32x32 one of a few chunks (each must occur in some
#: snippet, so that this list cannot go stale).
SIZES = {
    "num_latent_frames=240": "num_latent_frames=15",
    "num_latent_frames=120": "num_latent_frames=9",
    "num_latent_frames = 120": "num_latent_frames = 9",
    "frames_per_prompt=40": "frames_per_prompt=3",
    "height=480, width=832": "height=32, width=32",
    "latent_height, latent_width = 60, 104": "latent_height, latent_width = 4, 4",
}
#: Snippets that do not run here, and why (the reason is the marker's text).
SKIPPED = {
    "README.md": [
        "an outline: text_keys, model and the frames are placeholders",
        "needs 2 GPUs under torchrun (nccl); tests/test_context_parallel.py runs it on 2 gloo "
        "processes",
    ],
}
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- snippet: (hub|skip (.*?)) -->")


def snippets(path: Path) -> list[tuple[int, str, str | None, str]]:
    """``(line, code, marker, text before the fence)`` of every Python fence of ``path``;
    the marker is the ``<!-- snippet: ... -->`` comment within the 5 lines before it."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = "\n".join(text[: match.start()].splitlines()[-5:])
        markers = MARKER.findall(before)
        found.append((line, match.group(1), markers[-1][0] if markers else None, before))
    return found


def tiny_pipeline(model, config, **kwargs):
    assert model == HUB_MODEL, model
    kwargs.pop("dtype", None)
    return MemFlowStreamingPipeline(build_tiny_wan_pipeline(seed=0), config, device="cpu",
                                    **kwargs)


def tiny_transformer(model, subfolder=None, **kwargs):
    assert (model, subfolder) == (HUB_MODEL, "transformer"), (model, subfolder)
    return build_tiny_wan_pipeline(seed=0).transformer


def tiny_adapter(repo_id, **kwargs):
    assert repo_id == HUB_ADAPTER, repo_id
    transformer = build_tiny_wan_pipeline(seed=0).transformer
    lora = original_lora_to_diffusers(original_lora(transformer))
    return MemFlowAdapter.for_model(transformer, MemFlowConfig.reference(), HUB_MODEL,
                                    lora_state=lora, lora_alpha=ALPHA)


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setattr(MemFlowStreamingPipeline, "from_pretrained", staticmethod(tiny_pipeline))
    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", staticmethod(tiny_transformer))
    monkeypatch.setattr(MemFlowAdapter, "from_pretrained", staticmethod(tiny_adapter))
    # compiling takes minutes on 2 cores even with dynamo alone; tests/test_compile.py compiles
    # the same stream, so here the snippet runs its model uncompiled
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)


def test_every_hub_snippet_says_so_and_every_skip_is_listed():
    skipped = {}
    for path in DOCUMENTS:
        for line, code, marker, before in snippets(path):
            where = f"{path.name}:{line}"
            if HUB_MODEL in code or HUB_ADAPTER in code:
                assert marker is not None and "Needs the Hub" in before, (
                    f"{where} names a Hub id: mark it <!-- snippet: hub --> and say "
                    "'Needs the Hub' (download size) before the fence"
                )
            if marker and marker.startswith("skip "):
                skipped.setdefault(path.name, []).append(marker[len("skip "):])
                compile(code, where, "exec")  # a skipped snippet still parses
    assert skipped == SKIPPED


@pytest.mark.slow
@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: path.name)
def test_every_python_snippet_runs_as_written(path, offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippets__"}
    for line, code, marker, _ in snippets(path):
        if marker and marker.startswith("skip "):
            continue
        for real, tiny in SIZES.items():
            code = code.replace(real, tiny)
        code = code.replace('"cuda"', '"cpu"')
        exec(compile(code, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102


def test_every_size_substitution_is_used():
    code = "".join(code for path in DOCUMENTS for _, code, _, _ in snippets(path))
    assert [real for real in SIZES if real not in code] == []
