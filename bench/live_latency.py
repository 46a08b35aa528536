"""``memflow live`` in a real browser: the latency from a chunk's last frame decoded on the server
to its display in the page, and the frame rate the page sustains, with the narrative world's
student (the default model of ``memflow live``) on this machine's CPU.

The page measures both itself: the server stamps each chunk with its clock when the chunk's last
frame was decoded; the page converts that to its own clock with the offset of the ping with the
shortest round trip, and takes the chunk as displayed at the first animation frame after the one
that drew its last frame. Two playback rates:

* ``--fps`` (default 16, the video's rate): the page plays at the video's rate; a chunk's last
  frame waits for the frames before it (one frame interval within the chunk, plus up to the
  two chunks the server may make ahead);
* 240 ("as made"): the page draws each frame as soon as it is decoded (at most one per animation
  frame): the transport and drawing latency alone, and the rate at which the model makes frames.

    .venv/bin/python bench/live_latency.py          # about a minute on 2 cores

Needs the live and dev extras and Debian's chromium + chromium-driver (``make browser``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from memflow_apps.live.server import create_app, serving
from memflow_apps.live.session import LiveSettings
from memflow_apps.world.demo import live_world

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the browser helper
from live_browser import chromium, missing_browser  # noqa: E402

AS_MADE = 240


def measure(world, fps: int, num_latent_frames: int, output_dir: Path) -> dict:
    """One video played in headless Chromium at ``fps``; the page's figures."""
    settings = LiveSettings(
        model="narrative world student", prompt=world.prompts[0], height=world.height,
        width=world.width, max_sequence_length=world.max_sequence_length,
        num_latent_frames=num_latent_frames, fps=fps, guidance_scale=world.guidance_scale,
        output_dir=output_dir,
    )
    num_chunks = -(-num_latent_frames // world.streaming.config.frames_per_chunk)
    with serving(create_app(world.streaming, settings)) as url, chromium() as driver:
        driver.get(url + "/")
        deadline = time.monotonic() + 300
        while driver.execute_script("return window.memflow.stats.chunksShown") < num_chunks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page showed fewer than {num_chunks} chunks in 300 s")
            time.sleep(0.2)
        stats = driver.execute_script("return window.memflow.stats")
        made = driver.execute_script(
            "return window.memflow.chunks.map(c => [c.seconds + c.decode_seconds, c.num_pixels])")
        rtt = driver.execute_script("return window.memflow.bestRttMs")
    latencies = sorted(stats["latenciesMs"])
    return {
        "chunks": num_chunks,
        "frames": stats["framesShown"],
        "fps_shown": stats["fps"],
        "latency_median_ms": statistics.median(latencies),
        "latency_p90_ms": latencies[int(0.9 * (len(latencies) - 1))],
        "latency_max_ms": latencies[-1],
        "make_ms_per_chunk": 1000 * statistics.mean(seconds for seconds, _ in made),
        "make_fps": sum(frames for _, frames in made) / sum(seconds for seconds, _ in made),
        "ping_rtt_ms": rtt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fps", type=int, default=16, help="the paced playback rate (default 16)")
    parser.add_argument("--num-latent-frames", type=int, default=160,
                        help="length of each video (default 160: 80 chunks, 10 s at 16 fps)")
    args = parser.parse_args()
    why = missing_browser()
    if why:
        raise SystemExit(f"bench/live_latency.py needs a browser: {why}")
    world = live_world("reference_sma")
    rows = []
    with TemporaryDirectory() as output_dir:
        for label, fps in ((f"{args.fps} fps (the video's rate)", args.fps),
                           ("as made", AS_MADE)):
            rows.append((label, measure(world, fps, args.num_latent_frames, Path(output_dir))))
    print(f"memflow live, narrative world student (32x32, 2-frame chunks, "
          f"{world.streaming.config.describe()}), headless Chromium, "
          f"{args.num_latent_frames} latent frames per video:")
    print("| playback | FPS shown | decoded -> shown, median / p90 / max (ms) | made per chunk "
          "(ms) | made FPS |")
    print("| --- | --- | --- | --- | --- |")
    for label, row in rows:
        print(f"| {label} | {row['fps_shown']:.1f} | {row['latency_median_ms']:.0f} / "
              f"{row['latency_p90_ms']:.0f} / {row['latency_max_ms']:.0f} | "
              f"{row['make_ms_per_chunk']:.0f} | {row['make_fps']:.1f} |")
    print(f"(clock offset from pings, shortest round trip {rows[0][1]['ping_rtt_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
