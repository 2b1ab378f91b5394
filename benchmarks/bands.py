"""One UNet step of the full-size SD1.5 UNet (random weights, shipped config) on the CPU, band-wise
and whole, side by side in one run: prints the seconds of each and their ratio.

    python -m benchmarks.bands [--size 512] [--rows 32]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in px (latent = size / 8)")
    parser.add_argument("--rows", type=int, default=32, help="band_rows")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    from linfusion_cli.attention import apply_linfusion
    from linfusion_cli.bands.unet_forward import banded_forward
    from linfusion_cli.planning.memory.planner import load_family_configs

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_family_configs("sd15")[0]).eval()
    apply_linfusion(unet)
    n = args.size // 8
    sample = torch.randn(1, 4, n, n)
    context = torch.randn(1, 77, 768)
    t = torch.tensor(500)
    runs = {"whole": lambda: unet(sample, t, encoder_hidden_states=context).sample,
            "banded": lambda: banded_forward(unet, args.rows, False, sample, t, context).sample}
    seconds = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(args.repeat):  # alternate, so load changes hit both alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in seconds.items()}
    print(f"SD1.5 UNet step, {args.size}x{args.size} px, batch 1, band_rows {args.rows}, "
          f"{torch.get_num_threads()} threads: whole {best['whole']:.2f} s, banded "
          f"{best['banded']:.2f} s, ratio {best['banded'] / best['whole']:.3f}")


if __name__ == "__main__":
    main()
