"""Images to make and the files they write, checked before any model loads: one image's output
(job.py), a batch file's entries (entries.py), which process makes which entry (claims.py) and the
request as a launcher's processes run it (processes.py). The CLI and api callers share them."""
