"""TFRecord framing (``gradwatch._io.records``): checksums against TensorBoard's, a round trip, a
torn tail, a corrupt header, and the sink's event files read by TensorBoard's own loader."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from gradwatch._io.records import (
    FOOTER_BYTES,
    HEADER_BYTES,
    crc32c,
    frame_record,
    iter_records,
    masked_crc32c,
    write_record,
)

pytestmark = pytest.mark.fast

RECORDS = [b"", b"a", b"\x00" * 7, bytes(range(256)) * 40, b"last record"]


def write_file(path, records):
    with open(path, "wb") as f:
        for record in records:
            write_record(f, record)
    return str(path)


def test_crc32c_matches_tensorboards_reference():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 16384, 70001):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == reference(data), size
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_round_trip_and_framing(tmp_path):
    path = write_file(tmp_path / "r.tfrecord", RECORDS)
    assert list(iter_records(path)) == RECORDS
    assert os.path.getsize(path) == sum(len(r) + HEADER_BYTES + FOOTER_BYTES for r in RECORDS)
    framed = frame_record(b"abc")
    assert framed[:8] == (3).to_bytes(8, "little")
    assert int.from_bytes(framed[8:12], "little") == masked_crc32c(framed[:8])
    assert framed[12:15] == b"abc" and int.from_bytes(framed[15:], "little") == masked_crc32c(b"abc")


def test_tensorboards_reader_reads_what_write_record_writes(tmp_path):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New

    path = write_file(tmp_path / "r.tfrecord", RECORDS)
    reader = PyRecordReader_New(path)
    read = []
    while True:
        try:
            reader.GetNext()
        except Exception:  # tensorboard's stub raises errors.OutOfRangeError at the end
            break
        read.append(reader.record())
    assert read == RECORDS


@pytest.mark.parametrize("cut", [1, FOOTER_BYTES, FOOTER_BYTES + 5, "in header"])
def test_a_truncated_last_record_is_ignored(tmp_path, cut, caplog):
    path = write_file(tmp_path / "r.tfrecord", RECORDS)
    size = os.path.getsize(path)
    last = size - len(RECORDS[-1]) - HEADER_BYTES - FOOTER_BYTES
    with open(path, "r+b") as f:  # a writer killed mid-record
        f.truncate(last + 5 if cut == "in header" else size - cut)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        assert list(iter_records(path)) == RECORDS[:-1]
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert f"ends in a torn record at byte {last}" in caplog.records[0].getMessage()


def test_a_corrupt_length_checksum_stops_reading_with_a_warning(tmp_path, caplog):
    path = write_file(tmp_path / "r.tfrecord", RECORDS)
    second = len(RECORDS[0]) + HEADER_BYTES + FOOTER_BYTES
    with open(path, "r+b") as f:
        f.seek(second + 9)  # a byte of the second record's length checksum
        byte = f.read(1)
        f.seek(second + 9)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        assert list(iter_records(path)) == RECORDS[:1]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert f"corrupt record header at byte {second}" in record.getMessage()


def test_the_sinks_event_file_is_read_by_tensorboards_loader(tmp_path):
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto import event_pb2

    from gradwatch._io import tb_format
    from gradwatch._io.readers import event_files
    from gradwatch._sinks.tb_sink import TensorBoardSink

    sink = TensorBoardSink(str(tmp_path), {"layers": []}, [])
    sink.write_window({"step": 3, "loss": 0.5}, [], [], [], 1)
    sink.close()
    (path,) = event_files(str(tmp_path))
    events = list(event_file_loader.RawEventFileLoader(path).Load())
    assert events == list(iter_records(path))
    parsed = [event_pb2.Event.FromString(e) for e in events]
    assert [e.step for e in parsed] == [0, 0, 3]  # file version; run info and layout; the window
    (window,) = [v for v in parsed[-1].summary.value if v.tag == tb_format.WINDOW_TAG]
    assert tb_format.decode_window(window.tensor.string_val[0])["window"]["loss"] == 0.5
