"""toy/net.py: the MLP velocity field, and the zero-initialised inputs that turn a teacher into a student."""

import pytest
import torch
from conftest import tiny_mlp

from toy.net import MLPVelocity, ScalarEmbed


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
    net = tiny_mlp(num_classes=2, inputs=("gamma",), x_freqs=5)
    copy = MLPVelocity(**net.config())
    copy.load_state_dict(net.state_dict())
    x, t, y, g = torch.randn(5, 2), torch.rand(5), torch.zeros(5, dtype=torch.long), torch.rand(5)
    assert torch.equal(copy(x, t, y, gamma=g), net(x, t, y, gamma=g))


def test_x_enters_with_its_sinusoidal_features():
    net = tiny_mlp(x_freqs=4)
    seen = []
    net.inp.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x, t, y = torch.randn(6, 2), torch.rand(6), torch.zeros(6, dtype=torch.long)
    net(x, t, y)
    omega = torch.tensor([1.0, 4 ** (1 / 3), 4 ** (2 / 3), 4.0])  # 4 frequencies log-spaced from 1 to 4
    angles = torch.stack([x[:, 0:1] * omega, x[:, 1:2] * omega], dim=1).flatten(1)  # per coordinate
    torch.testing.assert_close(seen[0], torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1))
    assert net.inp.in_features == 2 * (1 + 2 * 4)
    seen.clear()
    plain = tiny_mlp(x_freqs=0)  # raw coordinates only
    plain.inp.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    plain(x, t, y)
    assert torch.equal(seen[0], x)


def test_x_features_fit_a_sharp_staircase_that_raw_coordinates_smear():
    """Why the toy uses them: 5 tight clusters 0.7 apart need a near-step map; the same MLP and budget fit
    it far better with the features than on raw coordinates (grid25's failure in miniature)."""
    x = torch.linspace(-2, 2, 512)[:, None].repeat(1, 2)
    target = 0.7 * torch.round(x / 0.7)  # the nearest of five cluster centres
    t, y = torch.zeros(512), torch.zeros(512, dtype=torch.long)

    def fit(x_freqs):
        torch.manual_seed(0)
        net = MLPVelocity(2, 32, 2, 0, x_freqs=x_freqs)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(400):
            loss = (net(x, t, y) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    with_features, raw = fit(6), fit(0)
    assert with_features < 0.5 * raw, (with_features, raw)


def test_a_value_shared_by_the_batch_is_embedded_once_with_the_same_result_and_gradient():
    embed = ScalarEmbed(16)
    shared, varied = torch.full((30,), 0.4), torch.full((30,), 0.4)
    varied[-1] = 0.9  # one differing value: every row goes through the MLP
    once, rowwise = embed(shared), embed(varied)[:-1]
    assert once.shape == (30, 16) and torch.allclose(once[:-1], rowwise, atol=1e-6)
    grad_once = torch.autograd.grad(once.sum(), embed.mlp[0].weight)[0]
    grad_rows = torch.autograd.grad(embed(varied)[:-1].sum(), embed.mlp[0].weight)[0]
    assert torch.allclose(grad_once, 30 / 29 * grad_rows, rtol=1e-4, atol=1e-6)  # 30 rows against 29
