"""The public API: ``memflow_adapter`` exports what users construct and what they get back,
nothing of the engine's internals, each with a docstring (with tensor shapes where it holds or
takes tensors), imported on first use."""

import inspect
import re
import subprocess
import sys

import memflow_adapter

PUBLIC = [
    "ChunkEngine", "ChunkMemory", "ChunkPlan", "ChunkReport", "Denoised", "FlowMatchSchedule",
    "Guidance", "MemFlowAdapter", "MemFlowAttachment", "MemFlowConfig",
    "MemFlowStreamingPipeline", "OpenChunk", "PromptConditioning", "PromptSchedule",
    "PublishedLayout", "SessionStateError", "StreamedChunk", "StreamingSession",
    "StreamingVideoOutput", "VideoStream", "__version__", "apply_memflow", "get_memflow",
    "remove_memflow",
]
#: Exported names whose objects hold or take tensors: their docstrings give the shapes.
WITH_TENSORS = [
    "ChunkEngine", "Denoised", "Guidance", "MemFlowAttachment", "MemFlowStreamingPipeline",
    "OpenChunk", "PromptConditioning", "StreamedChunk", "StreamingSession",
    "StreamingVideoOutput", "VideoStream", "apply_memflow",
]
#: A shape in a docstring, e.g. ``[B, C, F, h, w]`` or ``[B, L, H, D]``.
SHAPE = re.compile(r"\[B, [A-Za-z_]+(, [A-Za-z_/* ]+)*\]")
#: The engine's internals, reachable from their modules only.
INTERNAL = ["PassKind", "RecacheWindow", "PassActivation", "RecentLatents", "StepNoise"]


def test_the_public_names_are_pinned():
    assert memflow_adapter.__all__ == PUBLIC
    assert sorted(dir(memflow_adapter)) == sorted({*PUBLIC, *dir(memflow_adapter)})


def test_every_public_name_resolves_and_has_a_docstring():
    for name in PUBLIC[:-4] + PUBLIC[-3:]:
        value = getattr(memflow_adapter, name)
        assert inspect.getdoc(value), f"{name} has no docstring"


def test_the_names_that_carry_tensors_state_their_shapes():
    for name in WITH_TENSORS:
        assert SHAPE.search(inspect.getdoc(getattr(memflow_adapter, name))), name


def test_the_engine_internals_are_not_exported():
    for name in INTERNAL:
        assert name not in memflow_adapter.__all__
        assert not hasattr(memflow_adapter, name), name


def test_importing_the_package_imports_no_torch():
    code = "import sys, memflow_adapter; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
