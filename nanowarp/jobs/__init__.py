"""
The job machinery: what a WARP job asks of the disk and of other processes, apart from the
algorithm (nanowarp/warp.py and the modules it reads like). warp() sees one object, the `Job` of
nanowarp/jobs/job.py (`open_job`); behind it:

- folder.py: the job folder (--out_dir), its layout, crash-safe writes, the lock, resuming a run
  from its saved state, and the damaged files set aside;
- parallel.py: the runs of an iteration side by side, in worker processes (--workers) or torchrun ranks.

The checksums.sha256 every folder written ends with are the checkpoint format's (nanowarp/checksums.py,
which every load through nanowarp/hub.py verifies), not the job's: they sit below it, with the Hub.

Nothing is imported here: `from nanowarp.jobs.job import open_job` loads what it names.
"""
