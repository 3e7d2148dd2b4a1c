"""toy/w2_spread.py: the W2 floor between every pair of independent teacher sets, and its bad input."""

import re

from toy.w2_spread import main

TINY = ["--teacher-steps", "50", "--width", "16", "--depth", "1", "--eval-samples", "150", "--device", "cpu"]


def test_prints_every_pair_and_their_summary(tmp_path, capsys):
    assert main(["--sets", "3", "--toy", "moons", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    pairs = dict(re.findall(r"(\d-\d): ([0-9.]+)", out))
    assert set(pairs) == {"0-1", "0-2", "1-2"}
    values = [float(v) for v in pairs.values()]
    assert all(v > 0 for v in values)  # independent sets never coincide
    summary = re.search(r"3 pairs: mean ([0-9.]+), std [0-9.]+, min ([0-9.]+), max ([0-9.]+)", out)
    mean, lo, hi = map(float, summary.groups())
    assert lo == round(min(values), 4) and hi == round(max(values), 4) and lo <= mean <= hi
    assert (tmp_path / "teacher.pt").exists()  # trained once, cached like freeflow.py's


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["--sets", "1", "--toy", "moons", "--out", str(tmp_path)]) == 2
    assert main(["--toy", "nosuchtoy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--sets must be at least 2 (got 1)" in err[0] and "nosuchtoy" in err[1]
    assert list(tmp_path.iterdir()) == []  # nothing written
