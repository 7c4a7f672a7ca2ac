from horizon.estimate.device_peak import DevicePeak, replay_device_peak
from horizon.estimate.footprint import MemoryEstimate, estimate_memory

__all__ = ["MemoryEstimate", "estimate_memory", "DevicePeak", "replay_device_peak"]
