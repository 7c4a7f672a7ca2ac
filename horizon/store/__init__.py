from horizon.store.capacity import HostMemoryError, format_bytes
from horizon.store.host_store import HostStore, Role, store_bytes_by_role
from horizon.store.layout import plan_layouts

__all__ = ["HostStore", "Role", "store_bytes_by_role", "plan_layouts", "HostMemoryError", "format_bytes"]
