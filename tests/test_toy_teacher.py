"""toy/teacher.py: the toy teacher learns by flow matching, is cached, and is retrained only when the data
or its settings change."""

import numpy as np
import pytest
import torch

import freeflow as ff
from toy.data import load_toy
from toy.teacher import load_or_train_teacher

SMALL = dict(teacher_steps=150, teacher_batch=256, width=32, depth=2)


def small_cfg(**kw):
    return ff.Config(**{**SMALL, **kw}).resolve(True)


def test_teacher_learns_the_data_by_flow_matching(tmp_path):
    x, y, k = load_toy("8gaussians")
    teacher, info = load_or_train_teacher(str(tmp_path / "t.pt"), x, y, k, small_cfg(teacher_steps=400), "cpu",
                                          progress=False)
    torch.manual_seed(0)
    z = torch.randn(500, 2)
    labels, g = torch.arange(500) % k, torch.ones(500)
    samples = ff.teacher_ode(teacher, z, labels, g, (0.0, 1.0), 32, "rk4")[0]
    centres = torch.from_numpy(np.stack([x[y == c].mean(0) for c in range(k)]))
    spread = (torch.from_numpy(x) - centres[torch.from_numpy(y)]).norm(dim=1).mean()  # data: ~0.18
    to_own_centre = (samples - centres[labels]).norm(dim=1).mean()  # each sample near its class's Gaussian
    assert to_own_centre < 1.5 * spread
    assert (z - centres[labels]).norm(dim=1).mean() > 5 * spread  # where the samples started
    assert info["cached"] is False


def test_cached_teacher_is_reused_and_retrained_when_settings_change(tmp_path, capsys):
    x, y, k = load_toy("moons")
    path = str(tmp_path / "t.pt")
    first, info1 = load_or_train_teacher(path, x, y, k, small_cfg(), "cpu", progress=False)
    again, info2 = load_or_train_teacher(path, x, y, k, small_cfg(), "cpu", progress=False)
    assert (info1["cached"], info2["cached"]) == (False, True)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    _, info3 = load_or_train_teacher(path, x, y, k, small_cfg(teacher_steps=151), "cpu", progress=False)
    assert info3["cached"] is False and "trained on other data or settings" in capsys.readouterr().out
    _, info5 = load_or_train_teacher(path, x, y, k, small_cfg(teacher_steps=151, x_freqs=0), "cpu", progress=False)
    assert info5["cached"] is False  # another architecture (a cache written before x features, too)
    x2 = x.copy()
    x2[0, 0] += 1
    _, info4 = load_or_train_teacher(path, x2, y, k, small_cfg(teacher_steps=151), "cpu", progress=False)
    assert info4["cached"] is False


def test_the_teachers_seed_defaults_to_seed_and_teacher_seed_keeps_one_teacher_under_another_seed(tmp_path):
    x, y, k = load_toy("moons")
    path = str(tmp_path / "t.pt")
    train = lambda p, **kw: load_or_train_teacher(p, x, y, k, small_cfg(teacher_steps=20, **kw), "cpu",  # noqa: E731
                                                  progress=False)
    first, _ = train(path, seed=3)
    _, info = train(path, seed=9, teacher_seed=3)
    assert info["cached"] is True  # a second distillation of the same teacher
    again, info = train(str(tmp_path / "u.pt"), seed=9, teacher_seed=3)
    assert info["cached"] is False  # trained afresh with seed 3: the same weights as --seed 3 gave
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    _, info = train(path, seed=9)
    assert info["cached"] is False  # --seed 9 alone: its own teacher


def test_a_file_the_cache_does_not_recognise_is_neither_trusted_nor_overwritten(tmp_path):
    x, y, k = load_toy("moons")
    path = tmp_path / "t.pt"
    for foreign in (b"garbage", None):  # unreadable, and a user's checkpoint (another kind of dict)
        if foreign is None:
            torch.save({"model": torch.ones(3)}, path)
        else:
            path.write_bytes(foreign)
        before = path.read_bytes()
        with pytest.raises(ff.FreeFlowError, match="exists and is not a toy teacher cached by freeflow.py"):
            load_or_train_teacher(str(path), x, y, k, small_cfg(teacher_steps=10**9), "cpu", progress=False)
        assert path.read_bytes() == before


def test_the_cache_folder_is_made_and_an_unwritable_one_is_refused_before_training(tmp_path):
    x, y, k = load_toy("moons")
    path = tmp_path / "new" / "folder" / "t.pt"
    _, info = load_or_train_teacher(str(path), x, y, k, small_cfg(teacher_steps=5), "cpu", progress=False)
    assert info["cached"] is False and path.exists()
    (tmp_path / "a_file").write_text("not a folder")
    cfg = small_cfg(teacher_steps=10**9)  # the refusal must come before the training, or this test never ends
    with pytest.raises(ff.FreeFlowError, match="--toy-teacher .*a_file/t.pt cannot be written: .*a_file is a file"):
        load_or_train_teacher(str(tmp_path / "a_file" / "t.pt"), x, y, k, cfg, "cpu", progress=False)
