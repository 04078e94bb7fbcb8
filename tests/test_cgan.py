"""Tests for cgan.py: the networks against the notebooks' sizes (parameter counts worked out by hand
below), each loss on a known value, the mismatch term, the latent optimisation against a plain
Adam written out here, presets and argument checks, foreign checkpoints, a --smoke run and an exact
resume through the command line, --help, and the evaluation adapter. CPU, a few seconds each."""
import json
import math
import os
import re
import sys

import pytest
import torch
import torch.nn as nn

import cgan
from common import InputError
from conftest import ROOT, commands

sys.path.insert(0, str(ROOT / "benchmarks"))
from adapters import cgan as cgan_adapter  # noqa: E402

# The notebooks' own lists, copied from the notebooks (not from cgan.py)
NOTEBOOK_23 = ["Arched_Eyebrows", "Bags_Under_Eyes", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair",
               "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Heavy_Makeup",
               "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Narrow_Eyes", "No_Beard", "Oval_Face",
               "Pointy_Nose", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Hat", "Young"]
EIGHT = ["Black_Hair", "Blond_Hair", "Eyeglasses", "Male", "No_Beard", "Smiling", "Wearing_Hat", "Young"]


def parse(argv):
    return cgan.parse_dataclass(cgan.Args, argv, "cgan.py", positive=cgan.POSITIVE)


def config(**changes):
    base = dict(arch="dcgan", g_input="vector", attr_join="input", img_size=32, crop=0,
                noise_dim=100, width=32, fc_hidden=128)
    return {**base, **changes}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# Networks: shapes and parameter counts at the notebooks' sizes
# ------------------------------------------------------------------------------------------------
def conv(k, cin, cout):  # TF conv / deconv: k·k·cin·cout weights + cout biases
    return k * k * cin * cout + cout


# G (generate_face*.ipynb `_generator`): fc -> 4x4x128, BN, deconv 64, BN, deconv 32, BN, deconv 3
G_BODY = 2048 + 2 * 128 + conv(4, 128, 64) + 2 * 64 + conv(4, 64, 32) + 2 * 32 + conv(4, 32, 3)
# D (`_discriminator`): conv 32, conv 64 + BN, conv 128 + BN, then an FC to one logit
D_BODY = conv(4, 32, 64) + 2 * 64 + conv(4, 64, 128) + 2 * 128 + 1


@pytest.mark.parametrize("g_input,join,attrs,g_count,d_count", [
    # generate_face1122.ipynb: vector G, attribute cube on D's input, 8 attributes
    ("vector", "input", 8, (100 + 8) * 2048 + G_BODY, conv(4, 3 + 8, 32) + D_BODY + 2048),
    # generate_face.ipynb / _mismatch: attributes at D's last FC, 1 attribute (Male)
    ("vector", "last", 1, (100 + 1) * 2048 + G_BODY, conv(4, 3, 32) + D_BODY + 2048 + 1),
    # generate_face_interactive_1122.ipynb: G reads a 32x32x3 noise image beside 2 attribute planes
    ("cube", "input", 2, 32 * 32 * (3 + 2) * 2048 + G_BODY, conv(4, 3 + 2, 32) + D_BODY + 2048),
])
def test_dcgan_sizes_are_the_notebooks(g_input, join, attrs, g_count, d_count):
    generator, discriminator = cgan.build_models(config(g_input=g_input, attr_join=join), attrs)
    assert (n_params(generator), n_params(discriminator)) == (g_count, d_count)
    noise = cgan.sample_noise(config(g_input=g_input), 3)
    assert noise.shape == ((3, 3, 32, 32) if g_input == "cube" else (3, 100))
    a = torch.randint(0, 2, (3, attrs)).float()
    images = generator(noise, a)
    assert images.shape == (3, 3, 32, 32)
    assert discriminator(images, a).shape == (3,)


def test_dcgan_layers_follow_the_notebooks():
    """D: conv, LReLU, conv, BN, LReLU, conv, BN, LReLU (BatchNorm after conv2 and conv3 only);
    G: LeakyReLU 0.2 everywhere, no ReLU; BN as TF's (decay 0.99 -> momentum 0.01, eps 1e-3)."""
    generator, discriminator = cgan.build_models(config(), 8)
    kinds = [type(m).__name__ for m in discriminator.convs]
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d",
                     "BatchNorm2d", "LeakyReLU"]
    acts = [m for m in generator.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert len(acts) == 3 and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in acts)
    for bn in [m for m in (*generator.modules(), *discriminator.modules()) if isinstance(m, nn.BatchNorm2d)]:
        assert (bn.momentum, bn.eps) == (0.01, 1e-3)
    weights = torch.cat([m.weight.flatten() for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert abs(weights.std().item() - 0.02) < 0.002  # N(0, 0.02)


def test_fc_baseline_is_the_readme_and_cgan_d1107_sizes():
    """README: 2-layer FC G and D on the unresized 178x218x3 frame + 23 attributes;
    cgan_d1107.ipynb: h_dim 128, X_dim 116412, z ~ U(−1, 1)."""
    x_dim = 178 * 218 * 3
    assert x_dim == 116412
    generator, discriminator = cgan.build_models(config(arch="fc", img_size=0), 23)
    assert n_params(generator) == (100 + 23) * 128 + 128 + 128 * x_dim + x_dim
    assert n_params(discriminator) == (x_dim + 23) * 128 + 128 + 128 + 1
    noise = cgan.sample_noise(config(arch="fc"), 4000, torch.Generator().manual_seed(0))
    assert noise.min() >= -1 and noise.max() <= 1 and abs(noise.var().item() - 1 / 3) < 0.01
    images = generator(noise[:2], torch.ones(2, 23))
    assert images.shape == (2, 3, 218, 178) and discriminator(images, torch.ones(2, 23)).shape == (2,)


def test_dcgan_noise_is_standard_normal():
    noise = cgan.sample_noise(config(), 4000, torch.Generator().manual_seed(0))
    assert abs(noise.var().item() - 1) < 0.01 and noise.min() < -3


def test_defaults_and_presets_are_the_notebooks_settings():
    """generate_face1122.ipynb (defaults), generate_face.ipynb (dcgan1),
    generate_face_interactive_1122.ipynb (cube), cgan_d1107.ipynb (fc), read off the notebooks."""
    args = cgan.Args()
    assert (args.arch, args.g_input, args.attr_join, args.mismatch, args.optimizer) == (
        "dcgan", "vector", "input", "complement", "adam")
    assert (args.lr, args.batch_size, args.noise_dim, args.width, args.img_size, args.crop) == (
        2e-4, 32, 100, 32, 32, 0)
    assert args.max_images == 20000 and args.steps == 50 * (20000 // 32) and args.fc_hidden == 128
    assert (cgan.INVERT_STEPS, cgan.INVERT_LR) == (100, 1e-2)
    presets = cgan.PRESETS
    assert {k: presets["dcgan1"][k] for k in ("attr_join", "optimizer", "lr", "attrs", "steps")} == dict(
        attr_join="last", optimizer="rmsprop", lr=1e-4, attrs=["Male"], steps=10 * 625)
    assert {k: presets["cube"][k] for k in ("g_input", "attr_join", "lr", "attrs", "steps")} == dict(
        g_input="cube", attr_join="input", lr=8e-5, attrs=["Male", "Smiling"], steps=10 * 625)
    assert {k: presets["fc"][k] for k in ("arch", "img_size", "lr", "batch_size", "attrs", "max_images", "steps")} == dict(
        arch="fc", img_size=0, lr=8e-5, batch_size=16, attrs=["notebook23"], max_images=10000, steps=1000)


@pytest.mark.parametrize("max_images", [8, 0])
def test_training_sees_only_the_first_max_images_training_files(max_images, tmp_path, monkeypatch):
    """The notebooks' `num_of_img`: every batch is drawn from the first N training files by name
    (images, labels and names alike); 0 keeps the whole split."""
    seen, get_batch = [], cgan.common.get_batch

    def spy(data, *args, **kwargs):
        seen.append(data)
        return get_batch(data, *args, **kwargs)

    monkeypatch.setattr(cgan.common, "get_batch", spy)
    cgan.main(["--smoke", "--max-images", str(max_images), "--steps", "2", "--out", str(tmp_path / "run")])
    split = cgan.common.load_celeba("demo:16", EIGHT, "train", 32, None, verbose=False)
    order = sorted(range(len(split.files)), key=lambda i: split.files[i])
    keep = order[:max_images or None]
    assert len(seen) == 2 and len(keep) == (max_images or len(split.files)) < 400
    for data in seen:
        assert data.files == [split.files[i] for i in keep]
        assert torch.equal(data.labels, split.labels[keep])
        assert torch.equal(data.images, split.images[keep])


def test_attribute_lists_are_the_notebooks():
    assert cgan.NOTEBOOK_23 == NOTEBOOK_23
    assert cgan.Args().attrs == EIGHT
    args = cgan.configure(parse(["--attrs", "notebook23", "--preset", "paper"]), torch.device("cpu"))
    assert args.attrs == NOTEBOOK_23


# ------------------------------------------------------------------------------------------------
# Losses, the mismatch term, the two steps
# ------------------------------------------------------------------------------------------------
def test_loss_terms_have_their_known_values():
    logit = torch.tensor([2.0, 0.0])
    assert cgan.loss_d_real(logit).item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2)
    assert cgan.loss_d_fake(logit).item() == pytest.approx((math.log(1 + math.exp(2)) + math.log(2)) / 2)
    assert cgan.loss_d_mismatch(logit).item() == pytest.approx(cgan.loss_d_fake(logit).item())
    assert cgan.loss_g(logit).item() == pytest.approx(cgan.loss_d_real(logit).item())
    # tf.nn.l2_loss on [0, 1] pixels: −1 vs +1 in our range is 0 vs 1 there: ½·1² per value
    generated, target = -torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert cgan.loss_latent(generated, target).item() == pytest.approx(0.5 * 2 * 3 * 4 * 4)
    assert cgan.loss_latent(target * 0.5, target).item() == pytest.approx(0.5 * 0.25 ** 2 * 96)


def test_mismatched_attributes_flip_every_attribute():
    attrs = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.equal(cgan.mismatched_attributes(attrs), torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))


def test_rolled_mismatch_takes_another_rows_attributes_never_its_own():
    torch.manual_seed(0)
    attrs = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 1, 1]])
    wrong = cgan.mismatched_attributes(attrs, "roll")
    assert torch.equal(wrong[[0, 1, 3]], attrs[[3, 0, 2]])  # the previous row's attributes
    assert (wrong[2] != attrs[1]).sum() == 1  # row 2 equals row 1: exactly one attribute flipped
    same = cgan.mismatched_attributes(torch.ones(5, 4), "roll")
    assert torch.equal((same != 1).sum(1), torch.ones(5, dtype=torch.long))


def test_d_step_takes_the_mismatch_term_on_real_images_with_wrong_attributes():
    """d_step's three terms recomputed here from separate D calls (each its own BN batch)."""
    torch.manual_seed(0)
    _, discriminator = cgan.build_models(config(width=8), 3)
    real, fake = torch.rand(6, 3, 32, 32) * 2 - 1, torch.rand(6, 3, 32, 32) * 2 - 1
    attrs = torch.randint(0, 2, (6, 3)).float()
    bce = nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        want_real = bce(discriminator(real, attrs), torch.ones(6)).item()
        want_fake = bce(discriminator(fake, attrs), torch.zeros(6)).item()
        want_mis = bce(discriminator(real, 1 - attrs), torch.zeros(6)).item()
    opt = torch.optim.SGD(discriminator.parameters(), 0.0)
    stats = cgan.d_step(discriminator, opt, real, attrs, 1 - attrs, fake, lambda: torch.autocast("cpu", enabled=False))
    assert stats["d_real"].item() == pytest.approx(want_real, abs=1e-6)
    assert stats["d_fake"].item() == pytest.approx(want_fake, abs=1e-6)
    assert stats["d_mismatch"].item() == pytest.approx(want_mis, abs=1e-6)
    assert stats["d_loss"].item() == pytest.approx(want_real + want_fake + want_mis, abs=1e-5)


def test_d_step_leaves_g_alone_and_g_step_leaves_d_alone():
    torch.manual_seed(0)
    generator, discriminator = cgan.build_models(config(width=8, noise_dim=8), 2)
    args = cgan.Args(lr=1e-2)
    opt_g, opt_d = cgan.make_optimizer(generator.parameters(), args), cgan.make_optimizer(discriminator.parameters(), args)
    real, attrs, noise = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([[1.0, 0], [0, 1]] * 2), torch.randn(4, 8)
    no_amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    g_before = [p.clone() for p in generator.parameters()]
    d_before = [p.clone() for p in discriminator.parameters()]
    cgan.d_step(discriminator, opt_d, real, attrs, 1 - attrs, generator(noise, attrs).detach(), no_amp)
    assert all(torch.equal(a, b) for a, b in zip(g_before, generator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(d_before, discriminator.parameters()))
    d_after = [p.clone() for p in discriminator.parameters()]
    cgan.g_step(generator, discriminator, opt_g, noise, attrs, no_amp)
    assert all(torch.equal(a, b) for a, b in zip(d_after, discriminator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(g_before, generator.parameters()))


def test_train_step_updates_d_then_g_against_the_updated_d():
    """L_D from the networks before the step; L_G from the fakes of the old G judged by the NEW D."""
    import copy
    torch.manual_seed(0)
    generator, discriminator = cgan.build_models(config(width=8, noise_dim=8), 2)
    args = cgan.Args(lr=1e-2)
    opt_g, opt_d = cgan.make_optimizer(generator.parameters(), args), cgan.make_optimizer(discriminator.parameters(), args)
    real, attrs, noise = torch.rand(4, 3, 32, 32) * 2 - 1, torch.tensor([[1.0, 0], [0, 1]] * 2), torch.randn(4, 8)
    g_old, d_old = copy.deepcopy(generator), copy.deepcopy(discriminator)
    stats = cgan.train_step(generator, discriminator, opt_g, opt_d, real, attrs, noise, args,
                            lambda: torch.autocast("cpu", enabled=False))
    bce = nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        fake = g_old(noise, attrs)
        want_d = (bce(d_old(real, attrs), torch.ones(4)) + bce(d_old(fake, attrs), torch.zeros(4))
                  + bce(d_old(real, 1 - attrs), torch.zeros(4))).item()
        want_g = bce(discriminator(fake, attrs), torch.ones(4)).item()
    assert stats["d_loss"].item() == pytest.approx(want_d, abs=1e-5)
    assert stats["g_loss"].item() == pytest.approx(want_g, abs=1e-5)
    assert not torch.equal(generator.fc.weight, g_old.fc.weight)


def test_rmsprop_is_tensorflow_1s():
    """TF 1 RMSPropOptimizer, first step from v = 1: v = 0.9 + 0.1·g², θ −= lr·g/√v (TF adds ε = 1e-10
    under the root, PyTorch after it: here both vanish below float32's resolution)."""
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = cgan.make_optimizer([weight], cgan.Args(optimizer="rmsprop", lr=0.1))
    (weight * torch.tensor([3.0, 0.5])).sum().backward()
    optimizer.step()
    g = torch.tensor([3.0, 0.5])
    assert torch.allclose(weight.detach(), torch.tensor([1.0, -2.0]) - 0.1 * g / torch.sqrt(0.9 + 0.1 * g ** 2))


# ------------------------------------------------------------------------------------------------
# Latent optimisation (generate_face_mismatch.ipynb: Adam on z, 100 steps, lr 1e-2, z0 ~ U[0, 1))
# ------------------------------------------------------------------------------------------------
class ToyGenerator(nn.Module):
    """G(z, a) = tanh(W z + V a) as a 1x4x4 'image' per face."""

    def __init__(self):
        super().__init__()
        self.noise_shape = (5,)
        self.w, self.v = nn.Linear(5, 48, bias=False), nn.Linear(2, 48, bias=False)

    def forward(self, noise, attrs):
        return torch.tanh(self.w(noise) + self.v(attrs)).view(-1, 3, 4, 4)


def reference_inversion(generator, images, attrs, steps=100, lr=1e-2):
    """The notebook's loop written out: plain Adam (β 0.9, 0.999, ε 1e-8) on z per face."""
    z = torch.rand((len(images), 5), generator=torch.Generator().manual_seed(0))
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    for t in range(1, steps + 1):
        z_var = z.clone().requires_grad_(True)
        loss = 0.5 * (((generator(z_var, attrs) + 1) / 2 - (images + 1) / 2) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, z_var)
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad ** 2
        z = z - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    return z


def test_latent_optimisation_matches_the_notebooks_loop_and_reduces_the_error():
    torch.manual_seed(1)
    generator = ToyGenerator().eval()
    attrs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    with torch.no_grad():
        images = generator(torch.randn(3, 5), attrs)
    code, recon, losses = cgan.invert(generator, images, attrs)
    assert len(losses) == 100
    assert torch.allclose(code, reference_inversion(generator, images, attrs), atol=1e-5)
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        final = 0.5 * (((generator(code, attrs) - images) / 2) ** 2).sum().item()
    assert cgan.loss_latent(recon, images).item() == pytest.approx(final, rel=1e-5)
    assert all(p.requires_grad for p in generator.parameters())  # G unfrozen again afterwards
    # each face's z sees only its own term: changing face 2 leaves the codes of faces 0 and 1 alone
    changed = images.clone()
    changed[2] = -changed[2]
    assert torch.allclose(cgan.invert(generator, changed, attrs)[0][:2], code[:2], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Presets, argument checks, foreign checkpoints
# ------------------------------------------------------------------------------------------------
def test_presets_never_override_what_the_command_line_gave():
    cpu = torch.device("cpu")
    args = cgan.configure(parse(["--smoke", "--batch-size", "32", "--no-amp"]), cpu)
    assert args.batch_size == 32 and args.steps == 4 and args.width == 8 and args.amp is False
    args = cgan.configure(parse([]), cpu)  # CPU + demo: the cpu-demo preset
    assert (args.preset, args.steps, args.width) == ("cpu-demo", 1000, 32)
    args = cgan.configure(parse(["--preset", "cube", "--lr", "1e-3"]), cpu)
    assert (args.g_input, args.attrs, args.lr) == ("cube", ["Male", "Smiling"], 1e-3)


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-4"], "--batch-size -4"),
    (["--lr", "-0.1"], "--lr -0.1"), (["--ckpt-every", "0"], "--ckpt-every 0"),
    (["--log-every", "0"], "--log-every 0"), (["--steps", "-1"], "--steps -1"),
    (["--arch", "vae"], "--arch"), (["--img-size", "48"], "--img-size 48"),
    (["--attrs", "Male", "male"], "repeated"), (["--preset", "smoke"], "--preset"),
    (["--lr", "nan"], "--lr nan"),
])
def test_bad_arguments_are_refused_before_any_data_is_read(argv, message, tmp_path):
    """--data points nowhere: the refusal must come from the argument check, not the loader."""
    with pytest.raises(InputError, match=re.escape(message)):
        cgan.main(argv + ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_checkpoints_of_other_scripts_are_refused_in_one_line(tmp_path, cli):
    foreign = tmp_path / "ckpt.pt"
    torch.save({"script": "attgan.py", "config": {}, "step": 1}, foreign)
    with pytest.raises(InputError, match="expected a checkpoint written by cgan.py, found attgan.py"):
        cgan.load(foreign)
    torch.save({"weights": torch.zeros(2)}, foreign)  # a plain torch file
    with pytest.raises(InputError, match="expected a checkpoint written by cgan.py, found another"):
        cgan.load(foreign)
    proc, foreign = cli["foreign"], cli.folder / "foreign" / "ckpt.pt"  # the same file, through the CLI
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("note:")]
    assert errors == [f"error: {foreign}: expected a checkpoint written by cgan.py, found another program"]


def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(smoke_run, cli):
    proc = cli["second_run"]  # `python cgan.py --smoke --out <the smoke run>`
    assert proc.returncode != 0 and "holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert cli.smoke_files_before == {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*")
                                      if p.is_file() and p.name != ".lock"}


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """L_G turns NaN after the step-2 checkpoint: the run stops at the step-3 log, exits with a
    FloatingPointError (one line from the command line), and ckpt.pt is still the finite step 2."""
    calls, loss_g = [], cgan.loss_g
    monkeypatch.setattr(cgan, "loss_g", lambda logit: loss_g(logit) * (float("nan") if calls.append(1) or len(calls) > 2 else 1))
    with pytest.raises(FloatingPointError, match="step 3"):
        cgan.main(["--smoke", "--out", str(tmp_path)])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 2 and all(v.isfinite().all() for v in state["generator"].values() if v.is_floating_point())


def test_help_through_the_command_line(cli):
    """`python cgan.py --help` (the script has no sub-commands)."""
    assert cli["help"].returncode == 0
    out = cli["help"].stdout
    for option in ("--g-input", "--attr-join", "--preset", "notebook23", "--crop"):
        assert option in out
    assert "usage: cgan.py" in out


# ------------------------------------------------------------------------------------------------
# The command line: --smoke, exact resume; the evaluation adapter
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(cgan_smoke):
    """`python cgan.py --smoke` (conftest.py's session run, shared with tests/test_benchmarks.py)."""
    return cgan_smoke[0]


class Commands(dict):
    """name -> CompletedProcess of each command line below; .folder, .smoke_files_before."""


@pytest.fixture(scope="module")
def cli(smoke_run, tmp_path_factory, face_attr_cache):
    """This file's command lines, in order, in ONE fresh interpreter (conftest.commands): --help,
    --resume onto a plain torch file, a second run into the smoke run's folder, and an exact
    resume (2 steps, then on to 4; then a resume with another preset, refused)."""
    folder = tmp_path_factory.mktemp("cgan_cli")
    (folder / "foreign").mkdir()
    torch.save({"weights": torch.zeros(2)}, folder / "foreign" / "ckpt.pt")  # a plain torch file
    calls = {"help": ["--help"],
             "foreign": ["--smoke", "--resume", "--out", folder / "foreign"],
             "second_run": ["--smoke", "--out", smoke_run],
             "first_2": ["--smoke", "--steps", 2, "--out", folder / "resumed"],
             "resume_4": ["--smoke", "--steps", 4, "--resume", "--out", folder / "resumed"],
             "refused": ["--smoke", "--steps", 6, "--resume", "--preset", "cube", "--out", folder / "resumed"]}
    result = Commands()
    result.folder = folder
    result.smoke_files_before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*")
                                 if p.is_file() and p.name != ".lock"}
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    procs = commands([("cgan.py", argv) for argv in calls.values()], env, folder / "driver")
    result.update(zip(calls, procs))
    return result


def test_smoke_run_writes_every_output(smoke_run):
    lines = (smoke_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"d_loss", "d_real", "d_fake", "d_mismatch", "g_loss", "p_real", "p_fake", "p_mismatch"} <= set(records[0])
    for r in records:
        assert r["d_loss"] == pytest.approx(r["d_real"] + r["d_fake"] + r["d_mismatch"], rel=1e-5)
    for name in ("ckpt.pt", "losses.png", "d_outputs.png", "samples/step_000002.png",
                 "samples/step_000004.png", "samples/invert_step_000004.png"):
        assert (smoke_run / name).is_file(), name
    state = torch.load(smoke_run / "ckpt.pt", weights_only=True)
    assert state["script"] == "cgan.py" and state["step"] == 4 and state["attr_names"] == EIGHT
    assert set(state) >= {"generator", "discriminator", "opt_g", "opt_d", "config"}


def test_resume_equals_an_uninterrupted_run(smoke_run, cli):
    for name in ("first_2", "resume_4"):  # `--steps 2`, then `--steps 4 --resume`
        assert cli[name].returncode == 0, cli[name].stderr[-3000:]
    resumed = torch.load(cli.folder / "resumed" / "ckpt.pt", weights_only=True)
    straight = torch.load(smoke_run / "ckpt.pt", weights_only=True)
    for net in ("generator", "discriminator"):
        for key, value in straight[net].items():
            assert torch.equal(value, resumed[net][key]), f"{net}.{key}"
    refused = cli["refused"]  # `--steps 6 --resume --preset cube`
    assert refused.returncode != 0 and "g_input" in refused.stderr and "Traceback" not in refused.stderr


def test_a_resume_with_other_max_images_is_refused(smoke_run):
    config = torch.load(smoke_run / "ckpt.pt", weights_only=True)["config"]
    assert config["max_images"] == 20000
    with pytest.raises(InputError, match="max_images=20000"):
        cgan.load_checkpoint(smoke_run / "ckpt.pt", {**config, "max_images": 7}, cgan.RESUME_MUST_MATCH)


def test_adapter_generates_and_edits_through_latent_optimisation(smoke_run):
    model = cgan_adapter.load(smoke_run / "ckpt.pt")
    generator, config, names = cgan.load(smoke_run / "ckpt.pt")
    assert model.attr_names == names == EIGHT and model.img_size == 32 and model.crop is None
    assert model.reconstruct is None and model.encode is None
    attrs = torch.randint(0, 2, (5, 8)).float()
    noise = cgan.sample_noise(config, 5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(model.generate(attrs, seed=3), generator(noise, attrs), atol=1e-6)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    target = 1 - attrs
    code = cgan.invert(generator, images, attrs)[0]
    with torch.no_grad():
        assert torch.allclose(model.edit(images, attrs, target), generator(code, target), atol=1e-5)
        # the cached z* belongs to those faces only: other faces are inverted afresh
        other = images.flip(0)
        assert torch.allclose(model.edit(other, attrs, target),
                              generator(cgan.invert(generator, other, attrs)[0], target), atol=1e-5)
