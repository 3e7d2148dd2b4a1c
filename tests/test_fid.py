"""fid.py: the metrics against closed forms, the TF1 resize against a NumPy reference, the network's
layout, the weights loader, chunked reading, and every refusal. No real weights exist here: the network
tests use random weights, the metric tests synthetic data."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import fid


# ---------------------------------------------------------------------------------- Fréchet distance

def random_spd(rng, d):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_closed_form_for_full_commuting_covariances():
    # Σ1 = Q D1 Qᵀ, Σ2 = Q D2 Qᵀ share eigenvectors, so d² = |Δμ|² + Σ (√d1 - √d2)²; Σ's are not diagonal.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    d1, d2 = rng.uniform(0.1, 4, 8), rng.uniform(0.1, 4, 8)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_an_independent_eigenvalue_computation():
    # Tr (Σ1 Σ2)^½ = Tr (√Σ1 Σ2 √Σ1)^½, the second computed with symmetric eigendecompositions only.
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(rng, 20), random_spd(rng, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_zero_for_identical_statistics_and_symmetric():
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(rng, 16), random_spd(rng, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-10
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1),
                                                                   rel=1e-10)


def test_frechet_distance_retries_a_non_finite_root_with_eps_on_the_diagonal(monkeypatch):
    calls = []
    real = scipy.linalg.sqrtm

    def sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", sqrtm)
    s = np.diag([1.0, 2.0, 3.0])
    with pytest.warns(UserWarning, match="singular"):
        d = fid.frechet_distance(np.zeros(3), s, np.zeros(3), s)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(3)) @ (s + 1e-6 * np.eye(3)))
    assert abs(d) < 1e-5


def test_frechet_distance_keeps_the_real_part_of_a_nearly_real_root_and_refuses_a_complex_one(monkeypatch):
    s = np.diag([1.0, 4.0])
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.sqrt(a) + 1e-4j * np.eye(2))
    assert fid.frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0, abs=1e-12)
    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", lambda a: np.sqrt(a) + 0.1j * np.eye(2))
    with pytest.raises(fid.FIDError, match="imaginary component"):
        fid.frechet_distance(np.zeros(2), s, np.zeros(2), s)


def test_statistics_use_float64_and_n_minus_1():
    x = np.random.default_rng(4).standard_normal((50, 3)).astype(np.float32)
    mu, sigma = fid.statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, xc.T @ xc / 49, rtol=1e-12)


# ---------------------------------------------------------------------------------- TF1 resize

def numpy_tf1_resize(img, size):
    """Reference: TF1 legacy bilinear, one output pixel at a time from its four source pixels."""
    h, w = img.shape[:2]
    out = np.zeros((size, size) + img.shape[2:])
    for i in range(size):
        y = i * h / size
        y0 = int(np.floor(y)); y1 = min(y0 + 1, h - 1); fy = y - y0
        for j in range(size):
            x = j * w / size
            x0 = int(np.floor(x)); x1 = min(x0 + 1, w - 1); fx = x - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("n_in", [256, 512])
def test_tf1_resize_matches_numpy_reference_and_f_interpolate_does_not(n_in):
    img = np.random.default_rng(n_in).integers(0, 256, (n_in, n_in, 3)).astype(np.float64)
    ref = numpy_tf1_resize(img, 299)
    x = torch.from_numpy(img).float().permute(2, 0, 1)[None]
    ours = fid.tf1_resize(x, 299)[0].permute(1, 2, 0).double().numpy()
    assert np.abs(ours - ref).max() <= 1e-2
    torch_default = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert np.abs(torch_default[0].permute(1, 2, 0).double().numpy() - ref).max() > 1e-2


# ---------------------------------------------------------------------------------- the network

SPEC_MODULES = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"]


def test_state_dict_has_the_472_tensors_of_the_weights_file():
    sd = {k: v for k, v in fid.FIDInception().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 472
    assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert sd["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert sd["Mixed_7b.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert sorted({k.split(".")[0] for k in sd}) == sorted(SPEC_MODULES)
    leaves = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in sd if not k.startswith("fc.")}
    assert leaves == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}
    assert sum(v.numel() for v in sd.values()) * 4 / 1e6 == pytest.approx(95.5, abs=0.1)   # the file's size


def random_inception(seed=0):
    torch.manual_seed(seed)
    model = fid.FIDInception()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean") or name.endswith("bn.bias"):
                t.normal_(0, 0.1)
            elif name.endswith("bn.weight"):
                t.uniform_(0.8, 1.2)
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "inception.pth"
    torch.save(random_inception().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def model(weights_file):
    return fid.load_inception(weights_file)


def images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def as_input(batch):
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("drop_batches_tracked", [False, True])
def test_random_weights_round_trip_through_load_inception(tmp_path, drop_batches_tracked):
    src = random_inception(seed=1)
    sd = src.state_dict()
    if drop_batches_tracked:
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "w.pth")
    loaded = fid.load_inception(str(tmp_path / "w.pth"))
    assert not loaded.training
    x = as_input(images(2))
    with torch.no_grad():
        for a, b in zip(src.features(x), loaded.features(x)):
            assert torch.equal(a, b)


def test_features_do_not_depend_on_batch_size(model):
    x = as_input(images(5, seed=2))
    with torch.no_grad():
        whole = model.features(x)
        parts = [model.features(x[:1]), model.features(x[1:])]
    for i, w in enumerate(whole):
        torch.testing.assert_close(torch.cat([p[i] for p in parts]), w, rtol=1e-4, atol=1e-4)


def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_in_h_w_c_order(model):
    captured = []
    handle = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            _, spatial, _ = model.features(as_input(images(2, seed=3)))
    finally:
        handle.remove()
    fmap = captured[-1]                                       # N x 192 x 17 x 17, after BN + ReLU
    assert fmap.shape == (2, 192, 17, 17) and spatial.shape == (2, 2023)
    torch.testing.assert_close(spatial.view(2, 17, 17, 7), fmap[:, :7].permute(0, 2, 3, 1))
    assert not torch.allclose(spatial, fmap[:, :7].flatten(1))  # C, H, W order would differ


def test_logits_omit_the_fc_bias(model):
    with torch.no_grad():
        pool, _, logits = model.features(as_input(images(2, seed=4)))
    torch.testing.assert_close(logits, model.fc(pool) - model.fc.bias)
    assert pool.shape == (2, 2048) and torch.equal(model(as_input(images(2, seed=4))), pool)


# ---------------------------------------------------------------------------------- IS, precision/recall

def test_inception_score_of_uniform_predictions_is_one():
    assert fid.inception_score(np.full((100, 1008), 1 / 1008)) == pytest.approx(1.0, rel=1e-12)


def test_inception_score_of_one_hot_predictions_is_the_number_of_classes():
    probs = np.eye(1008)[np.arange(400) % 50]                  # 50 classes, 8 images each
    assert fid.inception_score(probs) == pytest.approx(50.0, rel=1e-12)
    # splits are sequential: with labels sorted, each split of 80 images holds 10 classes -> IS 10
    sorted_probs = np.eye(1008)[np.sort(np.arange(400) % 50)]
    assert fid.inception_score(sorted_probs, split_size=80) == pytest.approx(10.0, rel=1e-12)


def numpy_precision_recall(ref, smp, k=3):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]
    d = ((ref[:, None] - smp[None]) ** 2).sum(-1)
    precision = np.mean([(d[:, j] <= radii(ref)).any() for j in range(len(smp))])
    recall = np.mean([(d[i] <= radii(smp)).any() for i in range(len(ref))])
    return precision, recall


def test_precision_recall_of_identical_and_disjoint_sets():
    x = np.random.default_rng(5).standard_normal((40, 8)).astype(np.float32)
    assert fid.precision_recall(x, x) == (1.0, 1.0)
    assert fid.precision_recall(x, x + 100) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_across_blocks():
    rng = np.random.default_rng(6)
    ref = rng.standard_normal((37, 4)).astype(np.float32)
    smp = (rng.standard_normal((29, 4)) * 1.3 + 0.4).astype(np.float32)
    p, r = fid.precision_recall(ref, smp, block=8)            # blocks that do not divide the sets
    p0, r0 = numpy_precision_recall(ref.astype(np.float64), smp.astype(np.float64))
    assert 0 < p0 < 1 and 0 < r0 < 1
    assert (p, r) == pytest.approx((p0, r0), abs=1e-12)


# ---------------------------------------------------------------------------------- reading batches

@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_chunked_reading_equals_whole_reading(tmp_path, save):
    arr = images(10, size=16, seed=7)
    path = str(tmp_path / "b.npz")
    save(path, arr)
    chunks = list(fid.read_images(path, 3))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert np.array_equal(np.concatenate(chunks), arr)


def test_activations_equal_a_direct_forward(model, tmp_path):
    arr = images(5, seed=8)
    np.savez(tmp_path / "b.npz", arr)
    pool, spatial, probs = fid.activations(model, str(tmp_path / "b.npz"), batch_size=2)
    with torch.no_grad():
        p, s, logits = model.features(as_input(arr))
    np.testing.assert_allclose(pool, p.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(spatial, s.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs, logits.softmax(-1).numpy(), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p.replace(".npz", ".npy"), images(3)) or p.replace(".npz", ".npy"), "not an .npz"),
    (lambda p: Path(p).write_text("hello") and p, "not a zip"),
    (lambda p: np.savez(p, images=images(3)) or p, "has no arr_0"),
    (lambda p: np.savez(p, images(3).astype(np.float32)) or p, "must be uint8"),
    (lambda p: np.savez(p, images(3).transpose(0, 3, 1, 2).copy()) or p, "channels-first"),
    (lambda p: np.savez(p, images(3)[..., 0]) or p, "must be N x H x W x 3"),
    (lambda p: np.savez(p, images(1)) or p, "at least 2"),
    (lambda p: p.replace("bad", "absent"), "does not exist"),
])
def test_bad_batches_are_refused_with_one_sentence(tmp_path, make, message):
    path = make(str(tmp_path / "bad.npz"))
    with pytest.raises(fid.FIDError, match=message):
        fid.image_header(path)


def test_weights_of_the_wrong_shape_or_keys_are_refused(tmp_path):
    sd = fid.FIDInception().state_dict()
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(fid.FIDError, match=r"fc.weight has shape \(1000, 2048\)"):
        fid.load_inception(str(tmp_path / "shape.pth"))
    del sd["fc.weight"]
    torch.save(sd, tmp_path / "keys.pth")
    with pytest.raises(fid.FIDError, match="1 missing keys"):
        fid.load_inception(str(tmp_path / "keys.pth"))
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(fid.FIDError, match="not a PyTorch weights file"):
        fid.load_inception(str(tmp_path / "junk.pth"))


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(fid.FIDError, match=fid.WEIGHTS_FILE + ".*" + str(tmp_path / "hub")):
        fid.find_weights(None)
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(fid.FIDError, match="FID_INCEPTION_WEIGHTS names"):
        fid.find_weights(None)
    cached = tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS")
    assert fid.find_weights(None) == str(cached)


# ---------------------------------------------------------------------------------- the command line

@pytest.fixture
def batches(tmp_path):
    samples, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
    np.savez(samples, images(6, size=32, seed=9))
    np.savez(ref, images(8, size=32, seed=10))
    return samples, ref


def test_cli_runs_end_to_end_and_writes_json(batches, weights_file, tmp_path, capsys):
    samples, ref = batches
    out = str(tmp_path / "m.json")
    assert fid.main([samples, ref, "--weights", weights_file, "--batch-size", "4", "--device", "cpu",
                     "--json", out]) == 0
    printed = capsys.readouterr().out
    for line in ("Inception Score: ", "FID: ", "sFID: ", "Precision: ", "Recall: "):
        assert line in printed
    assert "FID (6 samples)" in printed and "FID-50K" not in printed
    metrics = json.load(open(out))
    assert metrics["num_samples"] == 6 and metrics["reference_statistics"] == "computed"
    assert metrics["fid"] > 0 and np.isfinite(metrics["sfid"]) and metrics["inception_score"] >= 1
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1


def record_frechet(monkeypatch):
    """Replace the (slow, 2048-d) Fréchet distance by a recorder: these tests are about what goes in."""
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: calls.append(a) or 1.0)
    return calls


def test_cli_uses_stored_reference_statistics(batches, weights_file, tmp_path, monkeypatch):
    samples, _ = batches
    rng = np.random.default_rng(11)
    stats = dict(mu=rng.standard_normal(2048), sigma=np.eye(2048), mu_s=rng.standard_normal(2023),
                 sigma_s=np.eye(2023))
    stored = str(tmp_path / "stored.npz")
    np.savez(stored, images(8, size=32, seed=10), **stats)
    calls = record_frechet(monkeypatch)
    out = str(tmp_path / "m.json")
    assert fid.main([samples, stored, "--weights", weights_file, "--json", out]) == 0
    assert json.load(open(out))["reference_statistics"] == "stored"
    (pool_call, spatial_call) = calls
    for got, key in zip(pool_call[2:] + spatial_call[2:], ("mu", "sigma", "mu_s", "sigma_s")):
        assert np.array_equal(got, stats[key])
    model = fid.load_inception(weights_file)
    pool, spatial, _ = fid.activations(model, samples)
    for got, want in zip(pool_call[:2] + spatial_call[:2], fid.statistics(pool) + fid.statistics(spatial)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_cli_refuses_swapped_files(batches, weights_file, tmp_path, capsys):
    samples, _ = batches
    stored = str(tmp_path / "stored.npz")
    np.savez(stored, images(4, size=32), mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    assert fid.main([stored, samples, "--weights", weights_file]) == 2
    err = capsys.readouterr().err
    assert "look swapped" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--weights", "/nonexistent/w.pth"], "--weights names"),
])
def test_cli_bad_arguments_give_one_line(batches, extra, message, capsys):
    samples, ref = batches
    assert fid.main([samples, ref] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_with_too_few_images_for_precision_recall_still_reports_fid(tmp_path, weights_file, capsys,
                                                                          monkeypatch):
    record_frechet(monkeypatch)
    samples, ref = str(tmp_path / "s.npz"), str(tmp_path / "r.npz")
    np.savez(samples, images(3, size=16))
    np.savez(ref, images(3, size=16, seed=1))
    assert fid.main([samples, ref, "--weights", weights_file]) == 0
    assert "Precision: n/a" in capsys.readouterr().out


def test_json_is_not_written_when_the_evaluation_fails(batches, tmp_path):
    samples, _ = batches
    out = tmp_path / "m.json"
    assert fid.main([samples, str(tmp_path / "absent.npz"), "--weights", os.devnull, "--json", str(out)]) == 2
    assert not out.exists()


def test_json_into_a_missing_folder_is_refused_before_the_evaluation(batches, tmp_path, capsys):
    samples, ref = batches
    out = tmp_path / "no" / "m.json"
    assert fid.main([samples, ref, "--weights", os.devnull, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and "folder does not exist" in err and len(err.strip().splitlines()) == 1


def test_fid_py_works_copied_alone_into_another_project(batches, weights_file, tmp_path):
    """fid.py is a file people copy: without freeflow.py (or anything of this repository) beside it, its
    command line scores a batch and writes the JSON."""
    import shutil
    import subprocess
    import sys
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(Path(fid.__file__), alone / "fid.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *args: subprocess.run([sys.executable, "fid.py", *args], cwd=alone, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    assert run("--help").returncode == 0
    samples, ref = batches
    # main() end to end, with the slow 2048-d Fréchet root stubbed out (tested above, and not what this is about)
    code = ("import sys, fid; fid.frechet_distance = lambda *a: 0.0; sys.exit(fid.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, samples, ref, "--weights", weights_file, "--batch-size", "4",
                           "--device", "cpu", "--json", "m.json"], cwd=alone, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "FID (6 samples)" in done.stdout and json.load(open(alone / "m.json"))["num_samples"] == 6
    metrics = json.load(open(alone / "m.json"))
    assert set(metrics) >= {"inception_score", "fid", "sfid", "precision", "recall", "num_samples"}
    assert not (alone / "freeflow.py").exists()
