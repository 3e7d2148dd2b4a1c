"""Bad input loses nothing: a table of hostile but ordinary invocations of every entry point (freeflow.py's toy,
digits, ImageNet and sampling paths, fid.py, every `python -m toy.*` command), each in its own copy of a folder of
real files (a teacher, a distilled student, finished toy and digits runs, a VAE, damaged files of ours). Each must
exit non-zero with at most three lines and no traceback, and leave every file of the folder byte-identical (sha1)
with nothing added. The rows that need a read-only folder run in a subprocess without root's permission override
(setpriv), so that they mean the same as root and as any other user."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DIGITS_TINY

import fid
import freeflow as ff
import sit
from toy import converge, digits_ablations, digits_scan, guidance_scan, mismatch, plot_log, suite, w2_spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOONS = ["--steps", "4", "--batch-size", "16", "--teacher-steps", "20", "--eval-samples", "100", "--ckpt-every", "2",
         "--device", "cpu"]
IMAGENET = ["--res", "256", "--steps", "1", "--batch-size", "8", "--device", "cpu"]
SAMPLE = ["--res", "256", "--num-samples", "2", "--sample-batch", "2", "--device", "cpu"]


def tiny_vae(path, channels):
    import diffusers
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8,) * 4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=4).save_pretrained(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_run):
    """A folder of real files a user might point a command at, made once; every row gets its own copy."""
    w = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    teacher = sit.build("T/2", 256)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(teacher.state_dict(), w / "teacher.pt")
    cwd = os.getcwd()
    os.chdir(w)
    try:
        assert ff.main(["--teacher", "teacher.pt", "--out", "imagenet_run", *IMAGENET]) == 0  # an ImageNet distillation
        assert ff.main(["--toy", "moons", "--out", "moons", *MOONS]) == 0  # a finished toy run
    finally:
        os.chdir(cwd)
    tiny_vae(w / "vae", 4)
    tiny_vae(w / "vae2", 2)  # a VAE whose latents have 2 channels: a SiT student's 4 do not fit it
    digits = w / "digits"
    shutil.copytree(tiny_run[0], digits, ignore=shutil.ignore_patterns("preview", "snapshots"))
    shutil.copytree(digits, w / "damaged_digits")
    shutil.copytree(w / "moons", w / "damaged_moons")
    for run in ("damaged_digits", "damaged_moons"):  # cut off mid-write
        text = (w / run / "metrics.json").read_text()
        (w / run / "metrics.json").write_text(text[: len(text) // 2])
    (w / "other_dict").mkdir()
    torch.save({"foo": torch.ones(2)}, w / "other_dict" / "ckpt.pt")  # a ckpt.pt that is no training checkpoint
    np.save(w / "huge.npy", np.array([[1e308, 1e308], [-1e308, 0.0], [5e307, 1.0]] * 10))
    (w / "no_numbers").mkdir()
    (w / "no_numbers" / "log.jsonl").write_text('{"step": 1, "note": "x"}\n{"step": 2, "loss": "nan?"}\n')
    rng = np.random.default_rng(0)
    np.savez(w / "samples.npz", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    (w / "foreign_cnn").mkdir()
    (w / "foreign_cnn" / "digits_cnn_s0.pt").write_bytes(b"a user's file, not our classifier")
    return w


def snapshot(folder):
    """{relative path: sha1} of every file, and every folder, under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = "folder"
    return out


def complaint(err):
    """stderr without progress bars and warnings' source lines."""
    return [line for line in err.splitlines() if line.strip() and "%|" not in line and "it/s]" not in line]


def moons(*argv):
    return ["--toy", "moons", *MOONS, *argv]


def digits(*argv):
    return ["--toy", "digits", *DIGITS_TINY, *argv]


# (id, entry point, argv, what the one sentence says); paths are relative to the row's copy of the world
ROWS = [
    # freeflow.py --toy (2D)
    ("toy: --toy-teacher names a user's checkpoint", ff, moons("--toy-teacher", "imagenet_run/ckpt.pt", "--out", "m2"),
     "exists and is not a toy teacher cached by freeflow.py"),
    ("toy: --toy-teacher is a directory", ff, moons("--toy-teacher", "moons", "--out", "m2"), "is a directory"),
    ("toy: --resume with another teacher setting", ff, [*moons("--out", "moons", "--resume", "--steps", "8"),
                                                        "--teacher-steps", "21"], "written with --teacher-steps 20"),
    ("toy: --resume of a run at its end", ff, moons("--out", "moons", "--resume"), "raise --steps"),
    ("toy: --resume of a ckpt.pt that is no checkpoint", ff, moons("--out", "other_dict", "--resume", "--steps", "8"),
     "is not a FreeFlow training checkpoint"),
    ("toy: a new run where an ImageNet run is", ff, moons("--out", "imagenet_run"), "holds an ImageNet distillation"),
    ("toy: --out is a file", ff, moons("--out", "huge.npy"), "is a file, not a directory"),
    ("toy: points that overflow when standardised", ff, ["--toy", "huge.npy", *MOONS[:-4], "--out", "h"],
     "too large to standardise"),
    ("toy: --cfg below 0", ff, moons("--cfg", "-1", "--out", "o"), "--cfg must be a guidance scale >= 0"),
    ("toy: --compile with the JVP", ff, moons("--compile", "--out", "o"), "--compile cannot compile the 2D toy's"),
    ("toy: --compile-mode without --compile", ff, moons("--compile-mode", "max-autotune", "--out", "o"),
     "add --compile or drop --compile-mode"),
    ("toy: --preview-every on a 2D toy", ff, moons("--preview-every", "2", "--out", "o"), "watches image runs"),
    ("toy: an unknown toy", ff, ["--toy", "moon", "--out", "o"], "unknown toy 'moon'"),
    ("toy: a missing points file", ff, ["--toy", "absent.npy", "--out", "o"], "no such file: absent.npy"),
    ("toy: --states data on a 2D toy", ff, moons("--states", "data", "--out", "o"), "only --toy digits brings data"),
    ("toy: --r-range upside down", ff, moons("--r-range", "0.5", "0.2", "--out", "o"), "--r-range needs 0 <= LO < HI"),
    ("toy: --heun without the ODE sampler", ff, moons("--heun", "--out", "o"), "--heun is a step of the ODE sampler"),
    ("toy: --steps is not a number", ff, moons("--steps", "many", "--out", "o"), "invalid int value: 'many'"),
    ("toy: --extra-blocks on the 2D MLP", ff, moons("--extra-blocks", "2", "--out", "o"), "deepens a SiT student"),
    ("digits: --extra-blocks -1", ff, digits("--extra-blocks", "-1", "--out", "o"), "--extra-blocks must be an integer"),
    # freeflow.py --toy digits
    ("digits: --fid-samples 1", ff, digits("--fid-every", "2", "--fid-samples", "1", "--out", "o"), "at least 2"),
    ("digits: --states data with --loss corrector", ff, digits("--states", "data", "--loss", "corrector", "--out", "o"),
     "--loss sets FreeFlow's own training"),
    ("digits: --states data with --alpha", ff, digits("--states", "data", "--alpha", "2", "--out", "o"),
     "--alpha sets FreeFlow's own training"),
    ("digits: --augment-shift without --states data", ff, digits("--augment-shift", "2", "--out", "o"),
     "shapes the data of --states data"),
    ("digits: a width the heads do not divide", ff, digits("--width", "18", "--out", "o"), "width divisible by 4"),
    ("digits: --resume with another teacher setting", ff, [*digits("--out", "digits", "--resume", "--steps", "6"),
                                                           "--teacher-steps", "31"], "written with --teacher-steps 30"),
    ("digits: a foreign file where the classifier is cached", ff, digits("--out", "foreign_cnn"),
     "exists and is not a digits classifier cached by freeflow.py"),
    ("digits: --toy-teacher names a user's checkpoint", ff, digits("--toy-teacher", "imagenet_run/ckpt.pt", "--out", "o"),
     "exists and is not a toy teacher"),
    # freeflow.py --teacher (ImageNet distillation)
    ("imagenet: a FreeFlow student as --teacher", ff, ["--teacher", "imagenet_run/ckpt.pt", *IMAGENET, "--out", "o"],
     "is a FreeFlow student"),
    ("imagenet: a new run where an ImageNet run is", ff, ["--teacher", "teacher.pt", *IMAGENET, "--out",
                                                          "imagenet_run"], "continue it with --resume"),
    ("imagenet: --resume of a ckpt.pt that is no checkpoint", ff, ["--teacher", "teacher.pt", *IMAGENET, "--out",
                                                                   "other_dict", "--resume"], "not a FreeFlow training"),
    ("imagenet: --resume with another --lr", ff, ["--teacher", "teacher.pt", *IMAGENET[:-4], "--batch-size", "8",
                                                  "--device", "cpu", "--steps", "3", "--lr", "5e-4", "--out",
                                                  "imagenet_run", "--resume"], "was written with --lr"),
    ("imagenet: a digits checkpoint as --teacher", ff, ["--teacher", "digits/ckpt.pt", *IMAGENET, "--out", "o",
                                                        "--preview-every", "1"], "freeflow.py: error:"),
    ("imagenet: a VAE whose latents do not fit", ff, ["--teacher", "teacher.pt", *IMAGENET, "--vae", "vae2", "--out",
                                                      "o", "--preview-every", "1"], "latent channels"),
    ("imagenet: --vae is a file", ff, ["--teacher", "teacher.pt", *IMAGENET, "--vae", "teacher.pt", "--out", "o"],
     "not a diffusers model directory"),
    ("imagenet: --fid-every without a reference", ff, ["--teacher", "teacher.pt", *IMAGENET, "--fid-every", "1",
                                                       "--out", "o"], "give --fid-ref"),
    ("imagenet: --out is a file", ff, ["--teacher", "teacher.pt", *IMAGENET, "--out", "teacher.pt"], "is a file"),
    ("imagenet: --res 300", ff, ["--teacher", "teacher.pt", *IMAGENET[2:], "--res", "300", "--out", "o"],
     "freeflow.py: error:"),
    ("imagenet: --lr 2", ff, ["--teacher", "teacher.pt", *IMAGENET, "--lr", "2", "--out", "o"],
     "--lr must be a number in (0, 1]"),
    ("imagenet: --guidance-interval upside down", ff, ["--teacher", "teacher.pt", *IMAGENET, "--guidance-interval",
                                                       "0.8", "0.2", "--out", "o"], "needs LO <= HI"),
    ("imagenet: a missing teacher", ff, ["--teacher", "absent.pt", *IMAGENET, "--out", "o"], "no such teacher file"),
    # freeflow.py --student / --sampler (sampling)
    ("sample: a plain SiT as --student", ff, ["--student", "teacher.pt", *SAMPLE, "--out", "s"], "is a plain SiT"),
    ("sample: a VAE whose latents do not fit", ff, ["--student", "imagenet_run/ckpt.pt", *SAMPLE, "--vae", "vae2",
                                                    "--out", "s"], "latent channels"),
    ("sample: --sampler with --student", ff, ["--student", "imagenet_run/ckpt.pt", *SAMPLE, "--sampler", "sde",
                                              "--out", "s"], "--sampler ode|sde is the teacher's sampler"),
    ("sample: --heun with the SDE", ff, ["--teacher", "teacher.pt", *SAMPLE, "--sampler", "sde", "--heun", "--out", "s"],
     "--heun is a step of the ODE sampler"),
    ("sample: --num-samples 0", ff, ["--student", "imagenet_run/ckpt.pt", *SAMPLE, "--num-samples", "0", "--out", "s"],
     "--num-samples must be a positive integer"),
    ("sample: --fid-ref without --vae", ff, ["--student", "imagenet_run/ckpt.pt", *SAMPLE, "--fid-ref", "samples.npz",
                                             "--out", "s"], "give --vae DIR"),
    ("sample: --out is a file", ff, ["--student", "imagenet_run/ckpt.pt", *SAMPLE, "--out", "teacher.pt"], "is a file"),
    ("sample: --student and --teacher", ff, ["--student", "imagenet_run/ckpt.pt", "--teacher", "teacher.pt", *SAMPLE,
                                             "--out", "s"], "not both"),
    ("sample: the teacher without --sampler", ff, ["--teacher", "teacher.pt", *SAMPLE, "--out", "s"], "needs --sampler"),
    ("sample: a digits student at 256 px", ff, ["--student", "digits/ckpt.pt", *SAMPLE, "--out", "s"],
     "freeflow.py: error:"),
    ("sample: --best-of without a teacher", ff, ["--student", "imagenet_run/ckpt.pt", *SAMPLE, "--best-of", "2",
                                                 "--out", "s"], "--best-of N needs"),
    # fid.py
    ("fid: a missing sample batch", fid, ["absent.npz", "samples.npz"], "fid.py: error:"),
    ("fid: a checkpoint given as a sample batch", fid, ["teacher.pt", "samples.npz"], "fid.py: error:"),
    ("fid: --batch-size 0", fid, ["samples.npz", "samples.npz", "--batch-size", "0"], "--batch-size must be"),
    ("fid: --json in a missing folder", fid, ["samples.npz", "samples.npz", "--json", "nowhere/m.json"],
     "its folder does not exist"),
    ("fid: --json is a directory", fid, ["samples.npz", "samples.npz", "--json", "moons"], "it is a directory"),
    ("fid: --device bogus", fid, ["samples.npz", "samples.npz", "--device", "bogus"], "not a device PyTorch knows"),
    # python -m toy.suite, toy.digits_ablations, toy.mismatch, toy.converge
    ("suite: --only names no data set", suite, ["--only", "moon", "--out", "s"], "no data set 'moon'"),
    ("suite: --jobs 0", suite, ["--jobs", "0", "--out", "s"], "--jobs must be a positive integer"),
    ("suite: --claims of a folder without runs", suite, ["--claims", "moons"], "there are no runs under moons"),
    ("suite: --out is a file", suite, ["--out", "teacher.pt"], "is a file"),
    ("suite: a bad flag for every run", suite, ["--lr", "5", "--out", "s"], "--lr must be"),
    ("suite: a table of damaged runs", suite, ["--table-only", "--out", "damaged_suite"], "cannot be read"),
    ("ablations: --only names no variant", digits_ablations, ["--only", "nothing", "--out", "a"], "no variant 'nothing'"),
    ("ablations: --out is a file", digits_ablations, ["--out", "teacher.pt"], "is a file"),
    ("mismatch: --shifts 9", mismatch, ["--shifts", "0", "9", "--out", "m"], "--shifts takes pixels from 0 to 4"),
    ("mismatch: a FreeFlow flag the data-based runs would ignore", mismatch, ["--alpha", "2", "--out", "m"],
     "--alpha sets FreeFlow's own training"),
    ("mismatch: --fractions 2", mismatch, ["--fractions", "2", "--out", "m"], "--fractions are shares"),
    ("mismatch: --out is a file", mismatch, ["--out", "teacher.pt"], "is a file"),
    ("converge: --jobs 0", converge, ["--jobs", "0", "--out", "c"], "--jobs and --keep-every must be positive"),
    ("converge: --out is a file", converge, ["--out", "teacher.pt"], "is a file"),
    ("converge: a bad flag for every run", converge, ["--lr", "9", "--out", "c"], "--lr must be"),
    ("converge: --table-only with no runs", converge, ["--table-only", "--out", "moons"], "no runs with snapshots"),
    # python -m toy.digits_scan, toy.guidance_scan, toy.plot_log, toy.w2_spread
    ("digits_scan: a metrics.json cut off mid-write", digits_scan, ["damaged_digits"], "cannot be read as a run's"),
    ("digits_scan: a 2D toy run", digits_scan, ["moons"], "is not a finished digits run"),
    ("digits_scan: a folder without a run", digits_scan, ["vae"], "holds no finished digits run"),
    ("guidance_scan: a metrics.json cut off mid-write", guidance_scan, ["damaged_moons"], "cannot be read as a run's"),
    ("guidance_scan: a digits run", guidance_scan, ["digits"], "is a digits run"),
    ("plot_log: a log with no numbers", plot_log, ["no_numbers"], "no numbers to plot"),
    ("plot_log: --previews -1", plot_log, ["moons", "--previews", "-1"], "--previews must be an integer >= 0"),
    ("plot_log: a folder without a log", plot_log, ["vae"], "there is no"),
    ("w2_spread: --sets 1", w2_spread, ["--sets", "1", *moons("--out", "w")], "--sets must be at least 2"),
]


def run_row(module, argv, capsys):
    """(exit code, stderr) of module.main(argv), a usage error's SystemExit included; any other exception fails."""
    capsys.readouterr()
    try:
        code = module.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name, module, argv, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_sentence_and_touches_nothing(name, module, argv, message, world, tmp_path, monkeypatch,
                                                      capsys):
    here = tmp_path / "w"
    shutil.copytree(world, here)
    if "damaged runs" in name:  # a suite folder whose one finished run has a damaged metrics.json
        shutil.copytree(here / "damaged_moons", here / "damaged_suite" / "runs" / "moons__both")
    monkeypatch.chdir(here)
    before = snapshot(here)
    code, err = run_row(module, argv, capsys)
    lines = complaint(err)
    assert code not in (0, None), err
    assert "Traceback" not in err and 1 <= len(lines) <= 3 and message in lines[-1], err
    assert snapshot(here) == before  # nothing written, nothing changed


def test_the_table_covers_every_entry_point_with_sixty_rows_or_more():
    assert len(ROWS) >= 60
    assert {module for _, module, _, _ in ROWS} == {ff, fid, suite, digits_ablations, mismatch, converge, digits_scan,
                                                   guidance_scan, plot_log, w2_spread}


# --- read-only folders: the permission override dropped, as root or not ------------------------------


def unprivileged():
    """The prefix that runs a command without root's override of file permissions (setpriv), or [] for another
    user; None when this root has no setpriv (the rows are then skipped: as root, a read-only folder is writable)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if shutil.which("setpriv") else None


READ_ONLY_ROWS = [  # one per way a path is checked: a folder to make, an existing run's folder, a file's folder
    ("toy: a new run in a read-only folder", ["freeflow.py", *moons("--out", "ro/x")], "cannot be written"),
    ("toy: a finished run's read-only folder", ["freeflow.py", *moons("--out", "ro")], "cannot be written"),
    ("fid: --json in a read-only folder", ["fid.py", "samples.npz", "samples.npz", "--json", "ro/m.json"],
     "its folder is read-only"),
]


@pytest.mark.parametrize("name, argv, message", READ_ONLY_ROWS, ids=[r[0] for r in READ_ONLY_ROWS])
def test_a_read_only_output_is_refused_before_any_work(name, argv, message, world, tmp_path):
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("root without setpriv: a read-only folder cannot be made here")
    here = tmp_path / "w"
    shutil.copytree(world, here)
    shutil.copytree(here / "moons", here / "ro")
    before = snapshot(here)
    os.chmod(here / "ro", 0o555)
    try:
        script = [os.path.join(ROOT, argv[0])] if argv[0].endswith(".py") else argv[:2]
        rest = argv[1:] if argv[0].endswith(".py") else argv[2:]
        result = subprocess.run([*prefix, sys.executable, *script, *rest], cwd=here, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, timeout=300)
    finally:
        os.chmod(here / "ro", 0o755)
    lines = complaint(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert 1 <= len(lines) <= 3 and message in lines[-1], result.stderr
    assert snapshot(here) == before
