"""What the UNet's forward uses while it runs, below bands, adapters and pipeline: the one door for
host<->device copies (transfer.py), pinned buffers and copies staged on side streams (staging.py),
where parked skips live (skip_parking.py), batch rows and the CFG split (batching.py), and the
record of the memory knobs in effect (applied.py)."""
