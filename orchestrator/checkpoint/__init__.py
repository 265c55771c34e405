"""The one owner of the on-disk checkpoint format (see docs/checkpoints.md).

layout.py        names, finding, listing, partial clean-up, retention, the saved config
manifest.py      the manifest (sizes, SHA-256, step) written last, and verification
files.py         writing a state file while hashing it; loading without running pickled code
rng.py           every RNG stream of a process, as weights-only-loadable plain types
resume.py        which checkpoint a run resumes from, and whether this run can resume it
checkpointer.py  saving (sync / async, every strategy) and loading the training state
remote.py        copies in an object store (checkpoint.remote_dir): upload, retention, download
consolidate.py   one full model state dict from any strategy's checkpoint
"""
