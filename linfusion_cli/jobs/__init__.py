"""Images to make and the files they write, checked before any model loads: one image's output
(job.py), a batch file's entries (entries.py), which process makes which entry (claims.py), the
request as a launcher's processes run it (processes.py), how those ranks agree on what they make and
how it went (agreement.py), and what api.run_batch reports as it goes (report.py). The CLI and api
callers share them."""
