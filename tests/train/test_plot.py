"""``opsd-mm plot``: the PNG is looked at as an image (size, not blank), on fabricated runs."""

import json

import pytest

from opsd_mm.cli import main


def _run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(scale, skip_step=None, evals=False):
    rows = []
    for step in range(1, 13):
        row = {
            "step": step,
            "loss": None if step == skip_step else scale / step,
            "divergence_mean": scale / step,
            "divergence_p99": 3 * scale / step,
            "student_entropy": 2.0 + 0.01 * step,
            "teacher_entropy": 1.5,
            "completion_len_mean": 20 + step,
            "completion_len_max": 30 + step,
            "clip_fraction": 0.1 * (step % 3),
        }
        if evals and step % 4 == 0:
            row["eval/accuracy"] = 0.05 * step
        rows.append(row)
    return rows


def test_plot_two_runs_writes_a_non_blank_png(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    a = _run(tmp_path / "run_a", _rows(1.0, skip_step=5, evals=True))
    b = _run(
        tmp_path / "run_b",
        [{k: v for k, v in r.items() if k != "clip_fraction"} for r in _rows(0.5)],
    )
    out = tmp_path / "out" / "curves.png"
    assert main(["plot", str(a), str(b), "--output", str(out)]) == 0
    img = PIL.open(out).convert("RGB")
    # Six panels (loss, divergence, entropy, length, clip, eval): 3 columns x 2 rows of
    # 4.2 x 3.0 inches at 100 dpi.
    assert img.size == (1260, 600)
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # lines, text, two run colours - not a blank canvas
    pixels = list(img.getdata())
    white = sum(p == (255, 255, 255) for p in pixels)
    assert 0.3 < white / len(pixels) < 0.99
    blue = sum(1 for r, g, b in pixels if b > 150 and r < 80)  # tab:blue (run_a)
    orange = sum(1 for r, g, b in pixels if r > 200 and 100 < g < 160 and b < 60)  # tab:orange
    assert blue > 100 and orange > 100


def test_plot_default_output_and_errors(tmp_path, capsys):
    run = _run(tmp_path / "run", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None}])
    assert main(["plot", str(run)]) == 0
    assert (run / "metrics.png").stat().st_size > 0
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
