"""Data parallelism under torchrun: the process group from the launch's environment, and the
collectives that make W ranks train as one process on the concatenated batch (docs/distributed.md)."""

from horizon.distributed.config import DistributedConfig
from horizon.distributed.data_parallel import DataParallel, PeerFailure, ShardedDataParallel
from horizon.distributed.sharded_store import ShardedHostStore
from horizon.distributed.world import World, init_world, launch_from_env

__all__ = ["DistributedConfig", "DataParallel", "ShardedDataParallel", "ShardedHostStore", "PeerFailure", "World", "init_world", "launch_from_env"]
