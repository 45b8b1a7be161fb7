import json
import logging

import torch

from opsd_mm.cli import main
from opsd_mm.train.metrics import (
    MetricsWriter,
    read_metrics,
    repetition_rate,
    summarize_tokens,
    truncate_metrics,
)


def test_repetition_rate():
    assert repetition_rate([[1, 2, 3, 4, 5, 6]]) == 0.0
    looping = [1, 2, 3, 4] * 5
    assert repetition_rate([looping]) > 0.7
    assert repetition_rate([[1, 2]]) == 0.0 and repetition_rate([]) == 0.0


def test_summarize_tokens():
    s = summarize_tokens(torch.arange(101, dtype=torch.float32), "d")
    assert s["d_mean"] == 50 and s["d_max"] == 100 and abs(s["d_p99"] - 99) < 1e-4
    assert summarize_tokens(torch.zeros(0), "d") == {"d_mean": 0.0, "d_p99": 0.0, "d_max": 0.0}


def test_metrics_writer_flushes_each_line(tmp_path):
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write({"step": 1, "loss": float("nan")})
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1, "loss": None}]
    w.close()


# A metrics.jsonl as a crash, a full disk or a stray editor can leave it: rows 1-3 good, a
# garbled line in the middle, bytes that are not UTF-8, a JSON value that is not an object, an
# object without an integer step, a row past the resumed step, and a torn last line (kill -9).
GOOD = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3}]
GARBLED = [b'{"step": 2, "lo', b'{"step": \xff\xfe}', b"[1, 2]", b'{"step": "two"}']
TORN = b'{"step": 6, "loss": 0.'


def _damaged(path):
    lines = [json.dumps(GOOD[0]).encode(), GARBLED[0], json.dumps(GOOD[1]).encode()]
    lines += [GARBLED[1], GARBLED[2], json.dumps(GOOD[2]).encode(), GARBLED[3]]
    lines += [json.dumps({"step": 5, "loss": 0.1}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n" + TORN)
    return path


def test_read_metrics_skips_bad_lines_with_a_warning_each(tmp_path, caplog):
    path = _damaged(tmp_path / "metrics.jsonl")
    with caplog.at_level(logging.WARNING):
        rows = read_metrics(path)
    assert rows == [*GOOD, {"step": 5, "loss": 0.1}]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 5, warned
    for line_no, why in [
        (2, "not JSON"),
        (4, "not UTF-8"),
        (5, "not a JSON object"),
        (7, "no integer 'step'"),
        (9, "torn"),
    ]:
        assert any(f"{path}, line {line_no}: " in w and why in w for w in warned), (line_no, why)


def test_truncate_moves_garbled_lines_aside_never_drops_them(tmp_path, caplog):
    path = _damaged(tmp_path / "metrics.jsonl")
    with caplog.at_level(logging.WARNING):
        truncate_metrics(path, 4)
    assert read_metrics(path) == GOOD
    assert path.read_bytes().endswith(b"\n")
    side = tmp_path / "metrics.jsonl.garbled"
    assert side.read_bytes() == b"\n".join([*GARBLED, TORN]) + b"\n"
    assert f"moved 5 unreadable lines of {path} to {side}" in caplog.text
    # Again (a second resume): nothing more to move; the side file is kept as it was.
    caplog.clear()
    truncate_metrics(path, 4)
    assert side.read_bytes() == b"\n".join([*GARBLED, TORN]) + b"\n"
    assert "unreadable" not in caplog.text
    # A later garbled line is appended to the same side file.
    with path.open("ab") as fh:
        fh.write(b"\x00\x00\n")
    truncate_metrics(path, 4)
    assert side.read_bytes().endswith(TORN + b"\n\x00\x00\n")
    assert read_metrics(path) == GOOD


def test_plot_reads_torn_and_garbled_metrics(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    run.mkdir()
    _damaged(run / "metrics.jsonl")
    with caplog.at_level(logging.WARNING):
        assert main(["plot", str(run)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (run / "metrics.png").stat().st_size > 0
    assert "line 9: torn" in caplog.text
    # A file with nothing readable is an error naming it, not an empty plot.
    (run / "metrics.jsonl").write_bytes(b"\xff\n")
    assert main(["plot", str(run)]) == 2
    assert "no plottable metrics" in capsys.readouterr().err
