"""The ImageNet path of freeflow.py on a tiny SiT (sit.py's T/2: 2 blocks, width 64) at 256 px, on the CPU:
distillation from a REPA-layout checkpoint, the student at step 0, a fixed-batch run, kill-and-resume,
two processes under torchrun against one, sampling through a tiny random AutoencoderKL, and the bad
inputs of this path; REPA's samplers (freeflow.sample_ode, sample_sde) on a teacher whose flow is known."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import PixelInception, assert_close_at_scale

import freeflow as ff
import sit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "freeflow.py")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny SiT saved in REPA's layout: a plain state dict with REPA's projector keys."""
    torch.manual_seed(0)
    model = sit.build("T/2", 256)
    with torch.no_grad():  # a teacher whose output depends on t, y and x: perturb the zero-initialised parts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    state["projectors.0.0.weight"] = torch.randn(8, 64)
    path = tmp_path_factory.mktemp("teacher") / "tiny_repa.pt"
    torch.save(state, path)
    return str(path)


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def train_args(teacher_file, out, steps, *extra, res=256):
    return ["--teacher", teacher_file, "--res", str(res), "--steps", str(steps), "--batch-size", "8",
            "--device", "cpu", "--out", str(out), *extra]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    """Bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def distance(a, b):
    """The Euclidean distance between two state dicts, all tensors together."""
    return torch.cat([(a[k].double() - b[k].double()).flatten() for k in a]).norm().item()


# ---------------------------------------------------------------------------------- distillation

def test_few_steps_from_a_repa_checkpoint_write_a_checkpoint_sit_can_load(teacher_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert ff.main(train_args(teacher_file, out, 3, "--log-every", "1")) == 0
    assert "no data is read" in capsys.readouterr().out
    ckpt = load_ckpt(out / "ckpt.pt")  # weights_only=True: plain tensors and containers
    assert ckpt["step"] == 3 and ckpt["config"]["teacher"] == teacher_file
    assert {"student", "ema", "g_psi", "opt_theta", "opt_psi", "rng", "net"} <= ckpt.keys()
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["step"] for e in log] == [1, 2, 3]
    for key in ("loss_P", "loss_C", "loss_psi", "delta_G", "delta_N", "lambda", "images_per_s", "memory_gib"):
        assert all(np.isfinite(e[key]) for e in log), key
    # the EMA student, through sit.py: a SiT with the extra inputs s and γ, weights equal to the EMA's
    student = sit.load_teacher(str(out / "ckpt.pt"), resolution=256)
    assert student.inputs == ("s", "gamma")
    assert same_weights(student.state_dict(), ckpt["ema"])


def test_imagenet_defaults_apply_only_to_what_was_not_given(teacher_file):
    cfg = ff.parse_config(["--teacher", teacher_file, "--lr", "3e-4"])
    assert (cfg.lr, cfg.batch_size, cfg.guidance_interval, cfg.ema) == (3e-4, 256, (0.0, 0.7), 0.9999)
    assert ff.parse_config(["--toy", "moons"]).batch_size == ff.Config().batch_size
    assert ff.parse_config(["--teacher", teacher_file, "--sampler", "sde"]).steps == 250


def test_student_at_step_0_is_the_teachers_euler_step(teacher_file):
    teacher = sit.load_teacher(teacher_file, 256)
    student = ff.make_student(teacher)
    torch.manual_seed(1)
    z, y = torch.randn(3, 4, 32, 32), torch.tensor([1, 500, 1000])
    one_step = ff.sample_one_step(student, z, y, torch.full((3,), 2.5))
    euler, nfe = ff.sample_ode(teacher, z, y, steps=1)  # x(0) = z + (0 - 1) v(z, 1)
    assert nfe == 1 and torch.allclose(one_step, euler, atol=1e-5)
    assert not torch.allclose(one_step, z, atol=1e-2)


def test_losses_are_finite_and_decrease_on_a_fixed_batch(teacher_file):
    teacher = sit.load_teacher(teacher_file, 256)
    torch.manual_seed(0)
    student, g_psi = ff.make_student(teacher).train(), ff.make_aux(teacher).train()
    cfg = ff.Config(batch_size=8, lr=1e-3, cfg_range=(1.0, 2.0)).resolve(True)
    opts = (torch.optim.Adam(student.parameters(), lr=cfg.lr), torch.optim.Adam(g_psi.parameters(), lr=cfg.lr))
    history = []
    for _ in range(12):
        torch.manual_seed(123)  # the same batch (z, c, γ, s, r, n) every step
        history.append(ff.train_step(student, g_psi, teacher, *opts, cfg, (4, 32, 32)))
    assert all(np.isfinite(v) for h in history for v in h.values())
    first, last = history[0], history[-1]
    # loss_P is |Δ_G|² / d under the weight 1 / (|Δ_G|² / d + ε): it falls slowly while |Δ_G| is large
    assert last["loss_P"] < first["loss_P"] and last["delta_G"] < 0.5 * first["delta_G"]
    assert last["loss_psi"] < 0.95 * first["loss_psi"]  # g_ψ fits the student's noising velocity


def test_a_corrector_step_moves_the_sits_one_step_samples_along_plus_delta_N(teacher_file):
    # loss_C = λ <F_θ(z, 0), sg(Δ_N)> / d is a surrogate: its value is no distance, its gradient is the signal.
    # One small step changes F by -lr J Jᵀ Δ_N λ / d, so the samples x̂ = z - F move by +lr J Jᵀ Δ_N λ / d: along
    # Δ_N (a non-negative inner product), and against it if the sign were flipped anywhere on the way.
    teacher = sit.load_teacher(teacher_file, 256)
    torch.manual_seed(4)
    student, g_psi = ff.make_student(teacher).train(), ff.make_aux(teacher)
    z, y, gamma = torch.randn(4, 4, 32, 32), torch.randint(0, 1000, (4,)), torch.full((4,), 1.5)
    zero = torch.zeros(4)
    F0 = ff.F_theta(student, z, zero, y, gamma)
    delta_N, _ = ff.corrector_direction(g_psi, teacher, z - F0, y, gamma, (0.0, 0.7), ff.sample_r(4),
                                        torch.randn_like(z))
    assert delta_N.abs().max() > 0  # g_ψ is not the teacher: a real direction
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    ff.corrector_loss(F0, delta_N, lam=1.0).mean().backward()
    opt.step()
    with torch.no_grad():
        moved = (z - ff.F_theta(student, z, zero, y, gamma)) - (z - F0.detach())
    cos = torch.nn.functional.cosine_similarity(moved.flatten(), delta_N.flatten(), dim=0)
    assert cos > 0.1, cos.item()


def test_a_run_killed_with_sigkill_and_resumed_ends_identical(teacher_file, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_cli(*train_args(teacher_file, full, 8, "--ckpt-every", "2")).returncode == 0
    proc = subprocess.Popen([sys.executable, SCRIPT, *train_args(teacher_file, killed, 8, "--ckpt-every", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_ckpt(killed / "ckpt.pt")["step"]  # complete, even if the kill came during a later write
    if step == 8:
        pytest.skip("the run finished before it could be killed")
    result = run_cli(*train_args(teacher_file, killed, 8, "--ckpt-every", "2", "--resume"))
    assert result.returncode == 0, result.stderr
    a, b = load_ckpt(full / "ckpt.pt"), load_ckpt(killed / "ckpt.pt")
    assert a["step"] == b["step"] == 8
    for key in ("student", "ema", "g_psi"):
        assert same_weights(a[key], b[key]), key  # bit for bit


def test_two_processes_under_torchrun_equal_one_process_with_the_same_global_batch(teacher_file, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*train_args(teacher_file, one, 3)).returncode == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             SCRIPT, *train_args(teacher_file, two, 3)], capture_output=True, text=True)
    # torchrun prints its own summary last; the failing rank's own message comes before it
    clues = [line for line in result.stderr.splitlines() if any(k in line for k in ("Error", "terminate", "what()"))]
    assert result.returncode == 0, "\n".join(clues[:20]) + "\n...\n" + result.stderr[-1500:]
    assert "on 2 process(es)" in result.stdout
    a, b = load_ckpt(one / "ckpt.pt"), load_ckpt(two / "ckpt.pt")
    teacher = sit.load_teacher(teacher_file, 256)
    torch.manual_seed(0)  # the weights both runs started from (run_imagenet seeds, then distill builds them)
    student = ff.make_student(teacher).state_dict()
    start = {"student": student, "ema": student, "g_psi": ff.make_aux(teacher).state_dict()}
    for key in ("student", "ema", "g_psi"):
        # Equal up to the order of floating-point sums (the ranks agreed with each other exactly: distill() checks
        # that before it returns). Adam turns a rounding difference in a gradient into one in the update, whose size
        # is set by the learning rate, not by the weights: so the runs' distance is measured against how far
        # training moved the weights. Measured (2026-12-01): 6e-5 to 2e-4 of it; a single process on half the
        # batch, what a rank that bypassed DDP's averaging would train on, ends 1.35 of it away.
        moved = distance(a[key], start[key])
        assert moved > 0 and distance(a[key], b[key]) <= 1e-2 * moved, key


def relative(a, b):
    """|a - b| / |b| over the whole tensor, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_the_jvp_runs_in_bf16_under_autocast_to_bf16s_rounding_and_jvp_fp32_stays_float32(teacher_file):
    teacher = sit.load_teacher(teacher_file, 256)
    student = ff.make_student(teacher)
    torch.manual_seed(2)
    with torch.no_grad():  # an s embedding that is not zero, so that ∂_s F is not zero
        for p in student.extra.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z, y = torch.randn(4, 4, 32, 32), torch.tensor([3, 7, 1, 1000])
    s, gamma = torch.rand(4), 1 + torch.rand(4)
    plain = ff.dF_ds_pass(student, z, s, y, gamma, "jvp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = ff.dF_ds_pass(student, z, s, y, gamma, "jvp-fp32")
        bf16 = ff.dF_ds_pass(student, z, s, y, gamma, "jvp")
    assert plain[1].norm() > 1e-2 * plain[0].norm()  # a derivative worth comparing
    assert torch.equal(fp32[0], plain[0]) and torch.equal(fp32[1], plain[1])  # float32 exactly as without autocast
    assert bf16[0].dtype == bf16[1].dtype == torch.float32 and student.fused_attention  # restored after the JVP
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3); through this SiT's two blocks the JVP's
    # relative error measured 2u (7.5e-3, F 5.3e-3) on three batches. 4u passes that on any CPU and still catches
    # a wrong attention scale on the hand-written path (1/d for 1/√d: 2.9e-2 on F, 6.6e-2 on ∂_s F).
    u = 2.0 ** -8
    assert 0 < relative(bf16[0], plain[0]) < 4 * u and 0 < relative(bf16[1], plain[1]) < 4 * u


def test_under_bf16_every_pass_of_the_step_runs_its_flops_in_bf16(teacher_file):
    """The FLOPs of one training step by dtype (bench/flops.py): with the JVP or a finite difference at least 95 %
    of them run in bf16 (every matrix product does: 100 % here); with --dsdt jvp-fp32 the JVP's stay float32."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from flops import FlopsByDtype
    with FlopsByDtype() as known, torch.autocast("cpu", dtype=torch.bfloat16):
        torch.randn(3, 5) @ torch.randn(5, 7)  # 2 · 3 · 5 · 7 FLOPs, cast to bf16 by autocast
    assert dict(known.flops) == {torch.bfloat16: 210}
    teacher = sit.load_teacher(teacher_file, 256)
    shares = {}
    for dsdt in ("jvp", "jvp-fp32", "fd", "fd-forward"):
        torch.manual_seed(0)
        student, g_psi = ff.make_student(teacher).train(), ff.make_aux(teacher).train()
        opts = (torch.optim.Adam(student.parameters()), torch.optim.Adam(g_psi.parameters()))
        cfg = ff.Config(batch_size=8, cfg_range=(1.0, 2.0), dsdt=dsdt, precision="bf16").resolve(True)
        passes = ff.training_passes(student, g_psi, teacher, cfg)  # as a run's step: the JVP's precision
        with FlopsByDtype() as flops, torch.autocast("cpu", dtype=torch.bfloat16):
            ff.train_step(student, g_psi, teacher, *opts, cfg, (4, 32, 32), passes)
        shares[dsdt] = flops.share(torch.bfloat16)
    assert min(shares["jvp"], shares["fd"], shares["fd-forward"]) >= 0.95, shares
    assert shares["jvp-fp32"] < 0.8, shares  # the JVP is about a third of the step's FLOPs


def test_a_bf16_finite_difference_run_trains(teacher_file, tmp_path):
    out = tmp_path / "bf16"
    assert ff.main(train_args(teacher_file, out, 2, "--precision", "bf16", "--dsdt", "fd", "--log-every", "1")) == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(e["loss"]) for e in log)


# ---------------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL with the SD-VAE's shape contract: 4 latent channels, 8x upsampling."""
    import diffusers  # in requirements.txt: a missing package fails here rather than skipping
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4)
    path = tmp_path_factory.mktemp("vae") / "tiny_vae"
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def student_ckpt(teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    assert ff.main(train_args(teacher_file, out, 1)) == 0
    return str(out / "ckpt.pt")


def sample_args(out, *extra):
    return ["--res", "256", "--num-samples", "5", "--sample-batch", "2", "--device", "cpu", "--out", str(out), *extra]


def test_sampling_writes_the_adm_npz_and_a_grid(student_ckpt, vae_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert ff.main(["--student", student_ckpt, "--vae", vae_dir, "--cfg", "1.5", *sample_args(out)]) == 0
    assert sorted(os.listdir(out)) == ["grid.png", "samples.npz"]  # no part files left behind
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (5, 256, 256, 3) and images.dtype == np.uint8 and labels.shape == (5,)
    assert images.std() > 0
    # the same images as decoding the one-step samples by hand: batch i's noise and labels from (seed, i)
    student = sit.load_teacher(student_ckpt, 256)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_dir)
    g = torch.Generator().manual_seed(0 * 1_000_003 + 2)  # the third batch: sample 4
    z4, y4 = torch.randn((1, 4, 32, 32), generator=g), torch.randint(0, 1000, (1,), generator=g)
    x4 = ff.sample_one_step(student, z4, y4, torch.full((1,), 1.5))
    assert labels[4] == y4.item()
    assert np.abs(ff.decode(vae, x4)[0].astype(int) - images[4].astype(int)).max() <= 1
    assert "1 network call(s) per sample" in capsys.readouterr().out


def test_without_a_vae_the_latents_are_written_and_the_teacher_uses_the_same_seeds(student_ckpt, teacher_file,
                                                                                   tmp_path, capsys):
    assert ff.main(["--student", student_ckpt, *sample_args(tmp_path / "st")]) == 0
    assert "wrote latents, not images" in capsys.readouterr().out
    assert ff.main(["--teacher", teacher_file, "--sampler", "ode", "--steps", "2", *sample_args(tmp_path / "te")]) == 0
    with np.load(tmp_path / "st" / "latents.npz") as a, np.load(tmp_path / "te" / "latents.npz") as b:
        assert a["arr_0"].shape == b["arr_0"].shape == (5, 4, 32, 32) and a["arr_0"].dtype == np.float32
        assert np.array_equal(a["arr_1"], b["arr_1"])  # same labels (and noise) on the same seed


def test_two_processes_write_the_same_samples_as_one(student_ckpt, tmp_path):
    args = ["--student", student_ckpt, "--res", "256", "--num-samples", "7", "--sample-batch", "2",
            "--device", "cpu"]
    assert run_cli(*args, "--out", str(tmp_path / "one")).returncode == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             SCRIPT, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "two")) == ["latents.npz"]
    with np.load(tmp_path / "one" / "latents.npz") as a, np.load(tmp_path / "two" / "latents.npz") as b:
        assert np.array_equal(a["arr_1"], b["arr_1"])
        # the same batches through the same kernels in other processes: at most float32 rounding of their scale
        assert_close_at_scale(a["arr_0"], b["arr_0"], 1e-6, "latents of one and two processes")


def test_samples_are_scored_by_fid_when_a_reference_is_given(student_ckpt, vae_dir, tmp_path, monkeypatch, capsys):
    import fid
    torch.manual_seed(0)
    torch.save(fid.FIDInception().state_dict(), tmp_path / "inception.pth")
    np.savez(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    # a random Inception's features hardly depend on the image, and its 2048-d root is slow: PixelInception's
    # features do, so the distance is a real one between the samples and the reference (0 if one set were scored
    # against itself)
    monkeypatch.setattr(fid, "load_inception", lambda path, device="cpu": PixelInception())
    assert ff.main(["--student", student_ckpt, "--vae", vae_dir, "--fid-ref", str(tmp_path / "ref.npz"),
                    "--fid-weights", str(tmp_path / "inception.pth"), *sample_args(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    metrics = json.load(open(tmp_path / "s" / "fid.json"))
    assert metrics["num_samples"] == 5 and metrics["fid"] > 1e-6
    assert f"FID: {metrics['fid']}   [FID (5 samples)]" in printed and "FID-50K" not in printed


# ---------------------------------------------------------------------------------- watching a long run

@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """A weights file (conftest.PixelInception stands in for the network it would hold) and a tiny reference
    batch of 6 random images: (weights, reference .npz)."""
    path = tmp_path_factory.mktemp("fid")
    torch.save({}, path / "inception.pth")
    np.savez(path / "ref.npz", np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    return str(path / "inception.pth"), str(path / "ref.npz")


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """The tiny SiT at 64 px (8 x 8 latents): previews decode 64 images, 16 times cheaper than at 256 px."""
    torch.manual_seed(0)
    model = sit.build("T/2", 64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("teacher64") / "tiny64.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def watch_args(teacher, out, steps, *extra):
    return train_args(teacher, out, steps, *extra, res=64)


def watch_flags(vae_dir, fid_files, fid_every=4):
    weights, ref = fid_files
    return ["--preview-every", "2", "--keep-every", "2", "--fid-every", str(fid_every), "--fid-samples", "4",
            "--sample-batch", "2", "--cfg", "1.5", "--vae", vae_dir, "--fid-ref", ref, "--fid-weights", weights]


def test_previews_snapshots_and_scores_leave_the_training_bit_for_bit_alone(small_teacher, vae_dir, fid_files, tmp_path,
                                                                              monkeypatch, capsys):
    import fid
    monkeypatch.setattr(fid, "load_inception", lambda path, device="cpu": PixelInception())
    watched, plain, resumed = tmp_path / "watched", tmp_path / "plain", tmp_path / "resumed"
    flags = watch_flags(vae_dir, fid_files, fid_every=2)
    assert ff.main(watch_args(small_teacher, watched, 4, *flags)) == 0
    assert ff.main(watch_args(small_teacher, plain, 4)) == 0
    assert ff.main(watch_args(small_teacher, resumed, 2, *flags)) == 0
    assert ff.main(watch_args(small_teacher, resumed, 4, *flags, "--resume")) == 0
    a, b, c = (load_ckpt(d / "ckpt.pt") for d in (watched, plain, resumed))
    for key in ("student", "ema", "g_psi"):  # watching draws nothing from the training's random stream
        assert same_weights(a[key], b[key]) and same_weights(a[key], c[key]), key
    previews = ["step_0000002.png", "step_0000004.png"]
    assert sorted(os.listdir(watched / "preview")) == previews and not os.path.exists(plain / "preview")
    for name in previews:  # the same noise and labels at every preview, after a resume too
        assert (watched / "preview" / name).read_bytes() == (resumed / "preview" / name).read_bytes()
    assert (watched / "preview" / previews[0]).read_bytes() != (watched / "preview" / previews[1]).read_bytes()
    assert sorted(os.listdir(watched / "snapshots")) == ["ema_0000002.pt", "ema_0000004.pt", "ema_best.pt"]
    last = sit.load_teacher(str(watched / "snapshots" / "ema_0000004.pt"), resolution=None)
    assert last.inputs == ("s", "gamma") and same_weights(last.state_dict(), a["ema"])
    assert sit.load_teacher(str(watched / "snapshots" / "ema_0000002.pt"), resolution=64).input_size == 8
    scores = {d: [e for e in map(json.loads, open(d / "log.jsonl")) if "fid" in e] for d in (watched, resumed)}
    assert [e["step"] for e in scores[watched]] == [2, 4] and scores[watched] == scores[resumed]
    assert all(e["fid"] > 0 and e["inception_score"] >= 1 and e["fid_samples"] == 4 for e in scores[watched])
    assert scores[watched][0]["fid"] != scores[watched][1]["fid"]  # the score follows the student
    best = min(scores[watched], key=lambda e: e["fid"])
    assert scores[watched][-1]["best_fid"] == best["fid"] and scores[watched][-1]["best_step"] == best["step"]
    assert f"step 4: fid {scores[watched][-1]['fid']:.4g}" in capsys.readouterr().out


def test_the_preview_inputs_are_fixed_for_a_run_and_spread_over_the_classes():
    cfg = ff.Config(cfg=1.5, seed=3)
    torch.manual_seed(0)
    z, y, gamma = ff.preview_inputs(1000, (4, 32, 32), cfg, "cpu")
    state = torch.get_rng_state()
    torch.manual_seed(1)
    again = ff.preview_inputs(1000, (4, 32, 32), cfg, "cpu")
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(1).get_state())  # the global stream is untouched
    assert torch.equal(z, again[0]) and torch.equal(y, again[1]) and not torch.equal(state, torch.get_rng_state())
    assert len(set(y.tolist())) == 64 and y.min() == 0 and y.max() < 1000 and torch.all(gamma == 1.5)
    assert not torch.equal(z, ff.preview_inputs(1000, (4, 32, 32), ff.Config(cfg=1.5, seed=4), "cpu")[0])


def test_two_processes_write_each_preview_snapshot_and_score_once(small_teacher, vae_dir, fid_files, tmp_path):
    # the subprocesses score with PixelInception too: a sitecustomize on their path patches fid before freeflow runs
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import conftest, fid\nfid.load_inception = lambda path, device='cpu': conftest.PixelInception()\n")
    out = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             SCRIPT, *watch_args(small_teacher, out, 4, *watch_flags(vae_dir, fid_files))],
                            capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(patch), ROOT, os.path.join(ROOT, "tests")])})
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "preview", "snapshots"]  # no temporary files left
    assert sorted(os.listdir(out / "preview")) == ["step_0000002.png", "step_0000004.png"]
    assert sorted(os.listdir(out / "snapshots")) == ["ema_0000002.pt", "ema_0000004.pt", "ema_best.pt"]
    scores = [e for e in map(json.loads, open(out / "log.jsonl")) if "fid" in e]
    assert [e["step"] for e in scores] == [4] and scores[0]["fid_samples"] == 4  # two shares of 2, one line
    assert result.stdout.count("step 4: fid") == 1


@pytest.mark.parametrize("extra, message", [
    (["--fid-every", "2"], "--fid-every scores decoded images against a reference batch: give --fid-ref"),
    (["--fid-every", "2", "--fid-ref", "REF", "--vae", "VAE"], "--vae VAE is not a diffusers model directory"),
    (["--preview-every", "-1"], "--preview-every must be an integer >= 0 (0: off) (got -1)."),
    (["--keep-every", "1.5"], "--keep-every: invalid int value"),
    (["--fid-samples", "1"], "--fid-samples must be at least 2 (a Fréchet distance needs two samples) (got 1)."),
])
def test_watching_refusals_are_one_sentence_and_write_nothing(teacher_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) if "invalid" in message else contextlib.nullcontext():
        assert ff.main(train_args(teacher_file, out, 2, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists(), err


@pytest.fixture(scope="module")
def verifier_files(tmp_path_factory):
    """Random Inception weights and a label map in the TF graph's format over 1000 made-up synsets, whose
    output indices are a shuffled 1..1000."""
    import fid
    path = tmp_path_factory.mktemp("verifier")
    torch.manual_seed(0)
    torch.save(fid.FIDInception().state_dict(), path / "inception.pth")
    order = np.random.default_rng(0).permutation(1000) + 1
    (path / "labels.pbtxt").write_text("# LabelMap\n" + "".join(
        f'entry {{\n  target_class: {order[i]}\n  target_class_string: "n{i:08d}"\n}}\n' for i in range(1000)))
    return str(path / "inception.pth"), str(path / "labels.pbtxt"), order


def best_of_args(student_ckpt, teacher_file, vae_dir, verifier_files, n="3"):
    return ["--student", student_ckpt, "--teacher", teacher_file, "--sampler", "ode", "--steps", "2", "--best-of", n,
            "--cfg", "1.5", "--vae", vae_dir, "--fid-weights", verifier_files[0], "--inception-labels",
            verifier_files[1]]


def test_best_of_n_keeps_the_verifiers_argmax_and_runs_the_teacher_on_it(student_ckpt, teacher_file, vae_dir,
                                                                         verifier_files, tmp_path, capsys):
    import fid
    out = tmp_path / "b"
    assert ff.main([*best_of_args(student_ckpt, teacher_file, vae_dir, verifier_files), *sample_args(out)]) == 0
    # NFE: 3 one-step previews, then 2 Euler steps of the teacher: t = 1 lies outside the guidance interval
    # [0, 0.7] (1 call), t = 0.5 inside it (2 calls)
    assert "(3 student + 3 teacher = 6 network call(s) per sample, γ = 1.5)" in capsys.readouterr().out
    with np.load(out / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    # sample 4 (batch 2) by hand: its noise and label, then 3 candidates from the same generator
    student, teacher = sit.load_teacher(student_ckpt, 256), sit.load_teacher(teacher_file, 256)
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_dir)
    g = torch.Generator().manual_seed(0 * 1_000_003 + 2)
    torch.randn((1, 4, 32, 32), generator=g)
    y4 = torch.randint(0, 1000, (1,), generator=g)
    candidates = torch.randn((3, 4, 32, 32), generator=g)
    previews = ff.sample_one_step(student, candidates, y4.repeat(3), torch.full((3,), 1.5))
    inception = fid.load_inception(verifier_files[0])
    logits = inception.features(torch.from_numpy(ff.decode(vae, previews)).permute(0, 3, 1, 2).float())[2]
    sorted_synsets = [f"n{i:08d}" for i in range(1000)]  # the made-up synsets are already in sorted order
    column = int(verifier_files[2][sorted_synsets.index(f"n{y4.item():08d}")])
    best = torch.log_softmax(logits.double(), 1)[:, column].argmax()
    x4, _ = ff.sample_ode(teacher, candidates[best][None], y4, 2, 1.5, (0.0, 0.7))
    assert labels[4] == y4.item()
    assert np.abs(ff.decode(vae, x4)[0].astype(int) - images[4].astype(int)).max() <= 1
    # and not the teacher on another candidate (the choice matters for this check to mean anything)
    others = [ff.decode(vae, ff.sample_ode(teacher, candidates[i][None], y4, 2, 1.5, (0.0, 0.7))[0])[0]
              for i in range(3) if i != best]
    assert all(np.abs(o.astype(int) - images[4].astype(int)).max() > 1 for o in others)


def test_best_of_n_on_two_processes_writes_the_same_samples_as_one(student_ckpt, teacher_file, vae_dir,
                                                                    verifier_files, tmp_path):
    args = [*best_of_args(student_ckpt, teacher_file, vae_dir, verifier_files, n="2"), "--res", "256",
            "--num-samples", "3", "--sample-batch", "1", "--device", "cpu"]
    assert run_cli(*args, "--out", str(tmp_path / "one")).returncode == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             SCRIPT, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_1"], b["arr_1"])
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1


def test_best_of_n_refusals_are_one_sentence(student_ckpt, teacher_file, vae_dir, verifier_files, tmp_path, capsys):
    full = best_of_args(student_ckpt, teacher_file, vae_dir, verifier_files)
    out = sample_args(tmp_path / "s")
    without = lambda flag: [a for i, a in enumerate(full) if flag not in (a, full[i - 1])]  # noqa: E731
    assert "--best-of N needs --student CKPT" in one_error(capsys, [*without("--student"), *out])
    assert "--best-of N needs --student CKPT" in one_error(capsys, [*without("--teacher"), *out])
    assert "--best-of must be a positive integer (got 0)" in one_error(capsys, [*full, "--best-of", "0", *out])
    assert "give --vae DIR, --fid-weights FILE and --inception-labels FILE" in one_error(
        capsys, [*without("--inception-labels"), *out])
    missing = [*without("--fid-weights"), "--fid-weights", str(tmp_path / "absent.pth"), *out]
    assert "absent.pth" in one_error(capsys, missing)
    (tmp_path / "bad.pbtxt").write_text('entry { target_class: 5 target_class_string: "n00000001" }')
    bad = [*without("--inception-labels"), "--inception-labels", str(tmp_path / "bad.pbtxt"), *out]
    assert "maps 1 synsets, not ImageNet's 1000" in one_error(capsys, bad)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------- bad input

def one_error(capsys, argv, code=2):
    assert ff.main(argv) == code
    err = capsys.readouterr().err
    # one sentence on a line of its own: a progress bar may precede it, closed first (its last "\r" redraw is
    # ended by "\n"; a message after a bare "\r" would be drawn over the bar)
    errors = [line for line in err.split("\n") if line.startswith("freeflow.py: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


def test_teacher_file_problems_are_one_line(teacher_file, tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("junk")
    assert "no such teacher file" in one_error(capsys, train_args(str(tmp_path / "absent.pt"), tmp_path / "o", 1))
    assert "not a readable PyTorch checkpoint" in one_error(capsys, train_args(str(tmp_path / "junk.pt"),
                                                                                 tmp_path / "o", 1))
    args = train_args(teacher_file, tmp_path / "o", 1)
    args[args.index("--res") + 1] = "512"
    assert "pass --res 256" in one_error(capsys, args)
    assert not (tmp_path / "o").exists()  # nothing written before the inputs were checked


def test_resume_refusals_name_the_problem(teacher_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert "no checkpoint at" in one_error(capsys, train_args(teacher_file, out, 2, "--resume"))
    assert ff.main(train_args(teacher_file, out, 2)) == 0
    capsys.readouterr()
    err = one_error(capsys, train_args(teacher_file, out, 4, "--resume", "--lr", "5e-4"))
    assert "--lr 0.0001" in err and "0.0005" in err
    assert "raise --steps" in one_error(capsys, train_args(teacher_file, out, 2, "--resume"))


def test_vae_that_is_not_an_autoencoder_is_refused(student_ckpt, tmp_path, capsys):
    assert "no config.json" in one_error(capsys, ["--student", student_ckpt, "--vae", str(tmp_path),
                                                  *sample_args(tmp_path / "s")])
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert "not an AutoencoderKL" in one_error(capsys, ["--student", student_ckpt, "--vae", str(tmp_path / "unet"),
                                                        *sample_args(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("value, message", [("0", "--num-samples must be a positive integer"),
                                            ("-3", "--num-samples must be a positive integer"),
                                            ("many", "invalid int value: 'many'")])
def test_num_samples_must_be_a_positive_integer(student_ckpt, tmp_path, value, message):
    result = run_cli("--student", student_ckpt, "--num-samples", value, "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_plain_teacher_is_not_taken_for_a_student(teacher_file, tmp_path, capsys):
    assert "not a FreeFlow student" in one_error(capsys, ["--student", teacher_file, *sample_args(tmp_path / "s")])


def test_cuda_asked_for_without_a_gpu(teacher_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = train_args(teacher_file, tmp_path / "o", 1)
    args[args.index("--device") + 1] = "cuda"
    assert "PyTorch sees no GPU" in one_error(capsys, args)


def test_a_nan_teacher_stops_at_step_1_without_a_checkpoint(teacher_file, tmp_path, capsys):
    state = torch.load(teacher_file, weights_only=True)
    state["final_layer.linear.bias"] = torch.full_like(state["final_layer.linear.bias"], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    err = one_error(capsys, train_args(str(tmp_path / "nan.pt"), tmp_path / "o", 3), code=1)
    assert "non-finite at step 1" in err and "no checkpoint was written" in err
    assert not (tmp_path / "o" / "ckpt.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--toy", "moons", "--teacher", "t.pt"], "give one or the other"),
    (["--student", "s.pt", "--teacher", "t.pt", "--num-samples", "4"], "not both"),
    (["--student", "s.pt", "--best-of", "4", "--num-samples", "4"], "--best-of N needs --student CKPT"),
    (["--teacher", "t.pt", "--num-samples", "4"], "needs --sampler"),
])
def test_one_thing_to_do_per_command(argv, message, tmp_path, capsys):
    assert message in one_error(capsys, argv + ["--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_batch_that_does_not_split_over_the_processes_is_refused(teacher_file, tmp_path):
    args = train_args(teacher_file, tmp_path / "o", 2)
    args[args.index("--batch-size") + 1] = "7"  # 5 predictor + 2 corrector rows: 5 does not split over 2
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             SCRIPT, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "does not split evenly over 2 processes" in result.stderr
    assert not (tmp_path / "o" / "ckpt.pt").exists()


# REPA's samplers (freeflow.sample_ode / sample_sde) on an analytic teacher


class GaussianLatents(torch.nn.Module):
    """Analytic teacher on (C, H, W) latents: data x ~ N(mu_y, sig²) per element, prior N(0, I).
    v(x, t) = -mu + (t - (1 - t) sig²) / sig_t² (x - (1 - t) mu), sig_t² = (1 - t)² sig² + t²; its flow
    from z is Phi(z) = mu + sig z at t = 0. The null class has mean 0."""

    num_classes = 2

    def __init__(self, sig=0.5):
        super().__init__()
        self.sig = sig
        self.mus = torch.tensor([1.0, -2.0, 0.0])

    def forward(self, x, t, y):
        mu = self.mus.to(x)[y][:, None, None, None]
        t = t.to(x)[:, None, None, None]
        sig_t2 = (1 - t) ** 2 * self.sig ** 2 + t ** 2
        return -mu + (t - (1 - t) * self.sig ** 2) / sig_t2 * (x - (1 - t) * mu)


def test_ode_samplers_land_on_the_closed_form_flow():
    teacher = GaussianLatents()
    z = torch.randn(16, 4, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1] * 8)
    exact = teacher.mus.double()[y][:, None, None, None] + teacher.sig * z
    err = lambda x: (x - exact).abs().max().item()  # noqa: E731
    (e1, nfe1), (e2, nfe2) = ((err(x), n) for x, n in (ff.sample_ode(teacher, z, y, steps=k) for k in (200, 400)))
    assert (nfe1, nfe2) == (200, 400) and 1.8 < e1 / e2 < 2.2  # Euler: first order
    (h1, nfe1), (h2, nfe2) = ((err(x), n) for x, n in (ff.sample_ode(teacher, z, y, k, heun=True) for k in (50, 100)))
    assert (nfe1, nfe2) == (99, 199) and 3.5 < h1 / h2 < 4.5 and h2 < 1e-3  # Heun: second order


def test_sde_sampler_reaches_the_data_distribution():
    teacher = GaussianLatents()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 4, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1] * 32)
    x, nfe = ff.sample_sde(teacher, z, y, steps=250, generator=g)
    assert nfe == 250
    for label, mu in ((0, 1.0), (1, -2.0)):
        samples = x[y == label]
        assert abs(samples.mean().item() - mu) < 0.02 and abs(samples.std().item() - teacher.sig) < 0.02
    # noise matters: another generator gives other samples from the same distribution
    other, _ = ff.sample_sde(teacher, z, y, steps=250, generator=torch.Generator().manual_seed(1))
    assert (other - x).abs().mean() > 0.05


def test_guidance_inside_the_interval_counts_two_calls_per_step():
    teacher = GaussianLatents()
    z, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    # 10 steps start at t = 1.0, 0.9, ..., 0.1: seven of them (0.7 ... 0.1) lie in [0, 0.75]
    assert ff.sample_ode(teacher, z, y, 10, gamma=2.0, interval=(0, 0.75))[1] == 10 + 7
    # Heun: 10 + 9 evaluations, guided: 7 first evaluations and 6 corrections (none on the last step)
    assert ff.sample_ode(teacher, z, y, 10, gamma=2.0, interval=(0, 0.75), heun=True)[1] == 19 + 7 + 6
    # SDE: linspace(1, 0.04, 10) then 0: the starts at 0.68, 0.57, ..., 0.04 are guided
    assert ff.sample_sde(teacher, z, y, 10, gamma=2.0, interval=(0, 0.75))[1] == 10 + 7
    assert ff.sample_ode(teacher, z, y, 10, gamma=1.0)[1] == 10
    # guidance changes the answer: v_γ = v(∅) + γ (v(c) - v(∅)) moves the class means away from 0
    plain, _ = ff.sample_ode(teacher, z, y, 50)
    guided, _ = ff.sample_ode(teacher, z, y, 50, gamma=2.0)
    assert guided[0].mean() > plain[0].mean() + 0.5 and guided[1].mean() < plain[1].mean() - 0.5
