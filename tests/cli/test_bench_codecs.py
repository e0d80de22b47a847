"""The benchmark reports sizes and times for every codec."""

import pytest

from protos import CODECS
from splitglm.bench.codecs import bench_codecs, hidden_like


def test_bench_codecs_small():
    rows = bench_codecs(shape=(8, 576), repeats=1)
    assert [r["codec"] for r in rows] == list(CODECS)
    by = {r["codec"]: r for r in rows}
    assert by["fp32"]["relative_mse"] == 0
    assert 4 < by["fp32"]["bytes_per_element"] < 4.1  # frame overhead is small
    assert by["int8+outliers"]["bytes_per_element"] < 1.05
    for r in rows:
        assert r["encode_ms"] > 0 and r["decode_ms"] > 0


@pytest.mark.parametrize("width", [576, 4096])
def test_int8_outliers_size_target(width):
    # the brief's budget: <= 1.05 bytes/element with all metadata, on both widths
    from protos import encode
    from protos.frames import frame_to_bytes, make_frame
    x = hidden_like((64, width))
    frame = make_frame("0" * 32, 1, 0, None)
    frame.hidden.CopyFrom(encode(x, "int8+outliers"))
    assert len(frame_to_bytes(frame)) / x.numel() <= 1.05
