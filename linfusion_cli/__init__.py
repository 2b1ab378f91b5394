"""linfusion_cli: very large Stable Diffusion images with LinFusion linear attention.

Importing the library never imports the CLI (typer/rich).
"""

__version__ = "0.3.0.dev0"
