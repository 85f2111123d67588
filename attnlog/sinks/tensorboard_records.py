"""Quick framing for the records of attnlog's own TensorBoard event file.

TensorBoard frames each record with two masked CRC-32C checksums that it computes in pure Python
(the `tensorflow_stub`: about 100 ns a byte). One event's images with the defaults are about
420 KiB: 45 ms of CPU an event on TensorBoard's writer thread, holding the GIL that training
needs too. With `google-crc32c` (a C library, installed with `attnlog[tensorboard]`) the same
checksums take well under a millisecond. The bytes written are the same; a writer built
differently, or no `google-crc32c`, keeps TensorBoard's own.
"""

from __future__ import annotations

import struct
import types
from typing import Any

__all__ = ["masked_crc32c", "quicken"]

_MASK_DELTA = 0xA282EAD8  # TensorFlow's record format


def quicken(writer: Any) -> bool:
    """Give a torch `SummaryWriter`'s record writer the C checksum; True when it has it."""
    try:
        import google_crc32c
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return False
    if google_crc32c.implementation != "c":
        return False
    records = writer
    for name in ("file_writer", "event_writer", "_async_writer", "_writer"):  # torch, tensorboard
        records = getattr(records, name, None)
    if type(records) is not RecordWriter:
        return False
    records.write = types.MethodType(_write, records)
    return True


def masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC-32C of `data` (`tensorflow_stub.pywrap_tensorflow`'s), in C."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _write(self: Any, data: bytes) -> None:
    """`RecordWriter.write`: length, its checksum, the data, its checksum."""
    header = struct.pack("<Q", len(data))
    self._writer.write(
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )
