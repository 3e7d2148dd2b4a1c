"""toy/plot_log.py (`python -m toy.plot_log out/DIR`): the panels a log makes (the training loop's numbers and
every score it holds, the best marked), the PNG, and the logs it refuses in one sentence without writing."""

import json
import os

import pytest

from toy import plot_log


def write_log(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


STATS = [{"step": s, "n_predictor": 48, "loss": 1.0 / s, "loss_P": 0.9 / s, "loss_C": -0.01, "loss_psi": 1.5,
          "delta_G": 2.0, "delta_N": 2.5, "lambda": 0.3, "images_per_s": 900.0, "memory_gib": 0.4}
         for s in (50, 100, 150, 200)]
SCORES = [{"step": 100, "fid": 9.5, "inception_score": 120.0, "fid_samples": 5000, "best_fid": 9.5, "best_step": 100},
          {"step": 200, "fid": 7.25, "inception_score": 140.0, "fid_samples": 5000, "best_fid": 7.25, "best_step": 200}]


def test_a_log_with_scores_gets_the_training_panels_and_one_per_score(tmp_path):
    found = {title: (curves, is_score) for title, curves, is_score in plot_log.panels(STATS + SCORES)}
    assert list(found) == ["losses", "mean |Δ|", "λ", "images/s", "fid", "inception_score"]
    assert [k for k, _, _ in found["losses"][0]] == ["loss", "loss_P", "loss_C", "loss_psi"]
    assert found["fid"] == ([("fid", [100, 200], [9.5, 7.25])], True) and not found["λ"][1]
    write_log(tmp_path / "log.jsonl", STATS + SCORES)
    assert plot_log.main([str(tmp_path)]) == 0
    assert (tmp_path / "log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_log.main([str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").exists()


def test_a_log_without_scores_plots_the_training_alone():
    assert [title for title, _, _ in plot_log.panels(STATS[:1])] == ["losses", "mean |Δ|", "λ", "images/s"]


@pytest.mark.parametrize("content, message", [
    (None, "there is no"),
    ("", "has no entries yet"),
    ("{not json\n", "is not a FreeFlow log.jsonl (JSONDecodeError)"),
])
def test_logs_it_cannot_plot_are_one_sentence_and_nothing_is_written(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "log.jsonl").write_text(content)
    assert plot_log.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m toy.plot_log: error: ") and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "log.png")


def test_previews_are_picked_evenly_over_the_run_the_last_included(tmp_path):
    import matplotlib.image
    import numpy as np
    (tmp_path / "preview").mkdir()
    for step in range(500, 3001, 500):
        matplotlib.image.imsave(tmp_path / "preview" / f"step_{step:07d}.png", np.zeros((8, 8, 3), np.uint8))
    steps = lambda n: [step for step, _ in plot_log.previews(str(tmp_path), n)]  # noqa: E731
    assert steps(3) == [500, 1500, 3000] and steps(1) == [3000] and steps(10) == [500, 1000, 1500, 2000, 2500, 3000]
    write_log(tmp_path / "log.jsonl", STATS)
    assert plot_log.main([str(tmp_path), "--previews", "3"]) == 0 and (tmp_path / "log.png").exists()


def test_previews_asked_of_a_run_without_them_are_one_sentence(tmp_path, capsys):
    write_log(tmp_path / "log.jsonl", STATS)
    assert plot_log.main([str(tmp_path), "--previews", "2"]) == 2
    assert "has no preview grids (train with --preview-every N)" in capsys.readouterr().err
    assert not (tmp_path / "log.png").exists()
