"""toy/net.py: the MLP velocity field, and the zero-initialised inputs that turn a teacher into a student."""

import pytest
import torch
from conftest import tiny_mlp

from toy.net import MLPVelocity


def test_extended_copy_computes_exactly_what_the_teacher_computes():
    teacher = tiny_mlp(num_classes=3)
    student = teacher.extended(("s", "gamma"))
    x, t, y = torch.randn(40, 2), torch.rand(40), torch.randint(0, 4, (40,))
    assert torch.equal(student(x, t, y, s=torch.rand(40), gamma=5 * torch.rand(40)), teacher(x, t, y))
    assert student.inputs == ("s", "gamma") and teacher.inputs == ()


def test_extended_inputs_change_the_output_once_trained():
    student = tiny_mlp(inputs=("s",))  # every weight random, the s-embedding's last layer included
    x, t, y = torch.randn(10, 2), torch.rand(10), torch.zeros(10, dtype=torch.long)
    assert not torch.allclose(student(x, t, y, s=torch.zeros(10)), student(x, t, y, s=torch.ones(10)))


def test_network_refuses_missing_or_unknown_inputs():
    student = MLPVelocity(inputs=("s", "gamma"))
    x, t, y = torch.randn(3, 2), torch.rand(3), torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match="extra inputs"):
        student(x, t, y, s=t)
    with pytest.raises(TypeError, match="extra inputs"):
        MLPVelocity()(x, t, y, s=t)


def test_config_rebuilds_the_same_network():
    net = tiny_mlp(num_classes=2, inputs=("gamma",))
    copy = MLPVelocity(**net.config())
    copy.load_state_dict(net.state_dict())
    x, t, y, g = torch.randn(5, 2), torch.rand(5), torch.zeros(5, dtype=torch.long), torch.rand(5)
    assert torch.equal(copy(x, t, y, gamma=g), net(x, t, y, gamma=g))
