"""Tests for attgan.py: shapes against the official layer sizes, each loss on a hand-computed
case, where the gradient penalty is taken, the update alternation and the target shuffle, every
input of every term of L_D and L_G (a recording G, a critic known in closed form), the test-time
attribute rule, and the command line end to end (smoke run, exact resume, edit, the --slide strip,
the refusals of the shared plumbing, NaN guard, 2-process DDP that must agree exactly)."""
import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

import attgan
from attgan import Discriminator, Generator, InputError
from conftest import ROOT, commands

sys.path.insert(0, str(ROOT / "benchmarks"))
from adapters import attgan as attgan_adapter  # noqa: E402

torch.set_num_threads(1)
SMOKE = attgan.PRESETS["smoke"]


def smoke_args(**changes):
    """Args of the --smoke configuration, as training sees them."""
    return attgan.Args(**{**{k: v for k, v in SMOKE.items()}, **changes})


# Shapes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,shortcut,inject", [(64, 0, 0), (64, 4, 2), (128, 1, 1), (128, 0, 4)])
def test_generator_and_discriminator_shapes(size, shortcut, inject):
    g = Generator(5, n_layers=5, enc_dim=4, dec_dim=4, max_dim=32, shortcut_layers=shortcut,
                  inject_layers=inject)
    d = Discriminator(5, img_size=size, n_layers=5, dim=4, max_dim=32, fc_dim=16)
    images = torch.rand(2, 3, size, size) * 2 - 1
    maps = g.encode(images)
    assert [tuple(m.shape[1:]) for m in maps] == [(min(4 * 2 ** i, 32), size // 2 ** (i + 1),
                                                   size // 2 ** (i + 1)) for i in range(5)]
    attrs = attgan.signed(torch.randint(0, 2, (2, 5)).float(), 0.5)
    assert g(images, attrs).shape == (2, 3, size, size)
    score, logits = d(images)
    assert score.shape == (2,) and logits.shape == (2, 5)


def test_paper_networks_match_the_official_layer_sizes():
    """v1 models.py at 128 px, 13 attributes, shortcut 1, inject 1: counted by hand."""
    g, d = Generator(13), Discriminator(13)
    assert [m[0].in_channels for m in g.decoder] == [1024 + 13, 1024 + 512 + 13, 512, 256, 128]
    enc = sum(i * o * 16 + 2 * o for i, o in [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1024)])
    dec = sum(i * o * 16 + 2 * o for i, o in [(1037, 1024), (1549, 512), (512, 256), (256, 128)])
    dec += 128 * 3 * 16 + 3  # the last deconv has a bias and no norm
    assert sum(p.numel() for p in g.parameters()) == enc + dec
    trunk = enc  # same conv sizes; InstanceNorm's scale and shift replace BatchNorm's
    heads = 2 * (16384 * 1024 + 1024) + (1024 + 1) + (1024 * 13 + 13)
    assert sum(p.numel() for p in d.parameters()) == trunk + heads
    assert isinstance(d.adv_head[1], nn.LeakyReLU) and d.adv_head[1].negative_slope == 0.2


def test_an_image_size_the_networks_cannot_take_is_refused():
    with pytest.raises(InputError, match="multiple of 2\\^n_layers"):
        attgan.build_models(vars(smoke_args(img_size=40)), 4)


# Losses -------------------------------------------------------------------------------------------
class QuadraticCritic(nn.Module):
    """D(x) = s·½‖x‖² per image, so ∇D(x) = s·x: the penalty depends on WHERE it is taken."""

    def __init__(self, num_attrs=4):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(num_attrs))

    def forward(self, x):
        return self.s * 0.5 * x.flatten(1).pow(2).sum(1), self.bias.expand(len(x), -1)


class FixedFake(nn.Module):
    """A 'generator' that returns a fixed image and records the attributes it was given."""

    def __init__(self, fake):
        super().__init__()
        self.fake, self.seen, self.w = fake, [], nn.Parameter(torch.zeros(()))

    def forward(self, x, attr_input):
        self.seen.append(attr_input.clone())
        return self.fake + 0 * self.w


def test_gradient_penalty_is_taken_between_real_and_fake():
    real, fake = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    alpha = torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1, 1)
    critic = QuadraticCritic()
    penalty = attgan.gradient_penalty(lambda x: critic(x)[0], real, fake, alpha)
    points = [fake[0], 0.3 * real[1] + 0.7 * fake[1], real[2]]  # x̃ = α·x + (1 − α)·x̂, by hand
    expected = sum((p.norm() - 1) ** 2 for p in points) / 3
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)


def test_d_step_reports_the_penalty_of_its_own_fakes():
    """The whole D step on a known critic and a known G: its gp is the penalty between the real
    batch and THESE fakes (interpolating real with real, or fake with fake, gives another number)."""
    torch.manual_seed(0)
    real, fake = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4) * 3
    alpha = torch.rand(4, 1, 1, 1)
    d, g = QuadraticCritic(), FixedFake(fake)
    opt = torch.optim.SGD(d.parameters(), lr=0.0)
    attr_src = torch.randint(0, 2, (4, 4)).float()
    stats = attgan.d_step(g, d, opt, real, attr_src, attr_src.flip(0), alpha, smoke_args())
    points = alpha * real + (1 - alpha) * fake
    expected = ((points.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert stats["gp"].item() == pytest.approx(expected.item(), rel=1e-5)
    wasserstein = 0.5 * (real.flatten(1).pow(2).sum(1).mean() - fake.flatten(1).pow(2).sum(1).mean())
    assert stats["d_adv"].item() == pytest.approx(-wasserstein.item(), rel=1e-5)
    assert torch.equal(g.seen[0], attgan.signed(attr_src.flip(0), 0.5))  # fakes of the targets


def test_loss_terms_on_known_values():
    assert attgan.loss_adv_d(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])).item() == -2.0
    assert attgan.loss_adv_g(torch.tensor([1.0, 3.0])).item() == -2.0
    assert attgan.loss_rec(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)).item() == 0.5
    logits, attrs = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2  # −log σ(0), −log(1 − σ(2))
    assert attgan.loss_cls(logits, attrs).item() == pytest.approx(expected, rel=1e-6)


# The updates touch only their own network ---------------------------------------------------------
def tiny_nets():
    torch.manual_seed(0)
    g, d = attgan.build_models(vars(smoke_args()), 4)
    return g, d, torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())


def snapshot(module):
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_d_step_leaves_g_unchanged_and_g_step_leaves_d_unchanged():
    g, d, opt_g, opt_d = tiny_nets()
    images, attr_src = torch.rand(6, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (6, 4)).float()
    g_params, d_before = [p.detach().clone() for p in g.parameters()], snapshot(d)
    stats = attgan.d_step(g, d, opt_d, images, attr_src, attr_src.flip(0), torch.rand(6, 1, 1, 1),
                          smoke_args())
    assert set(stats) == {"d_loss", "d_adv", "gp", "d_cls", "d_acc"}
    assert same(g_params, g.parameters()) and all(p.grad is None for p in g.parameters())
    assert not same(d_before, snapshot(d))
    d_before = snapshot(d)
    opt_d.zero_grad(set_to_none=True)
    stats = attgan.g_step(g, d, opt_g, images, attr_src, attr_src.flip(0), smoke_args())
    assert set(stats) == {"g_loss", "g_adv", "g_cls", "g_rec"}
    assert same(d_before, snapshot(d)) and all(p.grad is None for p in d.parameters())
    assert not same(g_params, g.parameters())


def test_train_step_alternates_and_shuffles_the_targets():
    """n_d D updates then one G update; the targets are the batch's rows in another order."""
    args = smoke_args(n_d=3)
    attrs = torch.eye(8)[:, :4].clone()
    attrs[4:, :] = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]])
    images = torch.zeros(8, 3, 4, 4)
    kinds = []
    for step in range(8):
        g, d = FixedFake(torch.zeros(8, 3, 4, 4)), QuadraticCritic()
        stats = attgan.train_step(g, d, torch.optim.SGD(g.parameters(), lr=0.0),
                                  torch.optim.SGD(d.parameters(), lr=0.0), step, images, attrs, args)
        kinds.append("g" if "g_loss" in stats else "d")
        target = g.seen[0] + 0.5  # (2b − 1)·0.5 + 0.5 = b
        assert sorted(map(tuple, target.tolist())) == sorted(map(tuple, attrs.tolist()))
        assert not torch.equal(target, attrs)  # 8 distinct rows: the identity order is 1 in 40,320
    assert kinds == ["d", "d", "d", "g", "d", "d", "d", "g"]


# Every input of every term of L_D and L_G, through train_step ------------------------------------
# A recording G and a critic whose score, gradient and logits are known in closed form: each term
# is recomputed here by hand from what G and D were actually given, and each gradient from that
# hand-written loss. λ are all different, so a swapped weight shows.
STEP_ARGS = dict(n_d=1, thres_int=0.5, lambda_rec=7.0, lambda_cls_g=3.0, lambda_cls_d=5.0, lambda_gp=11.0)


class RecordingG(nn.Module):
    """G(x, a') = m·x + a'·P (P maps the A inputs to an image): every attribute vector leaves its
    own mark on the output; `seen` records every a' it is called with, in order."""

    def __init__(self, num_attrs, shape):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.m = nn.Parameter(torch.tensor(0.9))
        self.P = nn.Parameter(torch.randn(num_attrs, math.prod(shape), generator=gen) * 0.3)
        self.seen = []

    def forward(self, x, attr_input):
        self.seen.append(attr_input.detach().clone())
        return self.m * x + (attr_input @ self.P).view_as(x)


class KnownCritic(nn.Module):
    """D(x) = w·x + ½·q·‖x‖² (so ∇D(x) = w + q·x, which depends on where it is taken) and
    C(x) = x·V + c, per image; `seen` records every batch it scores."""

    def __init__(self, num_attrs, pixels):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.w = nn.Parameter(torch.randn(pixels, generator=gen) * 0.2)
        self.q = nn.Parameter(torch.tensor(0.7))
        self.V = nn.Parameter(torch.randn(pixels, num_attrs, generator=gen) * 0.2)
        self.c = nn.Parameter(torch.randn(num_attrs, generator=gen))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        flat = x.flatten(1)
        return flat @ self.w + 0.5 * self.q * flat.pow(2).sum(1), flat @ self.V + self.c


def bce(logits, targets):
    """−[t·log σ(z) + (1 − t)·log(1 − σ(z))], the mean over every entry, by hand."""
    return -(targets * torch.log(torch.sigmoid(logits)) + (1 - targets) * torch.log(1 - torch.sigmoid(logits))).mean()


def step_case():
    torch.manual_seed(3)
    real = torch.rand(6, 3, 4, 4) * 2 - 1
    attr_src = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 0]])
    g, d = RecordingG(4, (3, 4, 4)), KnownCritic(4, 48)
    return real, attr_src, g, d


def as_targets(attr_input, attr_src):
    """b' -> b: checks it is ±thres_int and the batch's rows in another order."""
    b = attr_input / (2 * STEP_ARGS["thres_int"]) + 0.5
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert sorted(map(tuple, b.tolist())) == sorted(map(tuple, attr_src.tolist())) and not torch.equal(b, attr_src)
    return b


def params_moved(module, before, lr):
    """SGD without momentum: θ_after = θ_before − lr·∇L  ->  ∇L of each parameter."""
    return [(b - p.detach()) / lr for b, p in zip(before, module.parameters())]


def test_d_step_terms_take_the_real_images_the_edits_and_one_alpha_per_image():
    """L_D = D(x̂_b) − D(x) + λ_gp·(‖∇D(x̃)‖ − 1)² + λ_3·BCE(C(x), a), every input checked."""
    real, attr_src, g, d = step_case()
    lr, before = 0.5, [p.detach().clone() for p in d.parameters()]
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=lr), torch.optim.SGD(d.parameters(), lr=lr)
    stats = attgan.train_step(g, d, opt_g, opt_d, 0, real, attr_src, smoke_args(**STEP_ARGS))
    (b_input,) = g.seen  # D's step decodes once: the edits, from the targets b
    b = as_targets(b_input, attr_src)
    fake = 0.9 * real + (b_input @ g.P.detach()).view_as(real)  # x̂_b by hand
    scored, interp = d.seen  # one batch of real ++ fake, then the penalty's x̃
    assert torch.allclose(scored, torch.cat([real, fake]), atol=1e-6)
    # x̃_i = α_i·x_i + (1 − α_i)·x̂_i: recover each α_i and check the point lies on that segment
    span, offset = (real - fake).flatten(1), (interp - fake).flatten(1)
    alpha = (offset * span).sum(1) / span.pow(2).sum(1)
    assert torch.allclose(offset, alpha[:, None] * span, atol=1e-5)
    assert ((alpha >= 0) & (alpha <= 1)).all() and len(set(alpha.round(decimals=4).tolist())) == 6

    def l_d(w, q, V, c):  # the whole L_D by hand, as a function of D's parameters
        score = lambda x: x.flatten(1) @ w + 0.5 * q * x.flatten(1).pow(2).sum(1)  # noqa: E731
        adv = score(fake).mean() - score(real).mean()
        gp = ((w + q * interp.flatten(1)).norm(dim=1) - 1).pow(2).mean()  # ∇D(x̃) = w + q·x̃
        cls = bce(real.flatten(1) @ V + c, attr_src)
        return adv + 11.0 * gp + 5.0 * cls, adv, gp, cls

    params = [t.clone().requires_grad_(True) for t in before]
    loss, adv, gp, cls = l_d(*params)
    for key, value in [("d_loss", loss), ("d_adv", adv), ("gp", gp), ("d_cls", cls)]:
        assert stats[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    expected = torch.autograd.grad(loss, params)
    for name, got, want in zip(("w", "q", "V", "c"), params_moved(d, before, lr), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"D's update of {name}"
    assert stats["d_acc"].item() == pytest.approx(((real.flatten(1) @ before[2] + before[3] > 0).float()
                                                   == attr_src).float().mean().item())


def test_g_step_terms_take_the_edit_for_d_and_c_and_the_reconstruction_for_l1():
    """L_G = −D(x̂_b) + λ_2·BCE(C(x̂_b), b) + λ_1·‖x − x̂_a‖₁: the edit decoded from b', the
    reconstruction from a', C's loss against b, every input checked."""
    real, attr_src, g, d = step_case()
    lr, before = 0.5, [p.detach().clone() for p in g.parameters()]
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=lr), torch.optim.SGD(d.parameters(), lr=lr)
    stats = attgan.train_step(g, d, opt_g, opt_d, 1, real, attr_src, smoke_args(**STEP_ARGS))
    own = (attr_src * 2 - 1) * 0.5  # a' by hand
    assert len(g.seen) == 2 and sum(torch.equal(seen, own) for seen in g.seen) == 1  # one decode of a'
    b_input = next(seen for seen in g.seen if not torch.equal(seen, own))
    b = as_targets(b_input, attr_src)
    (scored,) = d.seen  # D and C see the edits, and nothing else

    def l_g(m, P):  # the whole L_G by hand, as a function of G's parameters
        fake, recon = m * real + (b_input @ P).view_as(real), m * real + (own @ P).view_as(real)
        adv = -(fake.flatten(1) @ d.w + 0.5 * d.q * fake.flatten(1).pow(2).sum(1)).mean()
        cls = bce(fake.flatten(1) @ d.V + d.c, b)
        rec = (real - recon).abs().mean()
        return adv + 3.0 * cls + 7.0 * rec, adv, cls, rec, fake

    params = [t.clone().requires_grad_(True) for t in before]
    loss, adv, cls, rec, fake = l_g(*params)
    assert torch.allclose(scored, fake.detach(), atol=1e-6)
    for key, value in [("g_loss", loss), ("g_adv", adv), ("g_cls", cls), ("g_rec", rec)]:
        assert stats[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), key
    expected = torch.autograd.grad(loss, params)
    for name, got, want in zip(("m", "P"), params_moved(g, before, lr), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"G's update of {name}"


# The test-time attribute rule (v1 test.py and data.py after c385855) ------------------------------
NAMES = ["Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Mustache", "No_Beard", "Male"]


def row(**values):
    return torch.tensor([[float(values.get(n, 0)) for n in NAMES]])


def expected_inputs(thres, test, **values):
    """Hand-built: what G must see, attribute by attribute ({name: exact value})."""
    return torch.tensor([[values.get(n, -thres) for n in NAMES]])


def test_edit_inputs_follow_the_official_test():
    src = row(Black_Hair=1, Male=1, Mustache=1)
    blond = attgan.edit_inputs(src, NAMES, 0.5, 1.0, {NAMES.index("Blond_Hair"): 1.0})
    # the edited attribute at +test_int, its rival Black_Hair switched off at −thres_int
    assert torch.equal(blond, expected_inputs(0.5, 1.0, Blond_Hair=1.0, Male=0.5, Mustache=0.5))
    no_beard = attgan.edit_inputs(src, NAMES, 0.5, 2.0, {NAMES.index("No_Beard"): 1.0})
    # c385855: No_Beard no longer switches Mustache off
    assert torch.equal(no_beard, expected_inputs(0.5, 2.0, Black_Hair=0.5, No_Beard=2.0, Male=0.5,
                                                 Mustache=0.5))
    off = attgan.edit_inputs(src, NAMES, 0.5, 1.0, {NAMES.index("Male"): 0.25})
    assert torch.equal(off, expected_inputs(0.5, 1.0, Black_Hair=0.5, Mustache=0.5, Male=-0.5))


def test_the_evaluation_adapter_edits_as_the_official_test(tmp_path):
    """Flip Blond_Hair on a black-haired face: G must see +test_int for Blond_Hair alone,
    −thres_int for the rival switched off, ±thres_int elsewhere (not ±test_int everywhere)."""
    out = tmp_path / "run"
    attgan.main(["--smoke", "--steps", "1", "--out", str(out), "--test-int", "0.9"])
    model = attgan_adapter.load(out / "ckpt.pt")
    names = model.attr_names
    recorder = []
    original = attgan.Generator.forward
    attgan.Generator.forward = lambda self, x, a: recorder.append(a.clone()) or original(self, x, a)
    try:
        src = torch.zeros(2, len(names))
        src[:, names.index("Black_Hair")] = 1
        tgt = src.clone()
        tgt[:, names.index("Blond_Hair")] = 1
        edited = model.edit(torch.zeros(2, 3, 32, 32), src, tgt)
        for extra in ([], ["--test-int", "1.5"]):  # `edit` on a photo: the checkpoint's, or the typed one
            attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--index", "0", "--set", "Blond_Hair=1",
                         "--out", str(tmp_path / "edit.png"), *extra])
    finally:
        attgan.Generator.forward = original
    expected = torch.full((2, len(names)), -0.5)
    expected[:, names.index("Blond_Hair")] = 0.9
    assert torch.equal(recorder[0], expected) and edited.shape == (2, 3, 32, 32)
    assert [a[0, names.index("Blond_Hair")].item() for a in recorder[-2:]] == [pytest.approx(0.9), 1.5]
    assert model.img_size == 32 and model.crop == 170 and model.generate is None


DEMO_ATTRS = sorted(set(attgan.PAPER_ATTRS) - {"Bushy_Eyebrows"} | {"Gray_Hair"})


def default_attrs(data):
    args = attgan.parse_dataclass(attgan.Args, ["--data", data, "--preset", "paper"])
    return attgan.configure(args, torch.device("cpu")).attrs


def test_default_attrs_are_the_papers_and_on_the_demo_set_drawn_by_it(tmp_path):
    """The demo set cannot draw Bushy_Eyebrows: Gray_Hair takes its place."""
    import common
    assert sorted(default_attrs("demo:16")) == DEMO_ATTRS and set(DEMO_ATTRS) <= set(common.DEMO_ATTRS)
    assert default_attrs(str(tmp_path)) == attgan.PAPER_ATTRS


# Command line end to end --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(attgan_smoke):
    """One `python attgan.py --smoke` through the command line, shared by the tests below (and
    by tests/test_benchmarks.py: conftest.py's session run)."""
    return attgan_smoke


class Commands(dict):
    """name -> CompletedProcess of each command line below; .folder, .listing_before."""


def listing(folder):
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.name != ".lock")


@pytest.fixture(scope="module")
def cli(smoke_run, tmp_path_factory, face_attr_cache):
    """This file's command lines, in order, in ONE fresh interpreter (conftest.commands): --help
    of the script and of edit, a second run into the smoke run's folder, an edit of a photo, an
    edit refused for its --out, a --slide strip and a --slide refused for its attribute."""
    out, _ = smoke_run
    folder = tmp_path_factory.mktemp("attgan_cli")
    photo = folder / "me.png"
    Image.fromarray((torch.rand(60, 50, 3) * 255).byte().numpy()).save(photo)
    calls = {"help": ["--help"], "edit_help": ["edit", "--help"],
             "second_run": ["--smoke", "--out", out],
             "edit": ["edit", "--ckpt", out / "ckpt.pt", "--image", photo, "--set", "Eyeglasses=1",
                      "--set", "blond_hair=0.5", "--out", folder / "me_edited.png"],
             "edit_txt": ["edit", "--ckpt", out / "ckpt.pt", "--out", folder / "edit.txt"],
             "slide": ["edit", "--ckpt", out / "ckpt.pt", "--index", "1", "--slide", "blond_hair", "--test-int", "2",
                       "--out", folder / "slide.png"],
             "slide_unknown": ["edit", "--ckpt", out / "ckpt.pt", "--slide", "Bushy_Eyebrows"]}
    result = Commands()
    result.folder, result.listing_before = folder, listing(out)
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    result.update(zip(calls, commands([("attgan.py", argv) for argv in calls.values()], env,
                                      folder / "driver")))
    return result


def test_smoke_run_writes_checkpoint_grid_and_metrics(smoke_run):
    out, stdout = smoke_run
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["script"] == "attgan.py" and state["step"] == 6
    assert state["config"]["img_size"] == 32 and sorted(state["attr_names"]) == DEMO_ATTRS
    assert state["opt_g"]["state"] and state["opt_d"]["state"]  # both networks were updated
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    # the learning rate drops ×0.1 from epoch 0.11 = step round(0.11 · 360 / 8) = 5 on: the last step,
    # logged at 6 (one step late, it would still read 2e-4 there)
    assert [r["lr"] for r in records] == [2e-4, 2e-4, pytest.approx(2e-5)]
    assert "step 6/6" in stdout and "img/s" in stdout and "ETA" in stdout
    for step in (3, 6):
        with Image.open(out / "samples" / f"step_{step:06d}.png") as grid:
            assert grid.width > 15 * 32 and grid.height > 8 * 32  # 8 rows x (input, recon, 13)
    assert (out / "losses.png").is_file() and not list(out.glob("*.tmp"))


def test_resume_after_2_steps_then_2_more_equals_4_straight(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    attgan.main(["--smoke", "--steps", "4", "--out", str(straight)])
    attgan.main(["--smoke", "--steps", "2", "--out", str(split)])
    with open(split / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "d_lo')  # a torn last line (power lost mid-write) must not block
    attgan.main(["--smoke", "--steps", "4", "--out", str(split), "--resume"])
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for net in ("generator", "discriminator"):  # parameters and BatchNorm buffers
        for key, value in a[net].items():
            assert torch.equal(value, b[net][key]), f"{net}.{key} differs after resume"
    for index, moments in a["opt_d"]["state"].items():
        assert torch.equal(moments["exp_avg"], b["opt_d"]["state"][index]["exp_avg"])
    assert [r["step"] for r in attgan.common.read_jsonl(split / "metrics.jsonl")] == [2, 4]
    with pytest.raises(InputError, match="checkpoint is at step 4"):
        attgan.main(["--smoke", "--steps", "3", "--out", str(split), "--resume"])


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    attgan.main(["--smoke", "--steps", "3", "--out", str(out)])
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(attgan, "loss_rec", lambda recon, real: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="step 4: non-finite g_loss, g_rec"):
        attgan.main(["--smoke", "--steps", "6", "--out", str(out), "--resume", "--log-every", "1"])
    assert (out / "ckpt.pt").read_bytes() == before


def test_refusals_before_any_work(smoke_run, tmp_path, cli):
    """Each bad input gets one line, and nothing in an existing run folder changes."""
    out, _ = smoke_run
    before = listing(out)
    assert before == cli.listing_before  # the second run from the command line changed nothing
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [(["--out", out], "holds a run (ckpt.pt, metrics.jsonl, samples)"),
             (["--out", a_file], "expected a folder"),
             (["--batch-size", "0"], "--batch-size 0: expected a finite number above 0"),
             (["--lr", "-1"], "--lr -1.0: expected a finite number above 0"),
             (["--lambda-gp", "nan"], "--lambda-gp nan: expected a finite number of at least 0"),
             (["--attrs", "Male", "male"], "a value is repeated"),
             (["--device", "gpu"], "--device gpu: not on this machine"),
             (["--device", "cuda:7"], "--device cuda:7: not on this machine"),
             (["--out", tmp_path / "new", "--resume"], "expected a checkpoint"),
             (["--out", out, "--resume", "--shortcut-layers", "2"], "shortcut_layers=1, this run")]
    for argv, message in cases:
        with pytest.raises(InputError) as err:
            attgan.main(["--smoke", *map(str, argv)])
        assert message in str(err.value) and "\n" not in str(err.value), (argv, str(err.value))
        del err  # its traceback would keep the run folder's lock open
    proc = cli["second_run"]  # as a user sees it: one line, exit code 1
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[1:] == [
        f"error: --out {out} holds a run (ckpt.pt, metrics.jsonl, samples): continue it with "
        f"--resume or choose another --out (nothing was changed)"]
    assert listing(out) == before


def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path):
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    lock = os.open(out, os.O_RDONLY)  # a live run locks the folder itself
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another run is writing there"):
            attgan.main(["--smoke", "--out", str(out)])
    finally:
        os.close(lock)
    assert out.is_dir() and not list(out.iterdir())  # the refused run wrote nothing, removed nothing


def test_presets_never_override_what_the_user_typed():
    args = attgan.parse_dataclass(attgan.Args, ["--smoke", "--img-size", "128", "--n-d", "5"],
                                  positive=attgan.POSITIVE)
    args = attgan.configure(args, torch.device("cpu"))
    assert (args.img_size, args.n_d, args.enc_dim, args.steps) == (128, 5, SMOKE["enc_dim"], 6)


def test_checkpoints_of_other_programs_are_refused_in_one_line(tmp_path):
    torch.save({"script": "cgan.py", "config": {}}, tmp_path / "cgan.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name, found in [("cgan.pt", "found cgan.py"), ("empty.pt", "found not a checkpoint"),
                        ("photo.jpg", "found not a checkpoint"), ("tensor.pt", "not a checkpoint")]:
        with pytest.raises(InputError, match=found) as err:
            attgan.load(tmp_path / name)
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["help", "edit_help"])
def test_help(command, cli):
    proc = cli[command]  # `python attgan.py --help`, `python attgan.py edit --help`
    assert proc.returncode == 0 and "--out" in proc.stdout and "(default:" in proc.stdout
    assert proc.stdout.startswith("usage: attgan.py edit" if command == "edit_help" else "usage: attgan.py")


def test_edit_an_image_file(cli):
    target = cli.folder / "me_edited.png"
    proc = cli["edit"]  # a 50x60 random photo, --set Eyeglasses=1 --set blond_hair=0.5
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
               if line.startswith("  ")}
    assert sorted(printed) == DEMO_ATTRS and all(0 <= p <= 1 for p in printed.values())
    with Image.open(target) as edited:
        assert edited.size == (32, 32)  # the edited face alone, at the model's size
    proc = cli["edit_txt"]  # --out edit.txt
    assert proc.returncode == 1 and "expected a .png or .jpg" in proc.stderr


def test_edit_flips_a_validation_image_and_refuses_bad_settings(smoke_run, tmp_path):
    out, _ = smoke_run
    grid = attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--index", "1", "--out",
                        str(tmp_path / "flips.png")])
    with Image.open(grid) as picture:
        assert picture.width > 15 * 32  # input, reconstruction and 13 flips
    with pytest.raises(InputError, match="Eyeglass"):
        attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--set", "Eyeglass=1"])
    with pytest.raises(InputError, match="Attr=value"):
        attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--set", "Male"])


SLIDE_VALUES = [(2 * i / 8 - 1) * 2.0 for i in range(9)]  # −test_int .. +test_int in 9 steps, test_int 2
SLIDE_HEADS = ["input"] + [f"Blond_Hair {v:+g}" for v in SLIDE_VALUES]


def test_slide_writes_a_strip_labelled_with_what_g_sees(cli):
    """`edit --slide blond_hair --test-int 2`: one row, the input then 9 columns, each labelled with
    the value G is given for Blond_Hair (−2 .. +2), as v1 test_slide.py's strip."""
    proc = cli["slide"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"columns: {', '.join(SLIDE_HEADS)}" in proc.stdout.splitlines()
    reference = cli.folder / "reference.png"  # what common.save_grid draws for 1 x 10 pictures of 32 px
    attgan.common.save_grid(torch.zeros(1, 10, 3, 32, 32), reference, col_labels=SLIDE_HEADS)
    with Image.open(cli.folder / "slide.png") as strip, Image.open(reference) as drawn:
        assert strip.size == drawn.size
    proc = cli["slide_unknown"]  # an attribute the checkpoint was not trained on: one line
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: unknown attribute 'Bushy_Eyebrows'; valid names: Bald, Bangs")


@torch.no_grad()
def test_slide_columns_are_g_at_the_labelled_values(smoke_run, tmp_path, monkeypatch):
    """Each column of the strip is G's output for the input built by hand: the image's own
    attributes (as C reads them) at ±thres_int, Blond_Hair at the column's value and, where that
    value turns it on, the other hair colours at −thres_int (v1 test.py's conflict rule)."""
    out, _ = smoke_run
    g, d, config, names = attgan.load(out / "ckpt.pt")
    val = attgan.common.load_celeba(config["data"], names, "val", 32, config["crop"], verbose=False)
    blond, rivals = names.index("Blond_Hair"), [names.index(n) for n in ("Black_Hair", "Brown_Hair", "Gray_Hair")]
    own = ((torch.sigmoid(d(attgan.common.to_float(val.images))[1]) > 0.5).float() * 2 - 1) * 0.5  # a
    index = next(i for i in range(len(own)) if own[i, rivals].max() > 0)  # a face with a rival to switch off
    image, own = attgan.common.to_float(val.images[index:index + 1]), own[index:index + 1]
    drawn = {}
    monkeypatch.setattr(attgan.common, "save_grid", lambda images, path, col_labels: drawn.update(
        images=images, labels=col_labels))
    attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--index", str(index), "--slide", "Blond_Hair",
                 "--test-int", "2", "--out", str(tmp_path / "slide.png")])
    assert drawn["labels"] == SLIDE_HEADS and drawn["images"].shape == (1, 10, 3, 32, 32)
    assert torch.equal(drawn["images"][0, 0], image[0])
    for column, value in zip(drawn["images"][0, 1:], SLIDE_VALUES):
        seen = own.clone()
        seen[0, blond] = value
        seen[0, rivals] = -0.5 if value > 0 else seen[0, rivals]
        assert torch.allclose(column, g(image, seen)[0], atol=1e-6), value
    assert all(not torch.equal(a, b) for a, b in zip(drawn["images"][0, 1:], drawn["images"][0, 2:]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_run(tmp_path, cache_env):
    """torchrun with 2 CPU processes: both ranks must end with EXACTLY the same parameters (DDP
    averages the gradients before each update), and only rank 0 writes."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(ROOT / "attgan.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=dict(cache_env, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.findall(r"largest parameter difference between ranks (\S+)", proc.stdout)
    assert len(found) == 1 and float(found[0]) == 0.0, proc.stdout[-2000:]
    assert proc.stdout.count("step 6/6") == 1  # rank 0 alone prints
    assert [r["step"] for r in attgan.common.read_jsonl(out / "metrics.jsonl")] == [2, 4, 6]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 6
