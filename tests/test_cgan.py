"""Tests for cgan.py: shapes, the loss terms, the mismatched attributes, non-sparse selection,
`play` driven by piped input, a --smoke run through the command line, exact resume, eval and the
evaluation contract. CPU, deterministic, a few seconds per subprocess run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import cgan
import common
from common import InputError

SMALL = dict(arch="dcgan", attr_join="last", img_size=32, crop=170, full_frame=False,
             noise_dim=16, width=8, fc_hidden=32, refine=True)


def config(**changes):
    return {**SMALL, **changes}


def pixels(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float()


# ------------------------------------------------------------------------------------------------
# Model shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,join,size", [("dcgan", "last", 32), ("dcgan", "input", 32),
                                            ("dcgan", "last", 64), ("dcgan", "input", 64),
                                            ("fc", "last", 32)])
def test_shapes_of_every_network(arch, join, size):
    torch.manual_seed(0)
    generator, discriminator, encoder = cgan.build_models(
        config(arch=arch, attr_join=join, img_size=size), num_attrs=5)
    noise, attrs = torch.randn(3, 16), torch.randint(0, 2, (3, 5)).float()
    images = generator(noise, attrs)
    assert images.shape == (3, 3, size, size)
    assert images.abs().max() <= 1  # tanh output
    assert discriminator(images, attrs).shape == (3,)
    code, attr_logits = encoder(images)
    assert code.shape == (3, 16) and attr_logits.shape == (3, 5)


def test_full_frame_fc_uses_the_whole_218x178_frame():
    generator, discriminator, encoder = cgan.build_models(config(arch="fc", full_frame=True), 3)
    images = generator(torch.randn(2, 16), torch.ones(2, 3))
    assert images.shape == (2, 3, 218, 178)
    assert discriminator.net[0].in_features == 3 * 218 * 178 + 3
    assert cgan.image_geometry(config(full_frame=True)) == ((218, 178), None)


@pytest.mark.parametrize("arch,join", [("dcgan", "last"), ("dcgan", "input"), ("fc", "last")])
def test_discriminator_judges_image_and_attributes_together(arch, join):
    """Changing the attributes changes D's logit by an amount that depends on the image: the
    attributes interact with the image (a lone linear join would shift every image equally)."""
    torch.manual_seed(0)
    _, discriminator, _ = cgan.build_models(config(arch=arch, attr_join=join), 4)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    attrs = torch.zeros(6, 4)
    shift = discriminator(images, attrs + 1) - discriminator(images, attrs)
    assert shift.abs().min() > 0
    assert shift.std() > 1e-4


def test_bad_settings_are_input_errors():
    with pytest.raises(InputError, match="power of two"):
        cgan.check_config(cgan.Args(img_size=48))
    with pytest.raises(InputError, match="--arch fc"):
        cgan.check_config(cgan.Args(full_frame=True))
    with pytest.raises(InputError, match="attr-join"):
        cgan.check_config(cgan.Args(attr_join="middle"))


# ------------------------------------------------------------------------------------------------
# Losses and the mismatched attributes
# ------------------------------------------------------------------------------------------------
def test_loss_terms_have_their_known_values():
    zero = torch.zeros(4)
    log2 = torch.log(torch.tensor(2.0))
    for term in (cgan.loss_d_real, cgan.loss_d_fake, cgan.loss_d_mismatch, cgan.loss_g_adv):
        assert torch.allclose(term(zero), log2)  # σ(0) = ½ against either target
    big = torch.full((4,), 20.0)
    assert cgan.loss_d_real(big) < 1e-6 and cgan.loss_d_fake(-big) < 1e-6
    assert cgan.loss_d_mismatch(big) > 19  # a confident "match" on a mismatched pair is punished
    assert cgan.loss_recon(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)) == 0.5


def test_mismatched_attributes_never_equal_the_true_ones():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        num_attrs = 1 + trial % 4  # few attributes: many duplicate rows, the hard case
        attrs = torch.randint(0, 2, (32, num_attrs), generator=generator).float()
        torch.manual_seed(trial)
        wrong = cgan.mismatched_attributes(attrs)
        assert wrong.shape == attrs.shape
        assert (wrong != attrs).any(dim=1).all()
        assert set(wrong.unique().tolist()) <= {0.0, 1.0}
        rolled = attrs.roll(1, dims=0)
        distinct = (rolled != attrs).any(dim=1)
        assert torch.equal(wrong[distinct], rolled[distinct])  # another real combination
        assert ((wrong != rolled).sum(dim=1)[~distinct] == 1).all()  # else exactly one flip
    same = torch.ones(8, 3)  # every row identical: all rows need their flip
    assert (cgan.mismatched_attributes(same) != same).sum(dim=1).eq(1).all()


def test_mismatch_term_uses_real_images_with_wrong_attributes():
    """Spy on D in a real training step: the mismatched pairs are the real images with
    attributes that differ from their own on every row."""
    torch.manual_seed(0)
    generator, discriminator, encoder = cgan.build_models(config(refine=False), 3)
    calls = []
    forward = discriminator.forward
    discriminator.forward = lambda images, attrs: (calls.append((images.detach(), attrs.clone())),
                                                   forward(images, attrs))[1]
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    attrs = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 1]] * 2).float()
    args = cgan.Args(noise_dim=16)
    opts = (cgan.rmsprop_like_tf(generator.parameters(), 1e-4),
            cgan.rmsprop_like_tf(discriminator.parameters(), 1e-4))
    cgan.train_step((generator, discriminator, None), opts, images, attrs, torch.randn(8, 16),
                    args, torch.enable_grad)
    pair_images, pair_attrs = calls[0]  # d_step's first call: [real; real] with [a; ã]
    assert torch.equal(pair_images[:8], images) and torch.equal(pair_images[8:], images)
    assert torch.equal(pair_attrs[:8], attrs)
    assert (pair_attrs[8:] != attrs).any(dim=1).all()


def test_d_step_leaves_g_alone_and_g_step_leaves_d_alone():
    torch.manual_seed(0)
    generator, discriminator, _ = cgan.build_models(config(refine=False), 3)
    opt_g = cgan.rmsprop_like_tf(generator.parameters(), 1e-3)
    opt_d = cgan.rmsprop_like_tf(discriminator.parameters(), 1e-3)
    images, attrs = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (4, 3)).float()
    fakes = generator(torch.randn(4, 16), attrs)
    g_before = [p.clone() for p in generator.parameters()]
    d_before = [p.clone() for p in discriminator.parameters()]
    cgan.d_step(discriminator, opt_d, images, attrs, cgan.mismatched_attributes(attrs),
                fakes.detach(), attrs, torch.enable_grad)
    assert all(torch.equal(a, b) for a, b in zip(g_before, generator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(d_before, discriminator.parameters()))
    d_after = [p.clone() for p in discriminator.parameters()]
    cgan.g_step(discriminator, opt_g, fakes, attrs, images, None, None, attrs, 1.0, 1.0,
                torch.enable_grad)
    assert all(torch.equal(a, b) for a, b in zip(d_after, discriminator.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(g_before, generator.parameters()))


# ------------------------------------------------------------------------------------------------
# Attribute selection and play's input language
# ------------------------------------------------------------------------------------------------
def test_nonsparse_selection_on_a_toy_label_table():
    names = ["Always", "Half", "Never", "Forty", "Ninety", "Seventy"]
    rates = [1.0, 0.5, 0.0, 0.4, 0.9, 0.7]
    labels = torch.stack([(torch.arange(100) < r * 100).float() for r in rates], dim=1)
    chosen, ranked = cgan.select_nonsparse(labels, names, count=3)
    assert chosen == ["Half", "Forty", "Seventy"]  # closest to 50 %, in the table's order
    assert [n for n, _ in ranked] == ["Half", "Forty", "Seventy", "Ninety", "Always", "Never"]
    assert ranked[0][1] == pytest.approx(0.5)


def test_play_line_parsing():
    names = ["Male", "Smiling", "Young"]
    start = dict.fromkeys(names, 0.0)
    state = cgan.parse_attr_line("+male -Smiling Young=1", names, start)
    assert state == {"Male": 1.0, "Smiling": 0.0, "Young": 1.0}
    assert cgan.parse_attr_line("Male=-1, +Smiling", names, state) == \
        {"Male": 0.0, "Smiling": 1.0, "Young": 1.0}
    with pytest.raises(InputError, match="valid names: Male, Smiling, Young"):
        cgan.parse_attr_line("+Bald", names, start)
    with pytest.raises(InputError, match="Name=1"):
        cgan.parse_attr_line("Male=yes", names, start)


# ------------------------------------------------------------------------------------------------
# Through the command line
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, face_attr_cache):
    """One `python cgan.py --smoke` run (4 steps), shared by the tests below."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path_factory.mktemp("cgan_smoke")
    proc = subprocess.run([sys.executable, str(ROOT / "cgan.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache)),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_run_writes_every_output(smoke_run):
    out, stdout = smoke_run
    records = common.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("d_loss", "d_real", "d_fake", "d_mismatch", "g_loss", "p_real", "p_fake",
                "p_mismatch", "img_per_s"):
        assert all(key in r for r in records), key
    last = records[-1]
    assert last["d_loss"] == pytest.approx(last["d_real"] + last["d_fake"] + last["d_mismatch"],
                                           rel=1e-5)
    for name in ("ckpt.pt", "losses.png", "d_outputs.png", "samples/step_000002.png",
                 "samples/step_000004.png"):
        assert (out / name).is_file(), name
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and state["attr_names"] == cgan.DEFAULT_ATTRS
    assert {"generator", "discriminator", "opt_g", "opt_d", "config", "rng"} <= state.keys()
    assert "step 4/4" in stdout


def test_play_from_piped_input_keeps_the_face(smoke_run, run_script):
    out, _ = smoke_run
    lines = "+Male -Smiling\n+Smiling\n+Smiling\n-Smiling\n"
    proc = run_script("cgan.py", "play", "--ckpt", out / "ckpt.pt", "--out", out / "play",
                      input=lines)
    steps = sorted((out / "play").glob("step_*.png"))
    assert len(steps) == 4 and (out / "play" / "history.png").is_file()
    assert proc.stdout.count("step ") == 4
    images = [pixels(p) for p in steps]
    assert torch.equal(images[1], images[2])  # the same attributes twice: the same picture
    assert torch.equal(images[0], images[3])  # back to the start: the same z, the same face
    assert not torch.equal(images[0], images[1])  # a toggle changes the picture
    bad = run_script("cgan.py", "play", "--ckpt", out / "ckpt.pt", "--out", out / "play_bad",
                     input="+Male\n+Moustache\n", check=False)
    assert bad.returncode != 0
    assert "valid names: Black_Hair, Blond_Hair, Male, Smiling, Young" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_resume_equals_an_uninterrupted_run(smoke_run, run_script, tmp_path):
    reference, _ = smoke_run  # 4 steps in one go
    run_script("cgan.py", "--smoke", "--steps", 2, "--out", tmp_path)
    run_script("cgan.py", "--smoke", "--steps", 4, "--resume", "--out", tmp_path)
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    straight = torch.load(reference / "ckpt.pt", weights_only=True)
    for name in ("generator", "discriminator"):
        for key, value in straight[name].items():
            assert torch.equal(value, resumed[name][key]), f"{name}.{key}"
    for name in ("opt_g", "opt_d"):
        for index, slot in straight[name]["state"].items():
            assert torch.equal(slot["square_avg"], resumed[name]["state"][index]["square_avg"])
    assert [r["step"] for r in common.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    refused = run_script("cgan.py", "--smoke", "--steps", 6, "--resume", "--arch", "fc",
                         "--out", tmp_path, check=False)
    assert refused.returncode != 0 and "arch" in refused.stderr


def test_refine_training_eval_and_the_evaluation_contract(tmp_path, capsys):
    """In-process: a --refine smoke run, `eval` on it, then load_for_eval."""
    cgan.main(["--smoke", "--refine", "--attr-join", "input", "--out", str(tmp_path)])
    assert (tmp_path / "samples" / "edit_step_000004.png").is_file()
    assert "recon" in common.read_jsonl(tmp_path / "metrics.jsonl")[-1]

    cgan.main(["eval", "--ckpt", str(tmp_path / "ckpt.pt"), "--classifier-steps", "3",
               "--num-samples", "16"])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert list(result["per_attribute"]) == cgan.DEFAULT_ATTRS
    for row in result["per_attribute"].values():
        assert 0 <= row["generated_agreement"] <= 1 and -1 <= row["flip_response"] <= 1
    assert (tmp_path / "attr_classifier.pt").is_file()

    model = cgan.load_for_eval(tmp_path / "ckpt.pt")
    assert model.attr_names == cgan.DEFAULT_ATTRS and model.img_size == 32 and model.crop == 170
    attrs = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]]).float()
    faces = model.generate(attrs, seed=3)
    assert faces.shape == (2, 3, 32, 32)
    assert torch.equal(faces, model.generate(attrs, seed=3))
    assert not torch.equal(faces, model.generate(attrs, seed=4))
    assert model.edit(faces, attrs, 1 - attrs).shape == (2, 3, 32, 32)
    assert model.reconstruct(faces).shape == (2, 3, 32, 32)
    assert model.encode is None
