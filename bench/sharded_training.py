"""What does FSDP2 sharding cost and save? ``streaming_long_tuning --tiny`` on one global batch of
2 videos, run as 1 process (``training.sharding=none``, 2 videos), 2 DDP processes and 2 FSDP2
processes (``training.sharding=fsdp2``, 1 video each), one after the other in this run. Prints,
per transformer, the parameter bytes each process holds, and the median step time (steps after
the first) relative to the 1-process run.

The processes talk over gloo on the CPU: FSDP2's all-gathers and reduce-scatters are memory
copies between processes here, not NVLink transfers, so the step-time ratios say what the
bookkeeping costs on this machine, not what a GPU cluster gets. Each process, like a device,
gets ``--threads`` CPU threads (default 1: 2 processes use 2 cores, 1 process 1).

    .venv/bin/python bench/sharded_training.py             # about 2 minutes on 2 cores
    .venv/bin/python bench/sharded_training.py --steps 6 --latent-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = (  # (label, processes, overrides)
    ("1 process, 2 videos", 1, ("rollout.batch_size=2",)),
    ("2 processes DDP, 1 video each", 2, ()),
    ("2 processes FSDP2, 1 video each", 2, ("training.sharding=fsdp2",)),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (>= 2)")
    parser.add_argument("--latent-size", type=int, default=8, help="latent height = width")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # the worker's output
    args, overrides = parser.parse_known_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is a warm-up)")
    if args.threads < 1:
        parser.error("--threads must be an int >= 1")
    args.overrides = overrides
    return args


def work(record: Path, overrides: list[str]) -> None:
    """One run of the recipe (this script under torchrun or alone): at its first step (the
    models sharded, if they are), each process writes the bytes it holds of each transformer to
    ``record/bytes-rank<r>.json``."""
    from recipes import streaming_long_tuning as module
    from recipes.sharding import local_parameter_bytes
    from recipes.training import main

    class Recorded(module.StreamingLongTuning):
        def train_phase(self, name, step, randomness):
            path = record / f"bytes-rank{self.accelerator.process_index}.json"
            if not path.exists():
                held = {n: local_parameter_bytes(m) for n, m in self.transformers().items()}
                path.write_text(json.dumps(held))
            return super().train_phase(name, step, randomness)

    main(module.NAME, module.StreamingLongTuningConfig, Recorded, overrides)


def launch(args: argparse.Namespace, processes: int, overrides: tuple[str, ...], folder: Path):
    """Run one configuration; returns (per-rank bytes by transformer, step seconds)."""
    folder.mkdir()
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(processes)]
    size = args.latent_size
    command = [
        *launcher, __file__, "--record", str(folder), "--tiny",
        f"training.output_dir={folder / 'out'}", f"training.max_steps={args.steps}",
        f"training.checkpoint_every={args.steps}", "validation.every_steps=0",
        f"rollout.latent_height={size}", f"rollout.latent_width={size}", *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    held = [json.loads((folder / f"bytes-rank{r}.json").read_text()) for r in range(processes)]
    rows = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    seconds = [json.loads(row)["seconds"] for row in rows][1:]
    return held, statistics.median(seconds)


def main() -> None:
    args = parse_args()
    if args.record is not None:
        work(args.record, args.overrides)
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (label, processes, overrides) in enumerate(RUNS):
            results[label] = launch(args, processes, overrides, Path(scratch) / str(index))
    single_bytes, single_seconds = results[RUNS[0][0]]
    print(f"streaming_long_tuning --tiny, {args.latent_size}x{args.latent_size} latents, global "
          f"batch 2, {args.steps} steps, {args.threads} CPU thread(s) per process (gloo, not a "
          "GPU)")
    print("\nparameter bytes per process (vs 1 process)")
    for name, whole in single_bytes[0].items():
        for label, (held, _) in list(results.items())[1:]:
            shares = ", ".join(f"{rank[name]:,} ({rank[name] / whole:.3f})" for rank in held)
            print(f"  {name:8s} 1 process {whole:,}; {label}: {shares}")
    print("\nmedian step time (after the first) vs 1 process")
    for label, (_, seconds) in results.items():
        print(f"  {label:34s} {seconds:7.3f} s  {seconds / single_seconds:5.2f}x")


if __name__ == "__main__":
    main()
