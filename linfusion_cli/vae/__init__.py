"""Seam-free tiled VAE: decode/encode whose tiles share the whole image's GroupNorm statistics."""

from .pixels import to_uint8
from .tiled import DECODER_CONTEXT, ENCODER_CONTEXT, MODES, TileReport, decode, encode
from .tiles import Span, Tile, choose_tile_px, split_axis, tile_grid

__all__ = ["decode", "encode", "choose_tile_px", "to_uint8", "tile_grid", "split_axis", "Tile",
           "Span", "MODES", "TileReport", "DECODER_CONTEXT", "ENCODER_CONTEXT"]
