"""Our chunk loop with the LongLive layout computes exactly what a plain Self-Forcing-style loop
(per-layer ``[sink | window | chunk]`` buffers, no session) computes over the same Wan model:
bench/bookkeeping.py runs both side by side and prints their difference."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bookkeeping.py"


@pytest.mark.slow
def test_the_longlive_stream_equals_a_plain_streaming_loop_bit_for_bit():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--latent-height", "8", "--latent-width", "8",
         "--chunks", "7", "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    difference = next(
        line for line in result.stdout.splitlines() if line.startswith("largest |ours - plain|")
    )
    # 7 chunks: the window fills at chunk 3 and rolls three times
    assert difference.split(":")[1].split()[0] == "0.00e+00"
