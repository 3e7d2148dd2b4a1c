"""toy/digits_scan.py: the FD-vs-γ scan a digits run ends with names each model's best scale, rescanning the
run gives the same numbers (one fixed noise for every run and teacher), a teacher can be scanned alone before
any distillation, and bad input is one sentence."""

import json

import pytest
from conftest import DIGITS_TINY

from toy import digits_scan


def test_a_run_ends_with_a_scan_whose_best_scales_are_the_lowest_distances(tiny_run):
    out, stdout = tiny_run
    scan = json.loads((out / "metrics.json").read_text())["scan"]
    assert scan["scales"] == [1.0, 1.25, 1.5, 2.0, 2.5, 3.0] and scan["samples"] == 300
    for model in ("teacher", "student"):
        assert list(scan[model]) == ["1", "1.25", "1.5", "2", "2.5", "3"]
        for key in ("fd", "pixel_fd"):
            values = {float(g): m[key] for g, m in scan[model].items()}
            assert scan["best"][model][key] == min(values, key=values.get)
        assert all(0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 for m in scan[model].values())
    assert "each at its best γ" in stdout and (out / "scan.png").read_bytes()[:4] == b"\x89PNG"
    table = digits_scan.table(scan)
    assert table.count("**") == 8  # each model's best learned FD and best pixel FD, in bold


def test_rescanning_a_run_gives_its_numbers_again(tiny_run, capsys):
    out, _ = tiny_run
    saved = json.loads((out / "metrics.json").read_text())["scan"]
    assert digits_scan.main([str(out), "--scan-samples", "300"]) == 0
    again = json.loads((out / "scan_classifier0.json").read_text())
    for model in ("teacher", "student"):
        for g, m in saved[model].items():
            assert again[model][g]["fd"] == pytest.approx(m["fd"], rel=1e-6)
            assert again[model][g]["pixel_fd"] == pytest.approx(m["pixel_fd"], rel=1e-6)
    assert "| student (1 step) |" in capsys.readouterr().out


def test_a_teacher_is_scanned_alone_before_distillation(tmp_path, capsys):
    assert digits_scan.main(["--teacher-only", *DIGITS_TINY, "--eval-cfg", "1", "3", "--out", str(tmp_path)]) == 0
    scan = json.loads((tmp_path / "teacher_scan.json").read_text())
    assert list(scan["teacher"]) == ["1", "3"] and scan["student"] == {} and "student" not in scan["best"]
    assert (tmp_path / "teacher_scan.png").exists() and (tmp_path / "teacher.pt").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "give finished runs to rescan, or --teacher-only"),
    (["NOWHERE"], "NOWHERE holds no finished digits run (no metrics.json)."),
    (["--teacher-only", "--eval-cfg", "1", "nan"], "--eval-cfg takes guidance scales >= 0 (got 1.0 nan)."),
])
def test_bad_input_is_one_sentence(argv, message, capsys):
    assert digits_scan.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m toy.digits_scan: error: ") and message in err and err.count("\n") == 1
