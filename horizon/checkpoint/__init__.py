"""Lazy asynchronous checkpoints: per-unit copy-on-write snapshot, bounded staging, checksummed
safetensors shards, atomic durable commit, retention, validated resume (docs/checkpoint.md)."""

from horizon.checkpoint.config import CheckpointConfig
from horizon.checkpoint.disk import PROTOCOL_POINTS, Disk
from horizon.checkpoint.load import NoValidCheckpoint, find_valid, verify
from horizon.checkpoint.manager import CheckpointError, Checkpointer
from horizon.checkpoint.manifest import CorruptCheckpoint, read_manifest

__all__ = ["CheckpointConfig", "Checkpointer", "CheckpointError", "Disk", "PROTOCOL_POINTS", "NoValidCheckpoint",
           "CorruptCheckpoint", "find_valid", "verify", "read_manifest"]
