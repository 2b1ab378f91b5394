"""The whole product path on this machine: `generate --model demo` at a large size, timed by piece.

Prints per stage: wall time, peak RSS (benchmarks._measure.PeakRSS, a window per stage), and
where the time goes (UNet, VAE encode, VAE decode, resize, file encoding). From the repo root:
    python -m benchmarks.e2e --width 16384 --height 8192 --steps 20 [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
import time
from pathlib import Path

from benchmarks._measure import PeakRSS, max_rss


class Timers:
    """Seconds spent in each piece, per stage."""

    def __init__(self):
        self.stage = 0
        self.seconds = collections.defaultdict(float)

    @contextlib.contextmanager
    def piece(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[(self.stage, name)] += time.perf_counter() - start

    def wrap(self, module, attr, name):
        original = getattr(module, attr)

        def timed(*args, **kwargs):
            with self.piece(name):
                return original(*args, **kwargs)

        setattr(module, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=16384)
    ap.add_argument("--height", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from linfusion_cli.io import images
    from linfusion_cli import api
    from linfusion_cli.cli.runs import load
    from linfusion_cli.pipeline import StageFinished, StageStarted, stages

    timers, meter = Timers(), PeakRSS(interval=0.05)  # reset at each stage
    timers.wrap(stages.tiled_vae, "encode", "vae_encode")
    timers.wrap(stages.tiled_vae, "decode", "vae_decode")
    timers.wrap(stages, "resize", "resize")
    timers.wrap(images, "save_image", "file")
    t0 = time.perf_counter()
    plan = api.plan_request(api.Request(
        prompt="a lighthouse at dusk", model="demo", width=args.width, height=args.height,
        steps=args.steps, seed=args.seed, save_stages=False))
    model = load(plan, verbose=False, quiet=True)
    unet = model.pipe.unet
    unet.register_forward_pre_hook(lambda m, a: setattr(timers, "_u", time.perf_counter()))
    unet.register_forward_hook(lambda m, a, o: timers.seconds.__setitem__(
        (timers.stage, "unet"), timers.seconds[(timers.stage, "unet")] + time.perf_counter() - timers._u))
    rows = []

    def on_event(event):
        if isinstance(event, StageStarted):
            timers.stage = event.stage
            meter.reset()
            timers.started = time.perf_counter()
        elif isinstance(event, StageFinished):
            rows.append((event.stage, time.perf_counter() - timers.started, meter.peak))

    out_dir = Path(args.out or tempfile.mkdtemp())
    path = out_dir / f"e2e-{args.width}x{args.height}.png"
    for s in plan.stages:
        m = s.memory
        print(f"stage {s.index + 1}: {s.width}x{s.height} strength {s.strength} steps {s.denoise_steps} "
              f"plan: tile {m.vae_tile_px}, cfg_split {m.cfg_split}, ff_chunk {m.ff_chunk}, "
              f"est {m.estimated_peak_gib:.2f} GiB", flush=True)
    timers.stage = len(plan.stages)  # file encoding is counted after the last stage
    with meter:
        result = api.generate_file(plan, model, path=path, fmt="png", overwrite=True, on_event=on_event)
    total = time.perf_counter() - t0
    pieces = ["unet", "vae_encode", "vae_decode", "resize"]
    print(f"{'stage':>5} {'size':>12} {'wall s':>8} {'peak RSS GiB':>12} " + " ".join(f"{p:>10}" for p in pieces))
    for index, seconds, peak in rows:
        s = plan.stages[index]
        print(f"{index + 1:>5} {s.width:>5}x{s.height:<6} {seconds:>8.1f} {peak / 2**30:>12.2f} "
              + " ".join(f"{timers.seconds[(index, p)]:>10.1f}" for p in pieces), flush=True)
    file_s = sum(v for (st, p), v in timers.seconds.items() if p == "file")
    print(f"file encoding (PNG level 1): {file_s:.1f} s; total wall {total:.1f} s; "
          f"overall peak RSS {max_rss() / 2**30:.2f} GiB; output {result['path']} "
          f"({path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
