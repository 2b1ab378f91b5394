"""Helpers the UNet's forward code shares at run time (below bands, adapters and pipeline)."""
