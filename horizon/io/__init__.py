"""O_DIRECT file I/O for the SSD tier: aligned buffers, direct files, batched reads and writes."""

from horizon.io.direct import (ALIGN_BYTES, DirectFile, DirectIO, IOFuture, IORequest, aligned_empty,
                               native_io_available)

__all__ = ["ALIGN_BYTES", "DirectFile", "DirectIO", "IOFuture", "IORequest", "aligned_empty", "native_io_available"]
