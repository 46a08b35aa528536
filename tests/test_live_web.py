"""``memflow live``: the web page that streams a video as it is made.

The server is driven through starlette's TestClient (its websocket) on the tiny random-weight
Wan; one slow test drives the real page in headless Chromium on the narrative world's student,
and writes the README's screenshot with ``MEMFLOW_WRITE_SCREENSHOT=1``."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
import torch

from memflow_adapter.config import MemFlowConfig
from memflow_adapter.pipeline import MemFlowStreamingPipeline
from memflow_apps.cli.main import main
from memflow_apps.live.messages import latent_pixel_frames
from memflow_apps.live.server import LOOPBACK_NAMES, check_host, create_app, serving
from memflow_apps.live.session import LiveSettings, clean_prompt
from memflow_apps.shared.tiny_wan import build_tiny_wan_pipeline

from live_browser import chromium, missing_browser

pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (the dev extra)")
from starlette.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
SCREENSHOT = REPOSITORY / "docs" / "images" / "live.png"
WS = "ws://localhost/ws"  # the TestClient's own host name, testserver, is not served


@pytest.fixture(scope="module")
def tiny():
    """The tiny random-weight Wan with MemFlow + SMA (3-frame chunks, 4 latent frames decoding to
    1 + 4 + 4 video frames for the first chunk and 12 for the others)."""
    pipe = build_tiny_wan_pipeline(seed=0)
    return MemFlowStreamingPipeline(pipe, MemFlowConfig.preset("reference_sma"), device="cpu")


def settings_for(tmp_path: Path, **changes) -> LiveSettings:
    values = dict(model="tiny random", prompt="a red fox walks through a snowy forest",
                  height=32, width=32, max_sequence_length=16, num_latent_frames=12,
                  output_dir=tmp_path)
    return LiveSettings(**{**values, **changes})


def client_for(tiny, tmp_path: Path, **changes) -> TestClient:
    return TestClient(create_app(tiny, settings_for(tmp_path, **changes)),
                      base_url="http://localhost")


def receive(ws) -> tuple[dict, list[bytes]]:
    """The next message, with its frames when it is a chunk."""
    message = json.loads(ws.receive_text())
    frames = [ws.receive_bytes() for _ in range(message.get("num_pixels", 0))]
    return message, frames


def until(ws, kind: str, shown: bool = True) -> list[tuple[dict, list[bytes]]]:
    """The messages up to and including the first of type ``kind``; with ``shown``, each chunk
    is reported shown, as the page does once it has drawn it."""
    messages = []
    while True:
        message, frames = receive(ws)
        messages.append((message, frames))
        if shown and message["type"] == "chunk":
            ws.send_json({"type": "shown", "chunk": message["index"], "generation": 1})
        if message["type"] == kind:
            return messages


def chunks(messages) -> list[dict]:
    return [message for message, _ in messages if message["type"] == "chunk"]


# ------------------------------------------------------------------------------ the page's data
def test_the_page_and_its_files_are_served_to_this_machine_only(tiny, tmp_path):
    with client_for(tiny, tmp_path) as client:
        page = client.get("/")
        assert page.status_code == 200 and "memflow live" in page.text
        assert client.get("/page/app.js").status_code == 200
        assert client.get("/page/style.css").status_code == 200
        # a page reached under another name (DNS rebinding) is refused
        assert client.get("/", headers={"host": "attacker.example"}).status_code == 400


def test_another_sites_page_cannot_open_the_websocket(tiny, tmp_path):
    origin = {"origin": "http://attacker.example"}
    with client_for(tiny, tmp_path) as client, pytest.raises(WebSocketDisconnect) as refused, \
            client.websocket_connect(WS, headers=origin):
        pass
    assert refused.value.code == 1008  # policy violation, before the websocket is accepted


def test_the_page_gets_the_video_chunk_by_chunk_with_the_memory_the_trace_has(tiny, tmp_path):
    with client_for(tiny, tmp_path) as client, client.websocket_connect(WS) as ws:
        hello, _ = receive(ws)
        assert hello["type"] == "hello" and hello["frames_per_chunk"] == 3
        assert hello["max_prompt_chars"] == 500
        messages = until(ws, "done")
    started = messages[0][0]
    assert started == {"type": "started", "seed": 0, "generation": 1, "num_chunks": 4,
                       "schedule": [["a red fox walks through a snowy forest", 0]]}
    made = chunks(messages)
    assert [c["index"] for c in made] == [0, 1, 2, 3]
    assert [c["num_pixels"] for c in made] == [9, 12, 12, 12]
    assert [c["first_pixel"] for c in made] == [0, 9, 21, 33]
    assert made[1]["latent_pixels"] == [12, 16, 20]  # the last video frame of each latent frame
    frames = [frames for message, frames in messages if message["type"] == "chunk"]
    assert all(f.startswith(b"\x89PNG") for chunk in frames for f in chunk)
    # the memory is the stream's own trace, replayed on a fresh stream of the same seed
    stream = tiny.stream("a red fox walks through a snowy forest", num_latent_frames=12,
                         height=32, width=32, generator=torch.Generator().manual_seed(0),
                         max_sequence_length=16)
    for header, chunk in zip(made, stream, strict=True):
        assert header["memory"]["bank"] == {str(k): v[0] for k, v in chunk.memory.bank.items()}
        assert header["memory"]["sink"] == list(range(min(3, chunk.plan.start)))
    assert made[2]["memory"]["activated"]["0"]  # SMA's picks, per layer


def test_the_server_makes_no_more_than_two_chunks_the_page_has_not_shown(tiny, tmp_path):
    with client_for(tiny, tmp_path) as client, client.websocket_connect(WS) as ws:
        receive(ws)
        made = chunks(until(ws, "started", shown=False))
        made += chunks([receive(ws), receive(ws)])
        time.sleep(1.0)  # time for several more chunks, were they allowed
        ws.send_json({"type": "ping", "t": 1.0})
        pong, _ = receive(ws)  # nothing but the reply came in between
    assert [c["index"] for c in made] == [0, 1] and pong["type"] == "pong"


# ----------------------------------------------------------------------------------- prompts
def test_a_flood_of_prompts_applies_the_newest_at_the_next_chunk_with_the_recache(tiny, tmp_path):
    with client_for(tiny, tmp_path, num_latent_frames=30) as client, \
            client.websocket_connect(WS) as ws:
        receive(ws)
        messages = until(ws, "chunk")
        ws.send_json({"type": "pause"})
        messages += until(ws, "state")
        replaced = []
        for number in range(50):
            ws.send_json({"type": "prompt", "text": f"a  boat\nnumber {number}"})
            messages += until(ws, "pending")  # a chunk begun before the pause may come first
            pending = messages[-1][0]
            replaced.append(pending["replaced"])
        assert pending == {"type": "pending", "prompt": "a boat number 49",
                           "replaced": "a boat number 48"}
        assert replaced == [None, *(f"a boat number {n}" for n in range(49))]
        ws.send_json({"type": "resume"})
        messages += until(ws, "done")
    kinds = [message["type"] for message, _ in messages]
    assert kinds.count("applied") == 1
    applied = messages[kinds.index("applied")][0]
    assert applied["prompt"] == "a boat number 49"
    switch = applied["chunk"]
    assert switch == kinds[: kinds.index("applied")].count("chunk")  # the next chunk made
    made = chunks(messages)
    assert [(c["prompt"] == "a boat number 49", c["recached"]) for c in made[switch:]] == [
        (True, True), *[(True, False)] * (len(made) - switch - 1)]
    assert all(c["prompt"] != "a boat number 49" for c in made[:switch])
    assert applied["schedule"][-1] == ["a boat number 49", 3 * switch]


def test_a_prompt_over_the_limit_is_refused_and_changes_nothing(tiny, tmp_path):
    with client_for(tiny, tmp_path, max_prompt_chars=40) as client, \
            client.websocket_connect(WS) as ws:
        receive(ws)
        ws.send_json({"type": "prompt", "text": "x" * 41})
        replies = until(ws, "error")
        ws.send_json({"type": "prompt", "text": 42})
        wrong_type = until(ws, "error")
        ws.send_text("<script>alert(1)</script>")
        not_json = until(ws, "error")
        rest = until(ws, "done")
    assert replies[-1][0]["message"] == "prompt must be at most 40 characters, got 41"
    assert wrong_type[-1][0]["message"] == "prompt must be a string, got int"
    assert "a command must be a JSON object" in not_json[-1][0]["message"]
    messages = replies + wrong_type + not_json + rest
    assert not any(message["type"] in ("pending", "applied") for message, _ in messages)


def test_clean_prompt_makes_one_line_of_text():
    assert clean_prompt("  a fox\n\tin the snow ", 500) == "a fox in the snow"
    with pytest.raises(ValueError, match="prompt must not be empty"):
        clean_prompt(" \n ", 500)


# ----------------------------------------------------------------------- one page at a time
def test_a_second_page_is_told_the_server_is_busy(tiny, tmp_path):
    with client_for(tiny, tmp_path) as client, client.websocket_connect(WS) as first:
        receive(first)
        with client.websocket_connect(WS) as second:
            busy, _ = receive(second)
        assert busy["type"] == "busy" and "one generation at a time" in busy["message"]
        assert chunks(until(first, "chunk"))  # the first page streams on


def test_closing_the_page_stops_the_generation(tiny, tmp_path, monkeypatch):
    from memflow_adapter.stream import VideoStream

    made = []
    step = VideoStream.__next__
    monkeypatch.setattr(VideoStream, "__next__", lambda self: made.append(1) or step(self))
    with client_for(tiny, tmp_path, num_latent_frames=60) as client:
        with client.websocket_connect(WS) as ws:
            receive(ws)
            until(ws, "chunk")
        # the page is gone: its generation stops after the chunk being made, and the server
        # takes the next page
        deadline = time.monotonic() + 30
        while True:
            with client.websocket_connect(WS) as ws:
                if receive(ws)[0]["type"] == "hello":
                    stopped_at = len(made)
                    break
            assert time.monotonic() < deadline, "the closed page's generation did not end"
            time.sleep(0.05)
    assert stopped_at <= 4  # of 20 chunks (the next page's may have begun)


# ---------------------------------------------------------------------- restart, pause, save
def test_restart_starts_the_video_again_with_the_seed(tiny, tmp_path):
    with client_for(tiny, tmp_path) as client, client.websocket_connect(WS) as ws:
        receive(ws)
        until(ws, "chunk")
        ws.send_json({"type": "restart", "seed": 7})
        restarted = until(ws, "started")[-1][0]
        ws.send_json({"type": "restart", "seed": -1})
        refused = until(ws, "error")[-1][0]
    assert restarted["seed"] == 7 and restarted["generation"] == 2
    assert refused["message"] == "seed must be an int in 0..2**63 - 1, got -1"


def test_save_writes_the_video_report_timeline_and_the_paused_streams_state(tiny, tmp_path):
    with client_for(tiny, tmp_path) as client, client.websocket_connect(WS) as ws:
        receive(ws)
        until(ws, "chunk")
        ws.send_json({"type": "pause"})
        made = len(chunks(until(ws, "state")))
        ws.send_json({"type": "save"})
        replies = until(ws, "saved")
    made += len(chunks(replies))
    saved = replies[-1][0]
    assert saved["folder"] == str(tmp_path / "save-001")
    files = sorted(p.name for p in (tmp_path / "save-001").iterdir())
    assert files == ["memory_timeline.png", "report.json", "stream.pt", "video.mp4"]
    report = json.loads((tmp_path / "save-001" / "report.json").read_text())
    assert report["num_chunks"] == made + 1 and report["interrupted"] is True
    assert report["model"] == "tiny random" and report["seed"] == 0
    assert [chunk["chunk"] for chunk in report["chunks"]] == list(range(made + 1))
    resumed = tiny.resume(tmp_path / "save-001" / "stream.pt")
    assert resumed.next_chunk.index == made + 1  # the paused stream goes on from there


# ---------------------------------------------------------------------------------- helpers
def test_each_latent_frame_is_shown_by_the_last_video_frame_it_completes():
    # a causal 4x VAE: latent frame 0 gives 1 frame, every later one 4
    assert latent_pixel_frames(0, 3, 0, 9, 4) == [0, 4, 8]
    assert latent_pixel_frames(3, 3, 9, 12, 4) == [12, 16, 20]
    # the world's autoencoder: one frame each
    assert latent_pixel_frames(4, 2, 4, 2, 1) == [4, 5]


def test_only_loopback_is_served_unless_exposed(capsys):
    assert check_host("127.0.0.1", expose=False) == LOOPBACK_NAMES
    with pytest.raises(ValueError, match="--host 0.0.0.0 would serve the page to other machines"):
        check_host("0.0.0.0", expose=False)
    assert check_host("0.0.0.0", expose=True) == ("*",)
    assert "WARNING" in capsys.readouterr().err


def test_memflow_live_refuses_a_public_host_before_loading_a_model(capsys, monkeypatch):
    monkeypatch.delenv("MEMFLOW_TRACEBACK", raising=False)
    assert main(["live", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memflow live: error: --host 0.0.0.0 would serve") and "--expose" in err


# ------------------------------------------------------------------------------ the real page
@pytest.mark.slow
def test_the_page_in_a_browser_plays_switches_prompts_shows_memory_and_saves(tmp_path):
    """Headless Chromium on the world's student: frames arrive chunk by chunk, a typed prompt
    appears in the timeline and applies at the next chunk boundary with the recache, the memory
    panel shows the bank frames of the trace, and save writes the files."""
    why = missing_browser()
    if why:
        pytest.skip(f"no browser to drive: {why}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    from memflow_apps.world.demo import live_world

    world = live_world("reference_sma")
    settings = LiveSettings(
        model="narrative world student", prompt=world.prompts[0], height=world.height,
        width=world.width, max_sequence_length=world.max_sequence_length, num_latent_frames=64,
        guidance_scale=world.guidance_scale, output_dir=tmp_path, suggestions=world.prompts,
    )
    app = create_app(world.streaming, settings)
    typed = world.prompts[1]  # an entity enters the place
    with serving(app) as url, chromium() as driver:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 20, poll_frequency=0.05)
        state = lambda script: driver.execute_script(f"return {script}")  # noqa: E731
        assert driver.title == "memflow live"
        wait.until(lambda _: state("window.memflow.stats.chunksShown") >= 2)
        frames = state("window.memflow.stats.framesShown")
        assert frames >= 4 and state("document.getElementById('video').width") == 32

        driver.find_element(By.ID, "prompt").send_keys(typed)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda _: typed in driver.find_element(By.ID, "prompts").text)
        wait.until(lambda _: state("window.memflow.applied.length") == 1)
        applied = state("window.memflow.applied[0]")
        wait.until(lambda _: state("window.memflow.current.index") >= applied["chunk"] + 3)
        headers = state("window.memflow.chunks.map(c => [c.index, c.prompt, c.recached])")
        assert applied["prompt"] == typed
        assert headers[applied["chunk"]] == [applied["chunk"], typed, True]
        assert all(prompt != typed for _, prompt, _ in headers[: applied["chunk"]])
        assert f"chunk {applied['chunk']} (frame {2 * applied['chunk']}): {typed}" in (
            driver.find_element(By.ID, "prompts").text)

        driver.find_element(By.ID, "pause").click()
        wait.until(lambda _: driver.find_element(By.ID, "pause").text == "Resume")
        time.sleep(0.6)  # the chunks made play out
        driver.find_element(By.ID, "save").click()
        wait.until(lambda _: state("window.memflow.saved") is not None)
        current = state("window.memflow.current.index")
        shown_bank = [int(figure.get_attribute("data-frame"))
                      for figure in driver.find_elements(By.CSS_SELECTOR, "#bank figure")]
        thumbnails = driver.find_elements(By.CSS_SELECTOR, "#bank img")
        assert all(image.get_attribute("src").startswith("blob:") for image in thumbnails)
        if os.environ.get("MEMFLOW_WRITE_SCREENSHOT") == "1":
            write_screenshot(driver.get_screenshot_as_png())
    saved = {name: Path(path) for name, path in state_files(tmp_path).items()}
    assert sorted(saved) == ["report", "state", "timeline", "video"]
    assert all(path.is_file() and path.stat().st_size > 0 for path in saved.values())
    report = json.loads(saved["report"].read_text())
    assert shown_bank and shown_bank == report["chunks"][current]["bank_frames"]


def state_files(output_dir: Path) -> dict[str, str]:
    report = json.loads((output_dir / "save-001" / "report.json").read_text())
    return {**report["files"], "state": str(output_dir / "save-001" / "stream.pt")}


def write_screenshot(png: bytes) -> None:
    """The README's screenshot, made smaller (a palette PNG) so that the repository stays light."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=128).save(SCREENSHOT, optimize=True)
