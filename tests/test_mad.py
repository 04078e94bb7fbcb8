"""Tests for mad.py: module shapes, each loss on a hand-computed case (the mined triplet, the cycle),
the factor schedule, pose from landmarks, which networks each step may touch, the three stages and
exact resume through the command line, and the evaluation adapter."""
import dataclasses
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import mad
from conftest import ROOT
from mad import InputError

torch.set_num_threads(1)

FRONTAL = torch.tensor([[70.0, 112.0], [108.0, 112.0], [89.0, 135.0], [72.0, 152.0], [106.0, 152.0]])


def no_amp():
    return torch.autocast("cpu", enabled=False)


def tiny_args(**changes):
    """The --smoke configuration as an Args (attributes filled as training fills them)."""
    args = mad.Args(**{k: v for k, v in mad.PRESETS["smoke"].items() if k != "data"})
    args.attrs = mad.EXPRESSION_ATTRS + mad.STYLE_ATTRS
    return dataclasses.replace(args, **changes)


def tiny_nets(args):
    torch.manual_seed(0)
    return mad.build_models(dataclasses.asdict(args))


def random_batch(batch=8, size=32, seed=0):
    """Images and labels shaped as build_factors gives them: 4 identities, binary labels."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    return images, {"pose": torch.randn(batch, 3, generator=gen) * 0.3,
                    "identity": torch.arange(batch)[:, None] % 4,
                    "expression": torch.randint(0, 2, (batch, 2), generator=gen).float(),
                    "style": torch.cat([torch.arange(batch)[:, None] % 4,  # the person, then the key
                                        torch.randint(0, 2, (batch, 3), generator=gen)], 1)}


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def part(state, net):
    """One network's tensors in a checkpoint's "nets" (the state_dict of the ModuleDict)."""
    return {k: v for k, v in state["nets"].items() if k.startswith(net + ".")}


def same(module, before):
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64, 256])
def test_module_shapes(size):
    torch.manual_seed(0)
    nets = mad.build_models(dict(factor_dim=32, img_size=size, enc_dim=2, dec_dim=2, dis_dim=2,
                                 hidden_dim=16))
    images = torch.rand(2, 3, size, size) * 2 - 1
    z = nets.e(images)
    assert z.shape == (2, 99) and mad.code_dim({"factor_dim": 32}) == 99
    out = nets.g(z)
    assert out.shape == images.shape and out.abs().max() <= 1
    assert nets.dx(images).shape == (2,) and nets.dz(z).shape == (2,)
    factors = nets.e_dis(z)
    assert {k: tuple(v.shape) for k, v in factors.items()} == {
        "pose": (2, 3), "identity": (2, 32), "style": (2, 32), "expression": (2, 32)}
    for name in ("identity", "style", "expression"):  # unit vectors (archs.EncoderLvlParallel)
        assert torch.allclose(factors[name].norm(dim=1), torch.ones(2), atol=1e-5)
    assert factors["pose"].norm(dim=1).sub(1).abs().max() > 1e-3  # pose is not normalised
    assert nets.g_dis(factors).shape == (2, 99)


def test_decoder_convs_have_he_init_and_its_transposed_convs_the_default():
    """invresnet.py: normal(0, sqrt(2 / (k k out))) for nn.Conv2d only (ConvTranspose2d is not one)."""
    torch.manual_seed(0)
    g = mad.Decoder(64, 99, 64)
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    for conv in convs:
        he = math.sqrt(2 / (9 * conv.out_channels))
        assert conv.weight.std().item() == pytest.approx(he, rel=0.05) and conv.weight.mean().abs() < 0.1 * he
    stem = g.stem[0]  # PyTorch's kaiming_uniform(a=sqrt 5): std 1 / sqrt(3 fan_in), fan_in = out x k x k
    assert stem.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 512 * 16), rel=0.05)


def test_full_size_networks_match_the_original_layer_sizes():
    nets = mad.build_models(dataclasses.asdict(mad.Args()))
    # E: ResNet-18 (11.69 M with its 1000-way fc) with layer0 + a stride-2 64-channel stage at 256
    # px (resnet_ae.py) and a 99-way fc: 11.18 M + 2 x 73,984 + 2 x 73,984 - 513,000 + 50,787.
    assert sum(p.numel() for p in nets.e.fc.parameters()) == 512 * 99 + 99
    assert [m.out_features for m in nets.dz.net if isinstance(m, torch.nn.Linear)] == [1000, 1000, 1]
    assert nets.e_dis.trunk[0].out_features == 1000 and nets.g_dis.net[2].out_features == 99
    convs = [m for m in nets.g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [512, 256, 256, 128, 128, 64, 64, 64, 64, 64, 64, 3]
    dx = [m.out_channels for m in nets.dx.modules() if isinstance(m, torch.nn.Conv2d)]
    assert dx == [32, 64, 128, 256, 256, 1]  # archs.Discriminator, ndf 32


# ------------------------------------------------------------------------------------------------
# Losses on hand-computed cases
# ------------------------------------------------------------------------------------------------
def test_triplet_loss_with_margin_and_clamp():
    a = torch.zeros(3, 2)
    p = torch.tensor([[0.1, 0.0], [0.1, 0.0], [1.0, 0.0]])
    n = torch.tensor([[0.25, 0.0], [0.05, 0.0], [0.0, 0.0]])
    d = lambda x: math.sqrt(x * x + 1e-8)  # noqa: E731
    hinge = [d(0.1) - d(0.25) + 0.2, d(0.1) - d(0.05) + 0.2, 0.4]  # the last one clamped at 2m
    assert mad.loss_triplet(a, p, n, 0.2).item() == pytest.approx(sum(hinge) / 3, abs=1e-6)
    n_easy = torch.tensor([[1.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    assert mad.loss_triplet(a, p, n_easy, 0.2).item() == 0.0


def test_mining_takes_a_same_label_positive_and_one_of_the_5_nearest_negatives():
    """Anchor 0 has one same-label image (1) and eight others at distances 0.05 ... 0.40."""
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 7])[:, None]
    x = torch.tensor([0.0, 0.9, 0.40, 0.05, 0.35, 0.10, 0.30, 0.15, 0.25, 0.20, 2.0])
    codes = torch.stack([x, torch.zeros_like(x)], 1)
    negatives, positives_of_2 = set(), set()
    for seed in range(200):
        pos, neg = mad.mine_triplets(codes, labels, torch.Generator().manual_seed(seed))
        assert pos[0] == 1 and pos[1] == 0  # the only other image with their label
        assert pos[10] == 10  # no other image with label 7: itself (make_triplets' fallback)
        assert labels[neg][:, 0].ne(labels[:, 0]).all()
        negatives.add(neg[0].item())
        positives_of_2.add(pos[2].item())
    # the five label-1 images nearest to anchor 0 (x = 0.05 ... 0.25), never the three farther
    assert negatives == {3, 5, 7, 9, 8}
    assert positives_of_2 == {3, 4, 5, 6, 7, 8, 9}  # any other label-1 image, never itself


# A hand-built style batch: (person, Eyeglasses, Bangs, Wearing_Hat) per image; a person with one key
# plays a VoxCeleb clip. Codes on a line, so the nearest images are known.
STYLE_BATCH = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0],
                            [1, 1, 0, 0], [2, 0, 0, 0], [2, 1, 1, 1], [3, 0, 0, 1], [4, 0, 1, 1],
                            [4, 0, 1, 1]])
STYLE_X = torch.tensor([0.0, 0.01, 0.9, 0.3, 0.02, 0.5, 0.03, 0.6, 0.2, 0.8, 0.81])


def test_style_mining_negative_is_the_same_person_in_another_look_positive_another_person():
    """The original's style triplets (make_triplets with [ids, vids]): the negative is the same
    person in another clip; our positive shares the look (the key) but preferably not the person."""
    codes = torch.stack([STYLE_X, torch.zeros_like(STYLE_X)], 1)
    person = STYLE_BATCH[:, 0]
    seen = {i: (set(), set()) for i in range(len(STYLE_BATCH))}
    for seed in range(100):
        pos, neg = mad.mine_triplets(codes, STYLE_BATCH, torch.Generator().manual_seed(seed), by_person=True)
        for i, (p, n) in enumerate(zip(pos.tolist(), neg.tolist())):
            seen[i][0].add(p)
            seen[i][1].add(n)
    # person 0 in look 000: positives are the other people in look 000 (never 1, the same person);
    # negatives are person 0 in its other looks (2 and 3), never another person
    assert seen[0] == ({4, 6}, {2, 3}) and seen[1] == ({4, 6}, {2, 3})
    assert seen[5] == ({2}, {4})  # person 1 in look 100: person 0 shares it; person 1's other look
    assert seen[7] == ({7}, {6})  # nobody else in look 111: itself; person 2's other look
    assert seen[9] == ({10}, set(seen[9][1]))  # look 011 only on person 4: the same "clip"
    # person 3 has one photo: the negative falls back to one of the 5 nearest other-look images
    nearest = sorted((abs(STYLE_X[j] - STYLE_X[8]).item(), j) for j in range(11) if j != 8)[:5]
    assert seen[8] == ({8}, {j for _, j in nearest})
    others = [j for j in range(11) if person[j] != 4 and (STYLE_BATCH[j, 1:] != STYLE_BATCH[9, 1:]).any()]
    assert seen[9][1] <= set(others) and len(seen[9][1]) == 5


def test_style_loss_on_two_people_in_two_looks():
    """Images: A in look 1, A in look 2, B in look 1, B in look 2. Each anchor has one positive
    (the other person, same look) and one negative (same person, other look): a known loss."""
    labels = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]])
    angle = torch.deg2rad(torch.tensor([0.0, 10.0, 20.0, 30.0]))  # each look nearer the same person
    codes = torch.stack([angle.cos(), angle.sin()], 1)
    positive, negative = [2, 3, 0, 1], [1, 0, 3, 2]

    def dist(i, j):
        return math.sqrt(((codes[i] - codes[j]) ** 2).sum().item() + 1e-8)
    hinges = [min(max(dist(i, p) - dist(i, n) + 0.2, 0.0), 0.4) for i, p, n in zip(range(4), positive, negative)]
    loss = mad.loss_factor("style", codes, labels, tiny_args(), torch.Generator().manual_seed(0))
    assert sum(hinges) / 4 > 0.3 and loss.item() == pytest.approx(sum(hinges) / 4, abs=1e-6)


def test_style_attributes_change_between_photos_of_one_person(smoke_runs):
    """STYLE_ATTRS are looks, not traits: on the demo each changes within some person (Male, an
    identity trait, does not)."""
    data = common.load_celeba("demo:16", None, "train", 32, 170, verbose=False)  # all 40 attributes
    ids = common.load_demo_params(data.root)
    person = torch.tensor([ids[f]["identity"] for f in data.files])

    def varies(name):
        column = data.labels[:, data.attr_names.index(name)]
        return any(len(column[person == p].unique()) > 1 for p in person.unique())
    assert not varies("Male") and varies("Eyeglasses")  # the check tells a trait from a look
    assert all(varies(name) for name in mad.STYLE_ATTRS), mad.STYLE_ATTRS


def test_batches_after_ae_pair_one_person_in_two_looks(smoke_runs, tmp_path):
    """setup_run's pairs: every pair of two photos of one person whose looks differ, and no other
    (counted here from the labels), so every style anchor has a same-person negative."""
    out, _ = smoke_runs
    argv = ["--smoke", "--stage", "disentangle", "--init", str(out / "ae" / "ckpt.pt"), "--out", str(tmp_path)]
    args = mad.configure(mad.parse_dataclass(mad.Args, argv), torch.device("cpu"))
    _, _, _, data, factors, pairs, _ = mad.setup_run(args, torch.device("cpu"))
    params = common.load_demo_params(data.root)
    rows = [(params[f]["identity"], tuple(data.labels[k, [data.attr_names.index(a) for a in mad.STYLE_ATTRS]].tolist()))
            for k, f in enumerate(data.files)]
    expected = {(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))
                if rows[i][0] == rows[j][0] and rows[i][1] != rows[j][1]}
    assert {tuple(p) for p in pairs.tolist()} == expected and len(pairs) == len(expected) > 0


def test_gan_pose_z_and_reconstruction_losses_on_known_values():
    zero = torch.zeros(4)
    assert mad.loss_gan_d(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert mad.loss_gan_g(torch.full((3,), 2.0)).item() == pytest.approx(math.log1p(math.exp(-2)))
    assert mad.loss_pose(torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 0, 3]])).item() == pytest.approx(10 / 3)
    assert mad.loss_z_recon(torch.ones(2, 99), torch.zeros(2, 99)).item() == 1.0
    # lambda_rec x our L1 on [-1, 1] images is the original's 255 x L1 on [0, 1] images (train.py)
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    original = 255 * ((x + 1) / 2 - (y + 1) / 2).abs().mean()
    assert (mad.Args().lambda_rec * mad.loss_rec(x, y)).item() == pytest.approx(original.item(), rel=1e-5)


def test_cycle_loss_ignores_pose_and_averages_the_rest():
    a = {"pose": torch.zeros(2, 3), "identity": torch.zeros(2, 4), "style": torch.zeros(2, 4),
         "expression": torch.zeros(2, 4)}
    b = {"pose": torch.full((2, 3), 9.0), "identity": torch.ones(2, 4), "style": torch.zeros(2, 4),
         "expression": torch.full((2, 4), -0.5)}
    assert mad.loss_cycle(a, b).item() == pytest.approx((4 * 1 + 4 * 0.5) / 12)


class PassThrough(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("factor", ["pose", "identity"])
def test_disentangle_losses_swap_the_factor_and_relabel_the_cycled_codes(factor):
    """With E and G replaced by the identity map, the cycle is E_dis(G_dis(f~)): recompute every
    term by hand from the same random draws (mining first for a triplet factor, then pi)."""
    args = tiny_args()
    torch.manual_seed(0)
    e_dis, g_dis = mad.FactorEncoder(99, 32, 16), mad.FactorDecoder(99, 16)
    nets = torch.nn.ModuleDict(dict(e=PassThrough(), g=PassThrough(), e_dis=e_dis, g_dis=g_dis))
    z = torch.randn(8, 99)
    _, labels = random_batch()
    z_recon, terms = mad.disentangle_losses(nets, z, labels[factor], factor, args, no_amp,
                                            torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    f = e_dis(z)
    if factor == "pose":
        own = F.mse_loss(f["pose"], labels["pose"])
    else:
        pos, neg = mad.mine_triplets(f[factor], labels[factor], gen)
        own = mad.loss_triplet(f[factor], f[factor][pos], f[factor][neg], 0.2)
    perm = torch.randperm(8, generator=gen)
    swapped = {k: v.detach()[perm] if k == factor else v.detach() for k, v in f.items()}
    cycled = e_dis(g_dis(swapped))
    rest = [k for k in mad.FACTORS if k != "pose"]
    cycle = (torch.cat([swapped[k] for k in rest], 1) - torch.cat([cycled[k] for k in rest], 1)).abs().mean()
    if factor == "pose":
        aug = F.mse_loss(cycled["pose"], labels["pose"][perm])
    else:
        pos, neg = mad.mine_triplets(cycled[factor], labels[factor][perm], gen)
        aug = mad.loss_triplet(cycled[factor], cycled[factor][pos], cycled[factor][neg], 0.2)
    assert torch.allclose(z_recon, g_dis(f))
    assert terms["z_rec"].item() == pytest.approx((z - g_dis(f)).abs().mean().item(), rel=1e-6)
    assert terms[f"f_{factor}"].item() == pytest.approx(own.item(), rel=1e-6)
    assert terms["cycle"].item() == pytest.approx(cycle.item(), rel=1e-6)
    assert terms[f"aug_{factor}"].item() == pytest.approx(aug.item(), rel=1e-6)


def test_expression_triplets_weigh_twice():
    codes = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1.0])[:, None]
    args = tiny_args()
    losses = [mad.loss_factor(name, codes, labels, args, torch.Generator().manual_seed(3)).item()
              for name in ("identity", "expression")]
    assert losses[0] > 0 and losses[1] == pytest.approx(2 * losses[0])


def test_factor_schedule_follows_the_original_mix_and_skips_missing_labels():
    counts = {f: [mad.factor_of_step(s, mad.FACTORS) for s in range(10)].count(f) for f in mad.FACTORS}
    assert counts == {"pose": 2, "identity": 3, "expression": 3, "style": 2}
    no_pose = [mad.factor_of_step(s, ["identity", "style", "expression"]) for s in range(16)]
    assert "pose" not in no_pose and no_pose[:8] == ["identity", "expression", "style", "identity",
                                                     "expression", "identity", "expression", "style"]
    with pytest.raises(InputError, match="no labels"):
        mad.factor_of_step(0, [])


def test_demo_labels_pose_in_radians_identity_and_attribute_keys(smoke_runs):
    data = common.load_celeba("demo:16", mad.EXPRESSION_ATTRS + mad.STYLE_ATTRS, "train", 32, 170, verbose=False)
    factors = mad.build_factors(data, tiny_args(data="demo:16"), demo=True)
    params = common.load_demo_params(data.root)
    first = params[data.files[0]]
    expected = [math.radians(first[k]) for k in ("yaw", "pitch", "roll")]
    assert factors["pose"][0].tolist() == pytest.approx(expected, abs=1e-6)
    assert factors["identity"][:, 0].tolist() == [params[f]["identity"] for f in data.files]
    assert factors["expression"].shape == (len(data.files), 2)
    style_cols = [data.attr_names.index(a) for a in mad.STYLE_ATTRS]  # the person, then the key
    assert torch.equal(factors["style"], torch.cat([factors["identity"], data.labels[:, style_cols].long()], 1))
    smiling = data.attr_names.index("Smiling")
    assert torch.equal(factors["expression"][:, 0], data.labels[:, smiling])


# ------------------------------------------------------------------------------------------------
# Pose from landmarks
# ------------------------------------------------------------------------------------------------
def test_pose_of_a_frontal_symmetric_face_is_zero():
    yaw, pitch, roll = mad.pose_from_landmarks(FRONTAL[None])[0].tolist()
    assert yaw == pytest.approx(0, abs=1e-4) and roll == pytest.approx(0, abs=1e-4)
    assert pitch == pytest.approx(0, abs=1e-3)  # FRONTAL_V is this face's (135-112)/(152-112)


@pytest.mark.parametrize("angle", [-20.0, 30.0])
def test_rotated_face_gives_its_rotation_as_roll(angle):
    t = math.radians(angle)
    rotation = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    centre = torch.tensor([89.0, 125.0])
    points = (FRONTAL - centre) @ rotation.T * 0.8 + centre + torch.tensor([3.0, -2.0])
    yaw, pitch, roll = mad.pose_from_landmarks(points[None])[0].tolist()
    assert roll == pytest.approx(angle, abs=1e-3)
    assert yaw == pytest.approx(0, abs=1e-3) and pitch == pytest.approx(0, abs=1e-2)


def test_shifted_nose_gives_yaw_with_its_sign():
    right, left = FRONTAL.clone(), FRONTAL.clone()
    right[2, 0] += 5
    left[2, 0] -= 5
    pose = mad.pose_from_landmarks(torch.stack([right, left]))
    expected = math.degrees(math.atan(5 / 38 / mad.NOSE_DEPTH))
    assert pose[0, 0].item() == pytest.approx(expected, rel=1e-4)
    assert pose[1, 0].item() == pytest.approx(-expected, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Which networks each step may change
# ------------------------------------------------------------------------------------------------
def test_each_stage_optimises_exactly_its_networks():
    args = tiny_args()
    nets = tiny_nets(args)
    params = lambda *ms: {id(p) for m in ms for p in m.parameters()}  # noqa: E731
    owned = lambda opt: {id(p) for group in opt.param_groups for p in group["params"]}  # noqa: E731
    expect = {"opt_ae": params(nets.e, nets.g), "opt_dz": params(nets.dz), "opt_dx": params(nets.dx),
              "opt_dis": params(nets.e_dis, nets.g_dis)}
    for stage, names in {"ae": ["opt_ae", "opt_dx", "opt_dz"], "disentangle": ["opt_dis"],
                         "joint": ["opt_ae", "opt_dis", "opt_dx", "opt_dz"]}.items():
        optimizers = mad.configure_stage(nets, stage, args)
        assert sorted(optimizers) == names
        for name, opt in optimizers.items():
            assert owned(opt) == expect[name], f"{stage}: {name}"
    lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}
    assert lrs == {"opt_ae": 2e-5, "opt_dz": 2e-5, "opt_dx": 1e-5, "opt_dis": 8e-5}
    assert optimizers["opt_ae"].param_groups[0]["betas"] == (0.0, 0.999)
    assert optimizers["opt_dis"].param_groups[0]["betas"] == (0.9, 0.999)


def test_discriminator_steps_leave_the_encoder_and_decoder_unchanged():
    """The fakes come with their graph, as train_step passes them: the D steps must detach them
    and step only D's parameters (issue 19)."""
    args = tiny_args()
    nets = tiny_nets(args)
    optimizers = mad.configure_stage(nets, "ae", args)
    images, _ = random_batch()
    before = {name: snapshot(m) for name, m in nets.items()}
    z_code = nets.e(images)
    img_recon = nets.g(z_code)
    before_e = snapshot(nets.e)  # the forward passes update BatchNorm statistics; not the weights
    before_g = snapshot(nets.g)
    stats = mad.d_step(nets, optimizers, 0, images, img_recon, z_code, torch.randn(8, 99), args, no_amp)
    assert set(stats) == {"d_z", "d_x"}
    assert same(nets.e, before_e) and same(nets.g, before_g)
    assert all(p.grad is None for p in [*nets.e.parameters(), *nets.g.parameters()])
    assert not same(nets.dz, before["dz"]) and not same(nets.dx, before["dx"])


def test_a_disentangle_step_leaves_the_frozen_networks_bit_identical():
    args = tiny_args(stage="disentangle")
    nets = tiny_nets(args)
    optimizers = mad.configure_stage(nets, "disentangle", args)
    before = {name: snapshot(m) for name, m in nets.items()}
    images, labels = random_batch()
    for step, factor in enumerate(["pose", "identity", "expression", "style"]):
        stats = mad.train_step(nets, optimizers, step, images, labels, args, no_amp,
                               torch.Generator().manual_seed(step))
        assert "rec" not in stats and "d_z" not in stats
        # config.py: W_DISENT 5 x (W_Z_RECON 4 x z_rec + W_FEAT, W_CYCLE, W_AUG 1 x the others)
        expected = 5 * (4 * stats["z_rec"] + stats[f"f_{factor}"] + stats["cycle"] + stats[f"aug_{factor}"])
        assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    for name in ("e", "g", "dz", "dx"):  # parameters and BatchNorm statistics
        assert same(getattr(nets, name), before[name]), name
    assert not same(nets.e_dis, before["e_dis"]) and not same(nets.g_dis, before["g_dis"])


def test_ae_and_joint_steps_update_their_networks():
    images, labels = random_batch()
    for stage, changed in (("ae", ("e", "g", "dz", "dx")), ("joint", ("e", "g", "dz", "dx", "e_dis", "g_dis"))):
        args = tiny_args(stage=stage)
        nets = tiny_nets(args)
        optimizers = mad.configure_stage(nets, stage, args)
        before = {name: snapshot(m) for name, m in nets.items()}
        stats = mad.train_step(nets, optimizers, 0, images, labels, args, no_amp, torch.Generator())
        assert {"d_z", "d_x", "rec", "adv_z", "adv_x"} <= set(stats)
        ae_loss = 127.5 * stats["rec"] + stats["adv_z"] + stats["adv_x"]
        if stage == "ae":
            assert stats["loss"] == pytest.approx(ae_loss, rel=1e-5)
        assert ("cycle" in stats) == (stage == "joint")
        for name, _ in nets.items():
            assert same(getattr(nets, name), before[name]) == (name not in changed), (stage, name)
        stats = mad.train_step(nets, optimizers, 1, images, labels, args, no_amp, torch.Generator())
        assert "d_z" not in stats and "d_x" not in stats  # D_z every 2nd, D_x every 4th step


# ------------------------------------------------------------------------------------------------
# Command line end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_runs(mad_smoke):
    """`python mad.py --smoke --stage S` for the three stages in order, through the command line
    (conftest.py's session run, shared with tests/test_benchmarks.py)."""
    return mad_smoke


def test_smoke_runs_of_the_three_stages_write_their_files(smoke_runs):
    out, stdout = smoke_runs
    states = {}
    for stage in mad.STAGES:
        folder = out / stage
        state = states[stage] = torch.load(folder / "ckpt.pt", weights_only=True)
        assert state["stage"] == stage and state["step"] == 4 and state["config"]["img_size"] == 32
        assert state["attr_names"] == mad.EXPRESSION_ATTRS + mad.STYLE_ATTRS and state["script"] == "mad.py"
        assert ("opt_ae" in state) == (stage != "disentangle") and ("opt_dis" in state) == (stage != "ae")
        records = common.read_jsonl(folder / "metrics.jsonl")
        assert [r["step"] for r in records] == [2, 4]
        assert ("cycle" in records[-1]) == (stage != "ae") and ("rec" in records[-1]) == (stage != "disentangle")
        assert all(math.isfinite(v) for r in records for v in r.values())
        assert f"step 4/4 [{stage}]" in stdout[stage] and "img/s" in stdout[stage]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["step_000004.png"]
        with Image.open(folder / "samples" / "step_000004.png") as grid:
            assert grid.width > 8 * 32 and grid.height > 7 * 32  # 7 rows x 8 faces, labelled
        assert (folder / "losses.png").is_file() and not (folder / "ckpt.pt.tmp").exists()
    assert str(out / "ae" / "ckpt.pt") in stdout["disentangle"]
    ae, dis, joint = states["ae"], states["disentangle"], states["joint"]
    for net in ("e", "g", "dz", "dx"):  # frozen in the disentangle stage: bit-identical
        assert part(ae, net) and all(torch.equal(v, dis["nets"][k]) for k, v in part(ae, net).items()), net
    for net in ("e_dis", "g_dis"):  # trained there, from the values stage ae saved
        assert not all(torch.equal(v, dis["nets"][k]) for k, v in part(ae, net).items()), net
    for net in mad.build_models(dis["config"]).keys():  # all six learn in the joint stage
        assert not all(torch.equal(v, joint["nets"][k]) for k, v in part(dis, net).items()), net


def test_swap_command_and_help(smoke_runs, tmp_path, run_commands):
    out, _ = smoke_runs
    path = mad.main(["swap", "--ckpt", str(out / "joint" / "ckpt.pt"), "--pairs", "3",
                     "--out", str(tmp_path / "s.png")])
    with Image.open(path) as grid:
        assert grid.width > 3 * 32 and grid.height > 7 * 32  # 7 rows x 3 pairs
    with pytest.raises(mad.InputError, match="expected a .png or .jpg"):  # before loading anything
        mad.main(["swap", "--ckpt", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "grid")])
    train, swap = run_commands(("mad.py", ["--help"]), ("mad.py", ["swap", "--help"]))
    assert train.returncode == 0 and swap.returncode == 0, train.stderr + swap.stderr
    text = " ".join(train.stdout.split())
    assert "--lr-dis LR_DIS Adam learning rate of E_dis and G_dis" in text and "(default: 8e-05)" in text
    assert "--margin MARGIN triplet margin" in text and "--stage STAGE" in text
    text = " ".join(swap.stdout.split())
    assert text.startswith("usage: mad.py swap") and "--pairs PAIRS number of (A, B) pairs" in text


def test_adapter_encodes_the_four_factors(smoke_runs):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from adapters import mad as adapter
    out, _ = smoke_runs
    model = adapter.load(out / "joint" / "ckpt.pt")
    assert model.img_size == 32 and model.crop == 170 and model.edit is None and not model.conditional
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = model.encode(images)
    assert {k: tuple(v.shape) for k, v in codes.items()} == {
        "pose": (3, 3), "identity": (3, 32), "style": (3, 32), "expression": (3, 32)}
    nets, config, _ = mad.load(out / "joint" / "ckpt.pt")
    with torch.no_grad():  # joint: the decoder reads G_dis(E_dis(E(x))) (saae.py forward)
        z = nets.e(images)
        expected = nets.e_dis(z)
        recon = nets.g(nets.g_dis(expected))
    assert all(torch.allclose(codes[k], expected[k], atol=1e-6) for k in mad.FACTORS)
    assert torch.allclose(model.reconstruct(images), recon, atol=1e-6)
    ae = adapter.load(out / "ae" / "ckpt.pt")
    nets_ae, _, _ = mad.load(out / "ae" / "ckpt.pt")
    with torch.no_grad():
        assert torch.allclose(ae.reconstruct(images), nets_ae.g(nets_ae.e(images)), atol=1e-6)
    faces = model.generate(torch.zeros(2, len(model.attr_names)), seed=1)
    assert faces.shape == (2, 3, 32, 32) and torch.equal(faces, model.generate(torch.zeros(2, 1), seed=1))


def test_resume_after_2_steps_then_2_more_equals_4_straight(smoke_runs, tmp_path):
    """In the joint stage: all networks, all losses, identity-paired batches, mining, permutations,
    D_z's dropout. The 4 straight steps are the smoke run's joint stage (from the same disentangle
    checkpoint, logging every 2nd step where these log every step: logging must not matter)."""
    out, _ = smoke_runs
    common_args = ["--smoke", "--stage", "joint", "--init", str(out / "disentangle" / "ckpt.pt"),
                   "--log-every", "1"]
    split = tmp_path / "split"
    mad.main([*common_args, "--steps", "2", "--out", str(split)])
    mad.main([*common_args, "--steps", "4", "--out", str(split), "--resume"])
    a = torch.load(out / "joint" / "ckpt.pt", weights_only=True)
    b = torch.load(split / "joint" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert len(a["nets"]) == len(b["nets"]) > 100
    for key, value in a["nets"].items():  # the six networks' parameters and buffers
        assert torch.equal(value, b["nets"][key]), f"{key} differs after resume"
    for opt in ("opt_ae", "opt_dz", "opt_dx", "opt_dis"):
        for index, moments in a[opt]["state"].items():
            assert torch.equal(moments["exp_avg"], b[opt]["state"][index]["exp_avg"])
    assert [r["step"] for r in common.read_jsonl(split / "joint" / "metrics.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(InputError, match="margin=0.2"):
        mad.main([*common_args, "--steps", "4", "--out", str(split), "--resume", "--margin", "2"])


def test_missing_init_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file") as err:
        mad.main(["--smoke", "--stage", "disentangle", "--out", str(tmp_path)])
    assert str(tmp_path / "ae" / "ckpt.pt") in str(err.value)
    assert not (tmp_path / "disentangle").exists()


def test_refusals_leave_runs_untouched(smoke_runs, tmp_path):
    """A second run into a stage folder that holds a run, another script's checkpoint, a NaN."""
    out, _ = smoke_runs
    before = (out / "ae" / "ckpt.pt").stat().st_mtime_ns
    with pytest.raises(InputError, match="holds a run"):
        mad.main(["--smoke", "--stage", "ae", "--out", str(out)])
    assert (out / "ae" / "ckpt.pt").stat().st_mtime_ns == before
    torch.save({"script": "attgan.py", "config": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="written by mad.py, found attgan.py"):
        mad.load(tmp_path / "other.pt")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = ["--smoke", "--stage", "ae", "--out", str(tmp_path), "--log-every", "1", "--ckpt-every", "1"]
    mad.main([*run, "--steps", "2"])
    monkeypatch.setattr(mad, "loss_rec", lambda recon, real: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="step 3: non-finite"):
        mad.main([*run, "--steps", "4", "--resume"])
    assert torch.load(tmp_path / "ae" / "ckpt.pt", weights_only=True)["step"] == 2
