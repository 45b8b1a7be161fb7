import torch

from opsd_mm.train.metrics import MetricsWriter, read_metrics, repetition_rate, summarize_tokens


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
