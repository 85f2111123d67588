"""The frame codec between the training process and the writer process.

A frame is a header, the buffer lengths, a pickle (protocol 5) and its out-of-band buffers:
numpy arrays travel without being copied into one big bytes object.
"""

from __future__ import annotations

import pickle
import struct
from typing import IO, Any

__all__ = ["encode", "receive", "write_frame"]

_HEADER = struct.Struct("!QI")  # pickle length, number of out-of-band buffers
_LENGTH = struct.Struct("!Q")

Frame = list  # [header, pickle, *buffers]: bytes-like parts written in order


def encode(obj: Any) -> Frame:
    """One frame: header, buffer lengths, the pickle, then each buffer (numpy data, not copied)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEADER.pack(len(data), len(raws)) + b"".join(_LENGTH.pack(r.nbytes) for r in raws)
    return [head, data, *raws]


def frame_size(frame: Frame) -> int:
    return sum(memoryview(part).nbytes for part in frame)


def receive(stream: IO[bytes]) -> Any:
    """Read one frame from `stream`; None at a clean end of file."""
    head = _read_exact(stream, _HEADER.size, eof_ok=True)
    if head is None:
        return None
    size, count = _HEADER.unpack(head)
    lengths = [_LENGTH.unpack(_read_exact(stream, _LENGTH.size))[0] for _ in range(count)]
    data = _read_exact(stream, size)
    buffers = [_read_exact(stream, n) for n in lengths]
    return pickle.loads(data, buffers=buffers)


def write_frame(stream: IO[bytes], frame: Frame) -> bool:
    """Write and flush one frame; False when the pipe is broken (the reader side notices)."""
    try:
        for part in frame:
            stream.write(part)
        stream.flush()
    except (OSError, ValueError):  # a broken pipe, or closed after a kill
        return False
    return True


def _read_exact(stream: IO[bytes], size: int, eof_ok: bool = False) -> bytearray | None:
    out = bytearray(size)
    view = memoryview(out)
    got = 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            if eof_ok and got == 0:
                return None
            raise EOFError(f"frame cut short after {got} of {size} bytes")
        got += n
    return out
