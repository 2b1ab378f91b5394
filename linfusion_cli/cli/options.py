"""Option declarations shared by generate, upscale and batch (declared once, reused)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Res = Annotated[Optional[int], typer.Option("--res", help="Long side of the final image in px (default 4096).")]
Aspect = Annotated[Optional[str], typer.Option("--aspect", help="Aspect W:H with --res (default: the preset's, 1:1).")]
Width = Annotated[Optional[int], typer.Option("--width", help="Final width in px (with --height).")]
Height = Annotated[Optional[int], typer.Option("--height", help="Final height in px (with --width).")]
Model = Annotated[Optional[str], typer.Option("--model", help="Hub id, local folder, .safetensors file, or demo.")]
Linfusion = Annotated[Optional[str], typer.Option("--linfusion", help="LinFusion weights: hub id or path (default: matched to the model).")]
NoLinfusion = Annotated[bool, typer.Option("--no-linfusion", help="Keep the UNet's own quadratic attention.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", help="Preset name or YAML file (default sd15).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Run seed 0 .. 4294967295 (-1: random); stage k uses seed + k (default: random).")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="Nominal steps per stage; img2img runs steps x strength.")]
Guidance = Annotated[Optional[float], typer.Option("--guidance", help="Classifier-free guidance scale.")]
Negative = Annotated[Optional[str], typer.Option("--negative", help="Negative prompt.")]
Strengths = Annotated[Optional[str], typer.Option("--strengths", help="img2img strengths per stage, e.g. 0.4,0.3,0.2,0.1.")]
Scheduler = Annotated[Optional[str], typer.Option("--scheduler", help="default, ddim, euler, euler_a, dpm++, pndm, lms.")]
Method = Annotated[Optional[str], typer.Option("--method", help="Upscale stages: sdedit (plain img2img) or demofusion (skip residual + dilated pass; default for sdxl presets).")]
MaxVram = Annotated[Optional[float], typer.Option("--max-vram", help="GPU memory budget in GiB (default: free memory).")]
VaeTile = Annotated[Optional[int], typer.Option("--vae-tile", help="VAE tile size in px; 0 = untiled (default: planned).")]
SaveStages = Annotated[bool, typer.Option("--save-stages", help="Also keep every intermediate stage image.")]
Output = Annotated[Optional[str], typer.Option("-o", "--output", help="File, directory, or - for stdout.")]
Format = Annotated[Optional[str], typer.Option("--format", help="png, jpg or tiff (default: from -o, else png).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object per image on stdout.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan and memory estimates; load nothing.")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cuda, cuda:N, mps or cpu.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="auto, fp16, bf16 or fp32.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading .ckpt pickle checkpoints (can run code).")]
ModelConfig = Annotated[Optional[str], typer.Option("--config", help="Local diffusers folder giving configs and tokenizer for a single-file --model (offline).")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or messages on stderr.")]
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="More detail; progress even when stderr is not a terminal.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="LoRA file or hub id, optionally :WEIGHT (default 1); repeatable.")]
ControlNetOpt = Annotated[Optional[str], typer.Option("--controlnet", help="ControlNet (hub id or diffusers folder) for every stage; with --control-image.")]
ControlImage = Annotated[Optional[str], typer.Option("--control-image", help="The ControlNet's control image (resized to each stage).")]
ControlScale = Annotated[Optional[float], typer.Option("--control-scale", help="ControlNet conditioning scale (default 1).")]
TileControlNet = Annotated[Optional[str], typer.Option("--tile-controlnet", help="Tile ControlNet for img2img stages (control image: the stage's own input).")]
TileScale = Annotated[Optional[float], typer.Option("--tile-scale", help="Tile ControlNet conditioning scale (default 1).")]
IpAdapter = Annotated[Optional[str], typer.Option("--ip-adapter", help="IP-Adapter .safetensors (h94 layout) or hub id; with --ip-image.")]
IpImage = Annotated[Optional[str], typer.Option("--ip-image", help="The IP-Adapter's reference image.")]
IpScale = Annotated[Optional[float], typer.Option("--ip-scale", help="IP-Adapter scale (default 1).")]
IpEncoder = Annotated[Optional[str], typer.Option("--ip-encoder", help="CLIP image encoder folder (default: image_encoder/ beside the adapter).")]
Template = Annotated[Optional[str], typer.Option("--name", help="File name template: {index} {seed} {slug} {width} {height} {ext}.")]


def parse_strengths(text: str | None) -> tuple[float, ...] | None:
    """'0.4,0.3' -> (0.4, 0.3); each in (0, 1], no empty item."""
    from ..validate import strengths_text

    return None if text is None else strengths_text(text)
