"""Tests for attgan.py: shapes, the losses, the update alternation, the attribute rule, and the
command line end to end (smoke run, exact resume, edit, config mismatch, 2-process DDP)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image

import attgan
from attgan import Discriminator, Generator, InputError
from conftest import ROOT

torch.set_num_threads(1)


def tiny_config(**changes):
    """A small 32 px configuration (as --smoke) as a config dict."""
    args = attgan.Args(**{k: v for k, v in attgan.SMOKE.items() if k not in ("data",)})
    config = dict(vars(args), **changes)
    return config, attgan.Args(**config)


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,shortcut,inject", [(64, 0, 0), (64, 1, 1), (64, 4, 2), (128, 1, 1),
                                                  (128, 2, 3), (128, 0, 4)])
def test_generator_and_discriminator_shapes(size, shortcut, inject):
    num_attrs, batch = 5, 2
    g = Generator(num_attrs, n_layers=5, enc_dim=4, dec_dim=4, max_dim=32,
                  shortcut_layers=shortcut, inject_layers=inject)
    d = Discriminator(num_attrs, img_size=size, n_layers=5, dim=4, max_dim=32, fc_dim=16)
    images = torch.rand(batch, 3, size, size) * 2 - 1
    attrs = attgan.signed(torch.randint(0, 2, (batch, num_attrs)).float(), 0.5)
    features = g.encode(images)
    assert [f.shape[-1] for f in features] == [size // 2 ** (i + 1) for i in range(5)]
    assert features[-1].shape == (batch, 32, size // 32, size // 32)
    out = g(images, attrs)
    assert out.shape == (batch, 3, size, size)
    assert out.abs().max() <= 1  # tanh
    edit, recon = g(images, attrs, -attrs)  # one encoding, two decodings
    assert edit.shape == recon.shape == (batch, 3, size, size)
    score, logits = d(images)
    assert score.shape == (batch,) and logits.shape == (batch, num_attrs)


def test_paper_generator_channel_bookkeeping():
    """The paper's G at 128 px: first decoder layer sees 1024 + 13 channels, the second
    1024 + 512 (shortcut) + 13 (injection)."""
    g = Generator(13)
    assert g.decoder[0][0].in_channels == 1024 + 13
    assert g.decoder[1][0].in_channels == 1024 + 512 + 13
    assert g.decoder[2][0].in_channels == 512
    assert g.decoder[-1][0].out_channels == 3


def test_bad_image_size_is_refused():
    config, _ = tiny_config(img_size=40)
    with pytest.raises(InputError, match="multiple of 2"):
        attgan.check_config(config)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def test_gradient_penalty_on_a_linear_critic():
    """D(x) = w·x has ∇_x D = w everywhere, so the penalty is (‖w‖ − 1)² whatever α, and its
    gradient with respect to w is 2(‖w‖ − 1)·w/‖w‖."""
    torch.manual_seed(0)
    w = torch.randn(3 * 4 * 4)
    w = (w / w.norm() * 3.0).requires_grad_(True)  # ‖w‖ = 3
    critic = lambda x: x.flatten(1) @ w  # noqa: E731
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    alpha = torch.rand(5, 1, 1, 1)
    penalty = attgan.gradient_penalty(critic, real, fake, alpha)
    assert penalty.item() == pytest.approx(4.0, rel=1e-5)  # (3 − 1)²
    (grad,) = torch.autograd.grad(penalty, w)
    assert torch.allclose(grad, 2 * (3 - 1) * w.detach() / 3, atol=1e-5)


def test_loss_terms_on_known_values():
    assert attgan.loss_adv_d(torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0])).item() == -2.0
    assert attgan.loss_adv_g(torch.tensor([1.0, 3.0])).item() == -2.0
    assert attgan.loss_rec(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)).item() == 0.5
    logits = torch.tensor([[0.0, 0.0]])
    assert attgan.loss_cls(logits, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.693147, 1e-5)


# ------------------------------------------------------------------------------------------------
# The updates touch only their own network
# ------------------------------------------------------------------------------------------------
def make_tiny_nets():
    config, args = tiny_config()
    torch.manual_seed(0)
    g, d = attgan.build_models(config, 4)
    nets = attgan.make_nets(g, d, torch.device("cpu"), False, False)
    return nets, attgan.make_optimizers(g, d, args), args


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def test_d_step_leaves_g_unchanged_and_g_step_leaves_d_unchanged():
    nets, optimizers, args = make_tiny_nets()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    attr_src = torch.randint(0, 2, (6, 4)).float()
    attr_tgt = attr_src.flip(0)
    amp = lambda: attgan.autocast(torch.device("cpu"), False)  # noqa: E731

    g_before, d_before = snapshot(nets.g), snapshot(nets.d)
    stats = attgan.d_step(nets, optimizers[1], images, attr_src, attr_tgt, torch.rand(6, 1, 1, 1),
                          args, amp)
    assert set(stats) == {"d_loss", "d_adv", "gp", "d_cls", "d_acc"}
    assert all(torch.equal(a, b) for a, b in zip(g_before, snapshot(nets.g)))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, snapshot(nets.d)))

    g_before, d_before = snapshot(nets.g), snapshot(nets.d)
    optimizers[1].zero_grad(set_to_none=True)
    stats = attgan.g_step(nets, optimizers[0], images, attr_src, attr_tgt, args, amp)
    assert set(stats) == {"g_loss", "g_adv", "g_cls", "g_rec"}
    assert all(torch.equal(a, b) for a, b in zip(d_before, snapshot(nets.d)))
    assert all(p.grad is None for p in nets.d.parameters())  # D was frozen: no wasted gradients
    assert any(not torch.equal(a, b) for a, b in zip(g_before, snapshot(nets.g)))


def test_train_step_alternates_n_d_discriminator_updates_per_generator_update():
    nets, optimizers, args = make_tiny_nets()
    args.n_d = 3
    images, attrs = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (4, 4)).float()
    amp = lambda: attgan.autocast(torch.device("cpu"), False)  # noqa: E731
    kinds = ["g" if "g_loss" in attgan.train_step(nets, optimizers, step, images, attrs,
                                                   ["Male", "Young", "Bald", "Bangs"], args, amp)
             else "d" for step in range(8)]
    assert kinds == ["d", "d", "d", "g", "d", "d", "d", "g"]


# ------------------------------------------------------------------------------------------------
# Attribute rule and edit inputs
# ------------------------------------------------------------------------------------------------
NAMES = ["Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Mustache", "No_Beard", "Male"]


def row(**values):
    return torch.tensor([[float(values.get(n, 0)) for n in NAMES]])


def test_make_consistent_whole_rows_first_listed_wins():
    attrs = torch.cat([row(Bald=1, Bangs=1), row(Black_Hair=1, Brown_Hair=1, Blond_Hair=1),
                       row(Mustache=1, No_Beard=1, Male=1), row(Bangs=1, Blond_Hair=1)])
    fixed = attgan.make_consistent(attrs, NAMES)
    assert torch.equal(fixed, torch.cat([row(Bald=1), row(Black_Hair=1), row(Mustache=1, Male=1),
                                         row(Bangs=1, Blond_Hair=1)]))
    assert torch.equal(attrs[0], row(Bald=1, Bangs=1)[0])  # the input is not modified


def test_make_consistent_changed_attribute_wins():
    attrs = torch.cat([row(Bald=1, Black_Hair=1), row(Black_Hair=1, No_Beard=1)])
    attrs[:, NAMES.index("Blond_Hair")] = 1  # just set: the other colours go
    fixed = attgan.make_consistent(attrs, NAMES, changed=NAMES.index("Blond_Hair"))
    assert torch.equal(fixed, torch.cat([row(Bald=1, Blond_Hair=1), row(Blond_Hair=1, No_Beard=1)]))
    off = row(Bangs=1, Black_Hair=1)  # switching an attribute OFF removes nothing
    assert torch.equal(attgan.make_consistent(off, NAMES, changed=NAMES.index("Bald")), off)


def test_target_attributes_are_a_permutation_of_consistent_rows():
    attrs = torch.cat([row(Bald=1), row(Bangs=1, Male=1), row(Black_Hair=1), row(No_Beard=1)])
    target = attgan.target_attributes(attrs, NAMES, torch.Generator().manual_seed(3))
    assert sorted(map(tuple, target.tolist())) == sorted(map(tuple, attrs.tolist()))


def test_edit_inputs_scales_edited_attributes_by_test_int():
    attr_src = row(Black_Hair=1, Male=1)
    inputs = attgan.edit_inputs(attr_src, NAMES, 0.5, 1.0, {NAMES.index("Blond_Hair"): 1.0,
                                                           NAMES.index("Male"): 0.25})
    expected = dict(Bald=-0.5, Bangs=-0.5, Black_Hair=-0.5, Blond_Hair=1.0, Brown_Hair=-0.5,
                    Mustache=-0.5, No_Beard=-0.5, Male=-0.5)  # Male 0.25 -> (2·0.25 − 1)·1
    assert inputs[0].tolist() == [expected[n] for n in NAMES]


def test_default_attrs_on_the_demo_set_are_drawn_by_it():
    import common
    demo = attgan.default_attrs("demo:16")
    assert len(demo) == 13 and set(demo) <= set(common.DEMO_ATTRS)
    assert set(attgan.PAPER_ATTRS) - set(demo) == {"Bushy_Eyebrows"}  # the one it cannot draw
    assert attgan.default_attrs("/data/celeba") == attgan.PAPER_ATTRS


# ------------------------------------------------------------------------------------------------
# Command line end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, face_attr_cache):
    """One `python attgan.py --smoke` through the command line, shared by the tests below."""
    out = tmp_path_factory.mktemp("attgan_smoke")
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "attgan.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_run_writes_checkpoint_grid_and_metrics(smoke_run):
    out, stdout = smoke_run
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert {"generator", "discriminator", "opt_g", "opt_d", "step", "config", "attr_names",
            "rng"} <= set(state)
    assert state["step"] == 6 and state["config"]["img_size"] == 32
    assert state["attr_names"] == attgan.default_attrs("demo:16")
    assert state["opt_g"]["state"] and state["opt_d"]["state"]  # both networks were updated
    records = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert [eval(r)["step"] for r in records] == [2, 4, 6]  # noqa: S307 (plain JSON numbers)
    assert "step 6/6" in stdout and "img/s" in stdout and "ETA" in stdout
    for step in (3, 6):
        with Image.open(out / "samples" / f"step_{step:06d}.png") as grid:
            # 8 validation rows x (input, recon, 13 flips) of 32 px, labelled: wider than tall
            assert grid.width > 15 * 32 and grid.height > 8 * 32 and grid.width > grid.height
    assert (out / "losses.png").is_file() and not (out / "ckpt.pt.tmp").exists()


def test_resume_after_2_steps_then_2_more_equals_4_straight(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    attgan.main(["--smoke", "--steps", "4", "--out", str(straight)])
    attgan.main(["--smoke", "--steps", "2", "--out", str(split)])
    attgan.main(["--smoke", "--steps", "4", "--out", str(split), "--resume"])
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for net in ("generator", "discriminator"):  # parameters and BatchNorm buffers
        for key, value in a[net].items():
            assert torch.equal(value, b[net][key]), f"{net}.{key} differs after resume"
    for opt in ("opt_g", "opt_d"):
        for index, moments in a[opt]["state"].items():
            assert torch.equal(moments["exp_avg"], b[opt]["state"][index]["exp_avg"])
    assert [r["step"] for r in attgan.common.read_jsonl(split / "metrics.jsonl")] == [2, 4]


def test_resume_with_another_configuration_is_refused(smoke_run, cache_env):
    out, _ = smoke_run
    proc = subprocess.run([sys.executable, str(ROOT / "attgan.py"), "--smoke", "--out", str(out),
                           "--resume", "--shortcut-layers", "2"], cwd=ROOT, env=cache_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message.startswith("error:") and "\n" not in message
    assert "shortcut_layers=1" in message and "shortcut_layers=2" in message


def test_edit_an_image_file(smoke_run, tmp_path, cache_env):
    out, _ = smoke_run
    photo = tmp_path / "me.png"
    Image.fromarray((torch.rand(60, 50, 3) * 255).byte().numpy()).save(photo)
    target = tmp_path / "me_edited.png"
    proc = subprocess.run([sys.executable, str(ROOT / "attgan.py"), "edit", "--ckpt",
                           str(out / "ckpt.pt"), "--image", str(photo), "--set", "Eyeglasses=1",
                           "--set", "blond_hair=0.5", "--out", str(target)],
                          cwd=ROOT, env=cache_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every attribute is printed with its probability
    lines = {line.split()[0]: float(line.split()[1]) for line in proc.stdout.splitlines()
             if line.startswith("  ")}
    assert list(lines) == attgan.default_attrs("demo:16")
    assert all(0 <= p <= 1 for p in lines.values())
    with Image.open(target) as edited:
        assert edited.size == (32, 32)
    assert (tmp_path / "me_edited_compare.png").is_file()


def test_edit_slider_and_flip_grid_in_process(smoke_run, tmp_path):
    out, _ = smoke_run
    strip = attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--index", "1", "--slider",
                         "Male", "--out", str(tmp_path / "slider.png")])
    with Image.open(strip) as picture:
        assert picture.width > 10 * 32  # input + 9 strengths
    with pytest.raises(InputError, match="Eyeglass"):
        attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--set", "Eyeglass=1"])
    with pytest.raises(InputError, match="Attr=value"):
        attgan.main(["edit", "--ckpt", str(out / "ckpt.pt"), "--set", "Male"])


def test_load_for_eval(smoke_run):
    out, _ = smoke_run
    model = attgan.load_for_eval(out / "ckpt.pt")
    assert model.img_size == 32 and model.crop == 170 and model.generate is None
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    attrs = torch.randint(0, 2, (3, len(model.attr_names))).float()
    edited = model.edit(images, attrs, 1 - attrs)
    assert edited.shape == images.shape and edited.device.type == "cpu"
    assert torch.equal(model.edit(images, attrs, attrs), model.edit(images, attrs, attrs))
    assert model.reconstruct(images).shape == images.shape


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_run(tmp_path, cache_env):
    """torchrun with 2 CPU processes: both ranks must end with identical parameters, and only
    rank 0 writes (one metrics line per log step, one checkpoint)."""
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(ROOT / "attgan.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=dict(cache_env, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DDP check: 2 ranks, largest parameter difference between ranks 0" in proc.stdout
    assert proc.stdout.count("step 6/6") == 1  # rank 0 alone prints
    assert [r["step"] for r in attgan.common.read_jsonl(out / "metrics.jsonl")] == [2, 4, 6]
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["generator"].values() if v.is_floating_point())
