"""TFRecord framing: the one place that writes and reads it (no TensorFlow).

TensorBoard event files are sequences of records, each framed as::

    u64 length (little-endian) | u32 masked CRC-32C of the 8 length bytes | data | u32 masked CRC-32C of data

The TensorBoard sink writes records with :func:`write_record`; the readers and the
tools stream them back with :func:`iter_records`.  The checksum is google-crc32c's
C code: TensorBoard's own writer computes it in pure Python (milliseconds per window).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

logger = logging.getLogger("gradwatch")

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
HEADER_BYTES = _LENGTH.size + _CRC.size  # 12: the length and its checksum
FOOTER_BYTES = _CRC.size  # 4: the checksum of the data
_MASK_DELTA = 0xA282EAD8


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``."""
    return google_crc32c.value(data)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that TFRecord files store (rotated right by 15 bits, plus a constant)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """``data`` framed as one record (header, data, footer)."""
    length = _LENGTH.pack(len(data))
    return b"".join((length, _CRC.pack(masked_crc32c(length)), data, _CRC.pack(masked_crc32c(data))))


def write_record(file: BinaryIO, data: bytes) -> None:
    """Appends ``data`` to ``file`` as one record, in a single write."""
    file.write(frame_record(data))


def iter_records(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """The records of one TFRecord file, streamed.

    Reading stops quietly at a torn tail (a writer killed mid-record, or a length
    beyond the end of the file: logged at INFO) and with a warning at a length header
    whose checksum does not match (the rest of the file cannot be framed).  A record
    whose data does not match its checksum is skipped with a warning: its framing
    holds, so reading goes on with the next one.
    """
    with open(path, "rb", buffering=1 << 20) as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            offset = f.tell()
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES:
                if header:
                    logger.info("gradwatch: %s ends in a torn record at byte %d (ignored).", path, offset)
                return
            length_bytes = header[: _LENGTH.size]
            if masked_crc32c(length_bytes) != _CRC.unpack(header[_LENGTH.size :])[0]:
                logger.warning(
                    "gradwatch: %s has a corrupt record header at byte %d; the rest of the file is skipped.",
                    path, offset,
                )
                return
            (length,) = _LENGTH.unpack(length_bytes)
            # bounded by what the file holds (a live file may have grown): a length past its
            # end is never allocated
            if length + FOOTER_BYTES > size - offset - HEADER_BYTES:
                size = os.fstat(f.fileno()).st_size
            if length + FOOTER_BYTES > size - offset - HEADER_BYTES:
                logger.info("gradwatch: %s ends in a torn record at byte %d (ignored).", path, offset)
                return
            data = f.read(length + FOOTER_BYTES)
            if len(data) < length + FOOTER_BYTES:
                logger.info("gradwatch: %s ends in a torn record at byte %d (ignored).", path, offset)
                return
            if masked_crc32c(data[:length]) != _CRC.unpack(data[length:])[0]:
                logger.warning("gradwatch: %s has a corrupt record at byte %d (its data does not match its "
                               "checksum); the record is skipped.", path, offset)
                continue
            yield data[:length]
