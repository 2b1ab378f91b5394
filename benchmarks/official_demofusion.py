"""One `--method demofusion` stage against the official LinFusion SD-XL super-resolution pipeline.

Needs a checkout of github.com/Huage001/LinFusion (its code is imported from there, not copied).
Both run the same tiny SD-XL demo model with fresh LinFusion layers, Euler, fp32, VAE untiled,
the same seed, the shipped sdxl preset's guidance and DemoFusion settings; prints the largest
latent and pixel differences. From the repo root:
    python -m benchmarks.official_demofusion --official PATH/TO/LinFusion [--size 256]
"""

from __future__ import annotations

import argparse
import importlib.machinery
import sys
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def official_pipeline_class(root: Path):
    """StableDiffusionXLSuperResPipeline from the checkout (matplotlib stubbed when absent: it
    only draws previews there)."""
    try:
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        mpl = types.ModuleType("matplotlib")
        mpl.pyplot = types.ModuleType("matplotlib.pyplot")
        mpl.__spec__ = importlib.machinery.ModuleSpec("matplotlib", None)
        mpl.pyplot.__spec__ = importlib.machinery.ModuleSpec("matplotlib.pyplot", None)
        sys.modules.update({"matplotlib": mpl, "matplotlib.pyplot": mpl.pyplot})
    sys.path.insert(0, str(root / "src" / "pipelines"))
    from pipeline_superres_sdxl import StableDiffusionXLSuperResPipeline

    return StableDiffusionXLSuperResPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="LinFusion checkout")
    ap.add_argument("--size", type=int, default=256, help="input side; the stage doubles it")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--strength", type=float, default=0.32)
    args = ap.parse_args()
    Official = official_pipeline_class(args.official)

    from diffusers.utils.torch_utils import randn_tensor

    from linfusion_cli import api
    from linfusion_cli.models.loading import load_model
    from linfusion_cli.pipeline import demofusion_stage, run_plan

    low = (np.random.default_rng(0).random((args.size, args.size, 3)) * 255).astype("uint8")
    out = 2 * args.size
    req = api.Request(prompt="a red fox", preset="sdxl", model="demo-sdxl", width=out, height=out,
                      steps=args.steps, strengths=(args.strength,), scheduler="euler",
                         seed=1, vae_tile=0, dtype="fp32", device="cpu", method="demofusion",
                         init_image="x.png", init_size=(args.size, args.size))
    plan = api.plan_request(req)
    stage, settings = plan.stages[0], plan.stages[0].demofusion
    model = load_model("demo-sdxl", dtype="fp32", device="cpu", linfusion="fresh", scheduler="euler",
                       channels_last=False)
    kept = {}
    decode = demofusion_stage._decode

    def keep(ctx, st, latents):
        kept["ours"] = latents.clone()
        return decode(ctx, st, latents)

    demofusion_stage._decode = keep
    ours, _ = run_plan(plan, model, init_image=low)

    p = model.pipe
    official = Official(vae=p.vae, text_encoder=p.text_encoder, text_encoder_2=p.text_encoder_2,
                        tokenizer=p.tokenizer, tokenizer_2=p.tokenizer_2, unet=p.unet,
                        scheduler=p.scheduler)
    official.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(stage.seed)
    # The official pipeline draws its noise with torch.randn_like (the global RNG); ours from the
    # stage generator between the VAE sample and the steps. Route that one draw through `g`.
    torch.randn_like = lambda x, **kw: randn_tensor(x.shape, generator=g, device=x.device, dtype=x.dtype)
    vae_decode = p.vae.decode

    def seen(z, *a, **k):
        kept["official"] = z * p.vae.config.scaling_factor
        return vae_decode(z, *a, **k)

    p.vae.decode = seen
    with torch.inference_mode():
        image = official(image=Image.fromarray(low), prompt="a red fox", height=out, width=out,
                         num_inference_steps=args.steps, guidance_scale=stage.guidance, generator=g,
                         cosine_scale_1=settings.cosine_scale_1, cosine_scale_2=settings.cosine_scale_2,
                         cosine_scale_3=settings.cosine_scale_3, gaussian_sigma=settings.gaussian_sigma,
                         upscale_strength=args.strength, output_type="np", device="cpu").images[0]
    theirs = np.round(image * 255).astype(np.int16)
    d_lat = (kept["ours"] - kept["official"]).abs().max().item()
    d_img = np.abs(ours.astype(np.int16) - theirs)
    print(f"{args.size}->{out} (dilation x{settings.dilation}, {stage.denoise_steps} steps): latents max "
          f"|diff| {d_lat:.2e} (max |latent| {kept['official'].abs().max().item():.2f}); pixels max "
          f"|diff| {d_img.max()}/255, mean {d_img.mean():.4f}")


if __name__ == "__main__":
    main()
