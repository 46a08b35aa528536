"""Without the optional extras (video, xformers, live) every module imports and the ``memflow``
command starts; what needs an extra says which one to install."""

import subprocess
import sys
import textwrap

import pytest

#: The optional dependencies of the extras, blocked from import in the child process (the train
#: extra's accelerate and pyyaml come with peft and huggingface_hub, core dependencies).
BLOCKED = ("matplotlib", "imageio", "imageio_ffmpeg", "av", "xformers", "starlette", "uvicorn",
           "websockets")

PROGRAM = textwrap.dedent(
    f"""
    import sys

    for name in {BLOCKED!r}:  # as if not installed: find_spec says None, import fails
        sys.modules[name] = None
    import importlib, pkgutil, memflow_adapter
    imported = []
    for package in ("memflow_adapter", "integrations", "recipes", "memflow_apps"):
        path = importlib.import_module(package).__path__
        for info in pkgutil.walk_packages(path, package + "."):
            importlib.import_module(info.name)
            imported.append(info.name)
    assert "recipes.memory_finetune" in imported, imported
    assert "memflow_apps.eval.report" in imported and "memflow_adapter.timeline" in imported
    from memflow_apps.cli.main import main
    for argv in (["--help"], ["--version"], ["generate", "--help"], ["eval", "--help"],
                 ["live", "--help"]):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 0, (argv, stop.code)
    from memflow_adapter import MemFlowConfig
    from memflow_adapter.timeline import draw_memory_timeline
    from memflow_adapter.introspection import ChunkMemory
    from memflow_apps.shared.videos import VideoFileWriter
    from memflow_apps.live.server import create_app
    trace = [ChunkMemory(chunk_index=0, start_frame=0, bank={{}}, activated={{}})]
    for extra, call in (
        ("video", lambda: draw_memory_timeline(trace, MemFlowConfig.longlive(), "x.png")),
        ("video", lambda: VideoFileWriter("x.mp4", fps=16)),
        ("live", lambda: create_app(None, None)),
    ):
        try:
            call()
        except ImportError as error:
            assert f"pip install 'memflow-adapter[{{extra}}]'" in str(error), str(error)
        else:
            raise AssertionError("no ImportError")
    print("ok")
    """
)


@pytest.mark.slow
def test_the_core_and_the_command_start_without_the_optional_extras(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
