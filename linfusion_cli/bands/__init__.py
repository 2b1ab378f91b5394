"""Band-wise execution: every UNet (and VAE latent-resolution) layer run one band of rows at a
time, exactly, so memory holds a layer's input and output plus one band (the band_rows knob)."""
