"""Copy-free key sets (docs/architecture.md s.2, s.4): once the cache is full a pass attends to
views of the cache and one reused SMA buffer, and allocates no key set of its own."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "key_set_copies.py"


@pytest.mark.slow
def test_a_pass_over_a_full_cache_concatenates_and_allocates_no_key_set():
    """bench/key_set_copies.py at a small geometry, profiled with torch.profiler."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--tokens-per-frame", "512", "--head-dim", "64"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    layouts = ("longlive", "memflow", "memflow+sma", "full_history")
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()
        if line.split() and line.split()[0] in layouts
    }
    assert set(rows) == set(layouts)
    for layout, (_, _frames, key_set_mb, allocated_mb, cats, gathers) in rows.items():
        # what is left is the attention output and small index tensors, a fraction of the keys
        assert float(allocated_mb) < float(key_set_mb) / 2, layout
        if layout == "memflow+sma":
            # the K and V selections are index_selects into the reused buffer; one small gather
            # (the trace's frame ids) and one small cat of the candidates' frame indices
            assert (int(cats), int(gathers)) == (1, 1)
        else:
            assert (int(cats), int(gathers)) == (0, 0), layout
