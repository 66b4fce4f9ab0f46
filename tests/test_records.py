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


def _flip(path, position):
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["data", "data checksum"])
def test_a_record_whose_data_does_not_match_its_checksum_is_skipped_with_a_warning(tmp_path, caplog, where):
    path = write_file(tmp_path / "r.tfrecord", RECORDS)
    fourth = sum(len(r) + HEADER_BYTES + FOOTER_BYTES for r in RECORDS[:3])
    data = fourth + HEADER_BYTES
    _flip(path, data + 100 if where == "data" else data + len(RECORDS[3]) + 2)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        assert list(iter_records(path)) == RECORDS[:3] + RECORDS[4:]  # reading goes on after it
    assert [r.getMessage() for r in caplog.records] == [
        f"gradwatch: {path} has a corrupt record at byte {fourth} (its data does not match its checksum); "
        "the record is skipped."]


def test_every_one_byte_flip_is_caught(tmp_path, caplog):
    # a flip anywhere leaves the records read unchanged, or drops them: never a changed record
    path = write_file(tmp_path / "r.tfrecord", RECORDS[1:3] + [b"window 1.2345e-3"] + RECORDS[4:])
    original = list(iter_records(path))
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pristine = f.read()
    for position in range(size):
        _flip(path, position)
        read = list(iter_records(path))
        assert all(record in original for record in read), position
        assert len(read) < len(original), position
        with open(path, "wb") as f:
            f.write(pristine)


def test_a_crafted_length_past_the_end_of_the_file_is_not_allocated(tmp_path, caplog):
    path = write_file(tmp_path / "r.tfrecord", RECORDS[:2])
    length = (1 << 62).to_bytes(8, "little")  # with a valid checksum: only the file's size bounds it
    with open(path, "ab") as f:
        f.write(length + masked_crc32c(length).to_bytes(4, "little") + b"tail of a lie")
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        assert list(iter_records(path)) == RECORDS[:2]
    end = sum(len(r) + HEADER_BYTES + FOOTER_BYTES for r in RECORDS[:2])
    assert [r.getMessage() for r in caplog.records] == [
        f"gradwatch: {path} ends in a torn record at byte {end} (ignored)."]
