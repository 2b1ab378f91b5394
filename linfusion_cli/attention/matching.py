"""Which official LinFusion weights go with a base model: known hub ids, else the UNet's shape."""

from __future__ import annotations

from ..errors import CheckpointMismatchError

KNOWN_BASES = {
    "runwayml/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "Lykon/dreamshaper-8": "Yuanshi/LinFusion-1-5",
    "SG161222/Realistic_Vision_V4.0_noVAE": "Yuanshi/LinFusion-1-5",
    "stabilityai/stable-diffusion-2-1": "Yuanshi/LinFusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0": "Yuanshi/LinFusion-XL",
}

FAMILY_REPOS = {"sd15": "Yuanshi/LinFusion-1-5", "sd21": "Yuanshi/LinFusion-2-1",
                "sdxl": "Yuanshi/LinFusion-XL"}

# The real architectures: (block_out_channels, cross_attention_dim) -> LinFusion repo.
_ARCHITECTURES = {
    ((320, 640, 1280, 1280), 768): "Yuanshi/LinFusion-1-5",
    ((320, 640, 1280, 1280), 1024): "Yuanshi/LinFusion-2-1",
    ((320, 640, 1280), 2048): "Yuanshi/LinFusion-XL",
}


def linfusion_repo_for(model_id: str | None, unet_config) -> str | None:
    """The LinFusion repo for a base model id, else for its UNet architecture, else None."""
    if model_id in KNOWN_BASES:
        return KNOWN_BASES[model_id]
    key = (tuple(unet_config["block_out_channels"]), unet_config["cross_attention_dim"])
    return _ARCHITECTURES.get(key)


def require_linfusion_repo(model_id: str | None, unet_config) -> str:
    """Like linfusion_repo_for, but a clear error telling the user to pass the weights."""
    repo = linfusion_repo_for(model_id, unet_config)
    if repo is None:
        raise CheckpointMismatchError(
            f"no official LinFusion weights are known for {model_id or 'this model'} "
            f"(UNet channels {tuple(unet_config['block_out_channels'])}, cross-attention dim "
            f"{unet_config['cross_attention_dim']}); pass --linfusion PATH|REPO or --no-linfusion")
    return repo
