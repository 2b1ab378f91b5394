"""Host RAM a stage needs beside the GPU: what the memory plan parks there, and the images.

* skips_on_cpu: one UNet forward's skips (one CFG half under cfg_split), and as many again for
  a ControlNet's parked residuals;
* offload "model"/"sequential": every model's weights live on the host between uses;
* the stage's images as uint8 RGB: the previous stage's, its resized copy and the new one.
Compared with the machine's free RAM when the plan is made (memory/fit.add_memory_plans), so a
run never starts that would be killed for host memory after the model has loaded.
"""

from __future__ import annotations



def skip_elements(unet_config: dict, latent_h: int, latent_w: int) -> int:
    """Values per batch item of a UNet forward's skips: conv_in's output, every down resnet's
    (or transformer's), every downsampler's."""
    channels = list(unet_config["block_out_channels"])
    per_level = unet_config.get("layers_per_block", 2)
    h, w = latent_h, latent_w
    total = channels[0] * h * w
    for i, c in enumerate(channels):
        total += per_level * c * h * w
        if i < len(channels) - 1:
            h, w = -(-h // 2), -(-w // 2)
            total += c * h * w
    return total


def host_bytes(unet_config: dict, *, width: int, height: int, dtype_bytes: int, guidance: bool,
               knobs, weights: dict[str, int], controlnets: int = 0,
               latent_rows: int | None = None) -> dict[str, int]:
    """Host bytes of one stage by kind (skips, weights, images) and their `total`; latent_rows:
    the rows whose skips one process parks (a rank's band under band parallelism; all of them)."""
    lh, lw = -(-height // 8) if latent_rows is None else latent_rows, -(-width // 8)
    rows = 1 if knobs.cfg_split or not guidance else 2  # batch rows of one UNet forward
    parked = skip_elements(unet_config, lh, lw)
    out = {"parked skips": parked * rows * dtype_bytes * (1 + controlnets) if knobs.skips_on_cpu else 0,
           "offloaded weights": sum(weights.values()) if knobs.offload != "none" else 0,
           "images (uint8)": 3 * 3 * width * height}
    out["total"] = sum(out.values())
    return out
