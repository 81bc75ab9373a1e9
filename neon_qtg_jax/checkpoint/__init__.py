"""Checkpoints below training and inference: Orbax save/restore, backup storage, the uploader, the resume plan.

Modules (each imports only the ones above it in this list, config and parallel):
  errors        the errors launch.py reports (no JAX import) and the free-space check
  storage       backup locations (s3://, gs://, a directory): copy with checksums, verify, fetch
  checkpointer  the Orbax CheckpointManager of a run, restore checks, params-only reads
  uploader      the background thread that mirrors finalized steps to the backup
  resume        where a run starts: one ResumePlan (local steps, backup steps, or fresh) and its execution
"""
