"""Chunk timings that do not hold the host back: host clocks on CPU, CUDA events on CUDA,
read only when a report asks for them (a ``torch.cuda.synchronize`` per chunk would stop the
host from queueing the next chunk's kernels while the GPU runs this one's)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mark:
    """A point in a device's work: a host clock reading, or a recorded CUDA event."""

    host: float
    event: torch.cuda.Event | None = None


class Stopwatch:
    """Marks points in the work queued on ``device``: on CUDA each mark is an event recorded on
    the current stream, so marking never waits for the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Mark:
        if not self.cuda:
            return Mark(time.perf_counter())
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return Mark(time.perf_counter(), event)


def seconds_between(start: Mark, stop: Mark) -> float:
    """Seconds of device work between two marks (on CUDA this waits for ``stop``'s event)."""
    if start.event is None or stop.event is None:
        return stop.host - start.host
    stop.event.synchronize()
    return start.event.elapsed_time(stop.event) / 1000.0


def hardware_name(device: torch.device) -> str:
    """What ran the work, for reports: the GPU's name, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {torch.get_num_threads()} of {os.cpu_count()} threads"
