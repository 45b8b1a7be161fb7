"""Train/eval contamination: a planted duplicate (question re-spaced and re-cased, image
re-encoded as JPEG) is found with the ids on both sides; a near miss (same template, other
numbers, another picture) is not; ``opsd-mm data check`` reports them and
``data.exclude_contaminated=true`` drops them at load, counted."""

import io
import json

import datasets
import pytest
from PIL import Image

from opsd_mm.cli import main
from opsd_mm.data.contamination import ContaminationIndex, ReferenceItem, dhash, is_flat, tokens
from tests.fixtures.benchmarks import _mathvision, write_fixtures
from tests.fixtures.schemas import draw_image, jpeg_bytes

BENCH_Q = (
    "<image1>\nA rectangle has width 7 and height 9. The figure shows it cut along a diagonal. "
    "What is the area of one triangle?"
)
DUP_Q = (
    "<image>A   RECTANGLE has width 7 and height 9.\nThe figure shows it cut along a diagonal."
    "  what is the AREA of one triangle?\n(A) 31.5\n(B) 63"
)
NEAR_Q = (
    "<image>A rectangle has width 5 and height 11. The figure shows it cut along a diagonal. "
    "What is the area of one triangle?"
)


def test_normalisation_and_hash_invariances():
    assert tokens("<image 1> What  IS\n$2x+3=7$?") == ["what", "is", "2x", "+", "3", "=", "7"]
    img = draw_image(900)
    again = Image.open(io.BytesIO(jpeg_bytes(img)))
    index = ContaminationIndex([ReferenceItem("b", "1", BENCH_Q, (img,))])
    assert index.image_matches([again]) and not index.image_matches([draw_image(901)])
    assert is_flat(dhash(Image.new("RGB", (40, 40), "white")))


def test_planted_duplicate_found_and_near_miss_not():
    index = ContaminationIndex(
        [
            ReferenceItem("mathvision", "mv-7", BENCH_Q, (draw_image(900),)),
            ReferenceItem("math500", "test/algebra/2.json", "Solve $2x + 3 = 7$ for $x$."),
        ]
    )
    dup = index.matches("dup", DUP_Q, [jpeg_bytes(draw_image(900))])
    assert [(m.benchmark, m.item_id, m.kind) for m in dup] == [
        ("mathvision", "mv-7", "text"),
        ("mathvision", "mv-7", "image"),
    ]
    assert dup[0].score == 1.0 and dup[1].score <= 10
    embedded = index.matches("short", "Hint: answer exactly. SOLVE $2x+3=7$ for $x$.", [])
    assert [m.item_id for m in embedded] == ["test/algebra/2.json"]
    assert index.matches("near", NEAR_Q, [draw_image(901)]) == []
    assert index.matches("other", "Solve $2x + 3 = 9$ for $x$.", []) == []


def _bench_dir(root):
    """Benchmark copies as ``opsd-mm eval --data-dir`` reads them, MathVision holding mv-7."""
    write_fixtures(root, ["math500", "mathvista"])
    feats, rows = _mathvision()
    rows = rows + [{**rows[0], "id": "7", "question": BENCH_Q, "decoded_image": draw_image(900)}]
    datasets.Dataset.from_list(rows, features=feats).save_to_disk(str(root / "mathvision"))
    return root


def _train_copy(root):
    """A ViRL39K-schema training file: a planted duplicate, a near miss, clean rows."""
    (root / "images").mkdir(parents=True)
    (root / "images" / "dup.jpg").write_bytes(jpeg_bytes(draw_image(900)))
    rows = [("dup", DUP_Q, "dup.jpg"), ("near", NEAR_Q, "near.png")]
    rows += [
        (f"clean-{i}", f"<image>How many dots are drawn in panel {i}?", f"c{i}.png")
        for i in range(3)
    ]
    for i, (_, _, name) in enumerate(rows[1:]):
        draw_image(901 + i).save(root / "images" / name)
    path = root / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"qid": q, "question": text, "answer": "\\boxed{1}", "image": [f"images/{n}"]}
            )
            + "\n"
            for q, text, n in rows
        )
    )
    return path


@pytest.fixture
def copies(tmp_path):
    return _train_copy(tmp_path / "train"), _bench_dir(tmp_path / "bench")


def test_data_check_cli_reports_ids_on_both_sides(copies, tmp_path, capsys):
    train, bench = copies
    out = tmp_path / "matches.jsonl"
    argv = ["data", "check", "configs/tiny_vl.yaml", "data.preset=virl39k", f"data.source={train}"]
    argv += ["--against", "mathvision,mathvista,math500", "--data-dir", str(bench)]
    assert main([*argv, "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "contaminated rows: 1 (text matches 1, image matches 1)" in text
    assert "dup -> text matches mathvision item 7" in text and "near" not in text.split("rows:")[-1]
    found = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(m["train_id"], m["benchmark"], m["item_id"], m["kind"]) for m in found} == {
        ("dup", "mathvision", "7", "text"),
        ("dup", "mathvision", "7", "image"),
    }


def test_exclude_contaminated_drops_at_load_counted(copies, tiny_cache):
    from opsd_mm.cli import data_wiring
    from opsd_mm.config import load_config
    from opsd_mm.data.cli import load_training_data
    from opsd_mm.data.presets import resolve_data

    train, bench = copies
    cfg = resolve_data(
        load_config(
            "configs/tiny_vl.yaml",
            [
                "data.preset=virl39k",
                f"data.source={train}",
                "data.exclude_contaminated=true",
                "data.contamination_benchmarks=[mathvision, math500]",
                f"data.contamination_data_dir={bench}",
                f"model.tiny_cache_dir={tiny_cache}",
            ],
        )
    )
    examples, report, _ = load_training_data(cfg, data_wiring(), with_processor=False)
    assert [e.id for e in examples] == ["near", "clean-0", "clean-1", "clean-2"]
    assert report.dropped == [
        ("dup", "contaminated: text matches mathvision item 7 (1.00 of n-grams)")
    ]
    assert report.reasons() == {"contaminated": 1}


def _check_argv(train, bench, *extra, overrides=()):
    argv = ["data", "check", "configs/tiny_vl.yaml", "data.preset=virl39k", f"data.source={train}"]
    return [*argv, *overrides, "--data-dir", str(bench), *extra]


def test_data_check_unknown_benchmark_is_one_line(copies, tmp_path, capsys):
    train, bench = copies
    out = tmp_path / "matches.jsonl"
    assert (
        main(_check_argv(train, bench, "--output", str(out), "--against", "mathvista,nosuchbench"))
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: data check --against: unknown benchmark 'nosuchbench'")
    assert "mathvista" in err[0] and "math500" in err[0]  # the known names
    # The config's list, when --against is not given, names its key.
    override = "data.contamination_benchmarks=[mathvista, nosuch]"
    assert main(_check_argv(train, bench, "--output", str(out), overrides=[override])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "config error: data.contamination_benchmarks: unknown benchmark 'nosuch'"
    )
    assert not out.exists()


def test_exclude_contaminated_with_an_unknown_benchmark_fails_before_loading(copies):
    from opsd_mm.cli import data_wiring
    from opsd_mm.config import ConfigError, load_config
    from opsd_mm.data.cli import load_training_data
    from opsd_mm.data.presets import resolve_data

    train, bench = copies
    cfg = resolve_data(
        load_config(
            "configs/tiny_vl.yaml",
            [
                "data.preset=virl39k",
                "data.source=/nonexistent/train.jsonl",  # would be the error if loaded first
                "data.exclude_contaminated=true",
                "data.contamination_benchmarks=[mathvision, nosuch]",
            ],
        )
    )
    with pytest.raises(ConfigError, match="data.contamination_benchmarks: unknown benchmark"):
        load_training_data(cfg, data_wiring(), with_processor=False)


@pytest.mark.parametrize(
    "flag, value, why",
    [
        ("--ngram", "0", "must be an integer >= 1"),
        ("--ngram", "-3", "must be an integer >= 1"),
        ("--ngram", "two", "must be an integer >= 1"),
        ("--text-threshold", "0", "must be a number in (0, 1]"),
        ("--text-threshold", "-0.5", "must be a number in (0, 1]"),
        ("--text-threshold", "1.5", "must be a number in (0, 1]"),
        ("--text-threshold", "nan", "must be a number in (0, 1]"),
        ("--max-distance", "-1", "must be an integer in [0, 128]"),
        ("--max-distance", "129", "must be an integer in [0, 128]"),
    ],
)
def test_data_check_bad_flags_name_the_flag(copies, capsys, flag, value, why):
    train, bench = copies
    with pytest.raises(SystemExit) as e:
        main(_check_argv(train, bench, "--against", "mathvista", f"{flag}={value}"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {why}, got {value!r}" in err, err
