"""toy/converge.py: the summaries of a learning curve say what the curve does (the best γ, the change over the
last quarter with its sign), the measurements are cached per run and measured again only for new snapshots or
other references, and the table puts each run's last point against its teacher."""

import json

import pytest
import torch

from toy import converge


def point(*fds):
    """A measured snapshot at γ = 1, 1.25, 1.5 with these learned FDs (the other numbers derived from them)."""
    return {f"{g:g}": {"fd": fd, "pixel_fd": fd / 40, "fd_to_teacher": fd / 2, "endpoint_rmse": fd / 100}
            for g, fd in zip(converge.GAMMAS, fds)}


def test_each_point_is_judged_at_its_own_best_scale_or_among_the_scales_asked():
    p = point(12.0, 10.0, 15.0)
    assert converge.at_best(p) == (1.25, 10.0)
    assert converge.at_best(p, gammas=(1.0,)) == (1.0, 12.0)
    assert converge.at_best(p, "pixel_fd") == (1.25, 0.25)


def test_the_last_quarter_change_is_negative_when_the_distance_falls_and_uses_the_best_scale():
    falling = {0: point(30, 31, 32), 750: point(10, 11, 12), 800: point(9, 9.5, 12), 1000: point(8, 8.5, 9)}
    assert converge.last_quarter_change(falling) == pytest.approx((8 - 10) / 10)  # from step 750: -20 %
    rising = {s: point(*(v * 2 for v in (8, 8.5, 9))) if s == 1000 else p for s, p in falling.items()}
    assert converge.last_quarter_change(rising) == pytest.approx((16 - 10) / 10)
    moved = {750: point(20, 10, 30), 1000: point(9, 12, 30)}  # the best scale moved from 1.25 to 1
    assert converge.last_quarter_change(moved) == pytest.approx((9 - 10) / 10)
    assert converge.last_quarter_change({1000: point(8, 9, 10)}) is None


def test_a_runs_curve_measures_only_new_snapshots_and_again_for_other_references(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    for step in (500, 1000):
        (run / "snapshots" / f"ema_{step:07d}.pt").write_bytes(b"x")
    (run / "snapshots" / "ema_best.pt").write_bytes(b"x")  # not a step: not on the curve
    measured = []
    monkeypatch.setattr(converge.sit, "load_teacher", lambda path, resolution=None: torch.nn.Identity())
    monkeypatch.setattr(converge, "measure_student",
                        lambda student, refs, *a: measured.append(refs["key"]["teacher"]) or point(10, 11, 12))
    refs = {"key": {"teacher": "a"}}
    assert sorted(converge.run_curve(str(run), refs, None, None, 10)) == [500, 1000] and len(measured) == 2
    (run / "snapshots" / "ema_0001500.pt").write_bytes(b"x")
    assert sorted(converge.run_curve(str(run), refs, None, None, 10)) == [500, 1000, 1500] and len(measured) == 3
    saved = json.loads((run / "curve.json").read_text())
    assert saved["key"] == {"teacher": "a", "measure": converge.MEASURE} and len(saved["points"]) == 3
    converge.run_curve(str(run), {"key": {"teacher": "b"}}, None, None, 10)  # another teacher: all measured again
    assert measured == ["a"] * 3 + ["b"] * 3
    (run / "curve.json").write_text("{cut off")  # a damaged cache of ours is measured again, not a traceback
    converge.run_curve(str(run), {"key": {"teacher": "b"}}, None, None, 10)
    assert len(measured) == 9


def test_the_table_puts_each_runs_last_point_against_the_teachers_best():
    teacher = {f"{g:g}": {**{f"rk4_{s}": {"fd": fd, "pixel_fd": 0.2} for s in converge.TEACHER_STEPS},
                          "floor": {"fd": fd - 1}, "floor_fd_to_teacher": 4.0, "rk4_8_vs_32_rmse": 0.01}
               for g, fd in zip(converge.GAMMAS, (9.0, 10.0, 20.0))}
    curve = {15000: point(12.0, 13.0, 20.0), 20000: point(11.7, 11.0, 20.0)}
    result = {"teacher": {0: teacher}, "runs": {"predictor": {0: curve}, "gamma1": {0: curve}},
              "gflops": {"predictor": 3.3, "gamma1": 3.3}}
    rows = {line.split(" | ")[0][2:]: line for line in converge.table(result).splitlines()
            if line.startswith(("| predictor", "| gamma1"))}
    assert "| 1.25 | 11.00 (9.00 at 1) | 1.22x | -8.3 % | 5.50 (4.00) | 0.275 at 1.25 | 0.1170 |" in rows["predictor"]
    assert "| 1 | 11.70 (9.00 at 1) | 1.30x |" in rows["gamma1"]  # a run trained at γ = 1 is judged at γ = 1 alone


def test_the_figure_draws_every_variant_with_a_colour_of_its_own(tmp_path, monkeypatch):
    import matplotlib.axes
    teacher = {f"{g:g}": {"rk4_8": {"fd": fd}, "floor": {"fd": fd - 1}} for g, fd in zip(converge.GAMMAS, (9, 10, 20))}
    curve = {500: point(30.0, 31.0, 32.0), 1000: point(12.0, 13.0, 20.0)}
    result = {"samples": 10, "teacher": {0: teacher}, "runs": {v: {0: curve} for v in converge.VARIANTS},
              "gflops": {v: 3.0 for v in converge.VARIANTS}}
    colours, real_plot = {}, matplotlib.axes.Axes.plot

    def plot(ax, *args, **kw):
        colours[kw["label"]] = kw["color"]
        return real_plot(ax, *args, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    converge.plot(str(tmp_path / "c.png"), result)
    assert (tmp_path / "c.png").stat().st_size > 0 and len(set(colours.values())) == len(converge.VARIANTS)


def test_every_run_gets_the_light_end_of_run_evaluation_unless_its_flags_are_given(tmp_path):
    _, common = converge.parse_args(["--out", str(tmp_path), "--lr", "1e-3"])
    assert common[:2] == ["--steps", "20000"] and common[common.index("--eval-samples") + 1] == "200"
    assert common[common.index("--eval-cfg") + 1:][:1] == ["1"] and "--lr" in common
    _, common = converge.parse_args(["--out", str(tmp_path), "--eval-samples", "1000", "--steps", "5000"])
    assert common.count("--eval-samples") == 1 and common[common.index("--eval-samples") + 1] == "1000"
    assert common.count("--steps") == 1
