"""Tests for mad.py: shapes and the code split, the losses and the triplet sampling on toy cases,
pose from landmarks, the frozen autoencoder of the disentangle stage, the retrieval matrix, and
the command line end to end (the three stages, swap / sample / eval, exact resume)."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import mad
from conftest import ROOT
from mad import InputError

torch.set_num_threads(1)

FRONTAL = torch.tensor([[70.0, 112.0], [108.0, 112.0], [89.0, 135.0], [72.0, 152.0], [106.0, 152.0]])


def tiny_args(**changes):
    """The --smoke configuration as an Args (attributes filled as training fills them)."""
    args = mad.Args(**{k: v for k, v in mad.SMOKE.items() if k != "data"})
    args.attrs = mad.default_attrs("demo")
    return dataclasses.replace(args, **changes)


def tiny_nets(args):
    torch.manual_seed(0)
    return mad.make_nets(*mad.build_models(dataclasses.asdict(args)), compile_=False)


def random_targets(batch, generator):
    """Supervision of a batch shaped as build_factors gives it: 4 identities, binary labels."""
    return {"pose": torch.randn(batch, 3, generator=generator) * 20,
            "identity": torch.arange(batch)[:, None] % 4,
            "expression": torch.randint(0, 2, (batch, 2), generator=generator).float(),
            "style": torch.randint(0, 2, (batch, 8), generator=generator).float()}


# ------------------------------------------------------------------------------------------------
# Shapes and the code split
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64])
def test_module_shapes(size):
    e, g, dz, dx = mad.build_models(dataclasses.asdict(tiny_args(img_size=size)))
    images = torch.rand(3, 3, size, size) * 2 - 1
    z = e(images)
    assert z.shape == (3, 99)
    assert e.trunk(images).shape == (3, 32 * 4 * 4)  # max_dim channels at 4x4
    out = g(z)
    assert out.shape == images.shape and out.abs().max() <= 1  # tanh
    assert dz(z).shape == (3,) and dx(images).shape == (3,)
    assert len(e.trunk) == 3 + (mad.n_levels(size) - 1) + 1  # stem (conv s2, BN, LReLU), blocks, flatten


def test_default_code_split_is_3_32_32_32_and_sizes_are_configurable():
    assert mad.code_sizes(dataclasses.asdict(mad.Args())) == {
        "pose": 3, "identity": 32, "style": 32, "expression": 32}
    args = tiny_args(pose_dim=2, identity_dim=8, style_dim=4, expression_dim=6)
    sizes = mad.code_sizes(dataclasses.asdict(args))
    e, g, dz, _ = mad.build_models(dataclasses.asdict(args))
    z = e(torch.rand(2, 3, 32, 32))
    assert z.shape == (2, 20) and g(z).shape == (2, 3, 32, 32) and dz(z).shape == (2,)
    parts = mad.split_code(z, sizes)
    assert list(parts) == ["pose", "identity", "style", "expression"]
    assert [p.shape[1] for p in parts.values()] == [2, 8, 4, 6]
    assert torch.equal(parts["style"], z[:, 10:14])
    assert torch.equal(mad.join_code(parts), z)
    swapped = mad.swap_codes(z[:1], z[1:], "identity", sizes)
    assert torch.equal(swapped[:, 2:10], z[1:, 2:10]) and torch.equal(swapped[:, :2], z[:1, :2])
    assert torch.equal(swapped[:, 10:], z[:1, 10:])


def test_bad_settings_are_refused():
    config = dataclasses.asdict(tiny_args(img_size=48))
    with pytest.raises(InputError, match="power of two"):
        mad.check_config(config)
    with pytest.raises(InputError, match="--stage"):
        mad.check_config(dataclasses.asdict(tiny_args(stage="both")))


# ------------------------------------------------------------------------------------------------
# Losses and triplets
# ------------------------------------------------------------------------------------------------
def test_triplet_loss_on_a_toy_case():
    """Anchor at 0. Row 0: ‖a − p‖ = 5, ‖a − n‖ = 10 -> max(0, 5 − 10 + 1) = 0. Row 1: p and n
    swapped -> max(0, 10 − 5 + 1) = 6. Mean 3; with only row 0 valid, 0; margin 6 -> (1 + 11)/2."""
    anchor = torch.zeros(2, 2)
    near, far = torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])
    positive, negative = torch.stack([near, far]), torch.stack([far, near])
    assert mad.triplet_loss(anchor, positive, negative, 1.0).item() == pytest.approx(3.0)
    assert mad.triplet_loss(anchor, positive, negative, 6.0).item() == pytest.approx(6.0)
    valid = torch.tensor([True, False])
    assert mad.triplet_loss(anchor, positive, negative, 1.0, valid).item() == 0.0
    none = torch.tensor([False, False])
    assert mad.triplet_loss(anchor, positive, negative, 1.0, none).item() == 0.0


def test_gan_and_pose_losses_on_known_values():
    zero = torch.zeros(4)
    assert mad.loss_gan_d(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert mad.loss_gan_g(zero).item() == pytest.approx(math.log(2))
    assert mad.loss_gan_d(torch.full((4,), 30.0), torch.full((4,), -30.0)).item() < 1e-10
    assert mad.loss_pose(torch.ones(2, 3), torch.full((2, 3), 30.0), 30.0).item() == 0.0
    assert mad.loss_pose(torch.zeros(1, 3), torch.tensor([[30.0, 0.0, -60.0]]), 30.0).item() == \
        pytest.approx((1 + 0 + 4) / 3)
    assert mad.loss_rec(torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)).item() == 0.5
    assert mad.psnr(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.2)) == pytest.approx(20.0)


def test_sample_triplets_respects_the_keys_and_is_deterministic():
    keys = torch.tensor([[0], [0], [1], [2], [1], [0]])
    anchor, positive, negative, valid = mad.sample_triplets(keys, torch.Generator().manual_seed(3))
    assert valid.tolist() == [True, True, True, False, True, True]  # key 2 has no positive
    for a in anchor[valid].tolist():
        assert positive[a] != a and torch.equal(keys[positive[a]], keys[a])
        assert not torch.equal(keys[negative[a]], keys[a])
    again = mad.sample_triplets(keys, torch.Generator().manual_seed(3))
    assert torch.equal(again[1], positive) and torch.equal(again[2], negative)
    multi = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # equal = all columns equal
    _, positive, negative, valid = mad.sample_triplets(multi, torch.Generator().manual_seed(0))
    assert valid.tolist() == [True, True, False] and positive[:2].tolist() == [1, 0]
    assert negative[:2].tolist() == [2, 2]


def test_partner_indices_are_other_images_of_the_same_person():
    identities = torch.tensor([5, 7, 5, 9, 7, 5, 1])
    groups = mad.identity_groups(identities)
    idx = torch.arange(7)
    partners = mad.partner_indices(idx, groups, torch.Generator().manual_seed(0))
    assert torch.equal(identities[partners], identities)
    assert partners[3] == 3 and partners[6] == 6  # alone: itself
    assert all(p != i for i, p in enumerate(partners.tolist()) if i not in (3, 6))


# ------------------------------------------------------------------------------------------------
# Pose from landmarks
# ------------------------------------------------------------------------------------------------
def test_pose_of_a_frontal_symmetric_face_is_zero():
    yaw, pitch, roll = mad.pose_from_landmarks(FRONTAL[None])[0].tolist()
    assert yaw == pytest.approx(0, abs=1e-4) and roll == pytest.approx(0, abs=1e-4)
    assert pitch == pytest.approx(0, abs=1e-3)  # FRONTAL_V is this face's (135−112)/(152−112)


@pytest.mark.parametrize("angle", [-20.0, 7.5, 30.0])
def test_rotated_face_gives_its_rotation_as_roll(angle):
    t = math.radians(angle)
    rotation = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    centre = torch.tensor([89.0, 125.0])
    points = (FRONTAL - centre) @ rotation.T * 0.8 + centre + torch.tensor([3.0, -2.0])
    yaw, pitch, roll = mad.pose_from_landmarks(points[None])[0].tolist()
    assert roll == pytest.approx(angle, abs=1e-3)
    assert yaw == pytest.approx(0, abs=1e-3) and pitch == pytest.approx(0, abs=1e-2)


def test_shifted_nose_gives_yaw_with_its_sign_and_lowered_nose_a_negative_pitch():
    right, left, down = FRONTAL.clone(), FRONTAL.clone(), FRONTAL.clone()
    right[2, 0] += 5
    left[2, 0] -= 5
    down[2, 1] += 4
    pose = mad.pose_from_landmarks(torch.stack([right, left, down]))
    expected = math.degrees(math.atan(5 / 38 / mad.NOSE_DEPTH))
    assert pose[0, 0].item() == pytest.approx(expected, rel=1e-4) and pose[0, 0] > 10
    assert pose[1, 0].item() == pytest.approx(-expected, rel=1e-4)
    assert pose[2, 1] < -10 and abs(pose[2, 0]) < 1e-3  # nose nearer the mouth: looking down


def test_build_factors_without_landmarks_switches_pose_off_with_a_warning(capsys):
    data = common.FaceData(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
                           labels=torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 0]]),
                           attr_names=["Smiling", "Male", "Eyeglasses"], files=list("abcd"),
                           identities=torch.tensor([1, 1, 2, 3]), landmarks=None, root=ROOT,
                           layout="official", split="train", img_size=(8, 8))
    args = tiny_args(data="/somewhere/celeba", attrs=data.attr_names)
    factors = mad.build_factors(data, args, demo=False)
    assert factors["pose"] is None and "pose supervision is off" in capsys.readouterr().out
    assert factors["identity"].view(-1).tolist() == [1, 1, 2, 3]
    assert factors["expression"].tolist() == [[1.0], [0.0], [1.0], [0.0]]  # Smiling only
    assert factors["style"].tolist() == [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


# ------------------------------------------------------------------------------------------------
# Stages: what each one updates
# ------------------------------------------------------------------------------------------------
def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_disentangle_stage_keeps_the_autoencoder_frozen():
    args = tiny_args(stage="disentangle")
    nets = tiny_nets(args)
    optimizers = mad.configure_stage(nets, "disentangle", args.lr)
    assert set(optimizers) == {"opt_ae"}
    frozen = {"trunk": nets.e.trunk, "decoder": nets.g, "d_z": nets.dz, "d_x": nets.dx}
    before = {name: snapshot(m) for name, m in frozen.items()}
    head_before = snapshot(nets.e.head)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    ctx = lambda: mad.autocast(torch.device("cpu"), False)  # noqa: E731
    for step in range(2):
        stats = mad.train_step(nets, optimizers, step, images, random_targets(8, gen), args, ctx,
                               mad.step_generator(0, step, "disentangle"))
    assert {"rec", "adv_z", "pose", "trip_identity", "trip_expression", "trip_style"} <= set(stats)
    assert "d_z" not in stats and "adv_x" not in stats
    for name, module in frozen.items():  # weights AND BatchNorm running statistics
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key} changed"
    for key, value in nets.e.head.state_dict().items():
        assert not torch.equal(value, head_before[key]), f"head {key} did not train"


def test_ae_and_joint_stages_update_every_network():
    for stage in ("ae", "joint"):
        args = tiny_args(stage=stage)
        nets = tiny_nets(args)
        optimizers = mad.configure_stage(nets, stage, args.lr)
        modules = {"trunk": nets.e.trunk, "head": nets.e.head, "g": nets.g, "dz": nets.dz,
                   "dx": nets.dx}
        before = {name: [p.clone() for p in m.parameters()] for name, m in modules.items()}
        gen = torch.Generator().manual_seed(0)
        stats = mad.train_step(nets, optimizers, 0, torch.rand(8, 3, 32, 32) * 2 - 1,
                               random_targets(8, gen), args,
                               lambda: mad.autocast(torch.device("cpu"), False),
                               mad.step_generator(0, 0, stage))
        for name, module in modules.items():
            assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before[name])), \
                f"{stage}: {name} did not change"
        assert ("trip_identity" in stats) == (stage == "joint")
        assert {"d_z", "d_x", "adv_x", "adv_z", "rec"} <= set(stats)


# ------------------------------------------------------------------------------------------------
# Retrieval
# ------------------------------------------------------------------------------------------------
def test_retrieval_matrix_on_a_toy_code_with_a_perfect_identity_subvector():
    gen = torch.Generator().manual_seed(0)
    identities = torch.arange(40) % 8
    expressions = (torch.arange(40) // 8) % 2
    codes = {"pose": torch.randn(40, 3, generator=gen),
             "identity": torch.eye(8)[identities] * 5 + 0.01 * torch.randn(40, 8, generator=gen),
             "style": torch.randn(40, 6, generator=gen),
             "expression": torch.eye(2)[expressions] + 0.01 * torch.randn(40, 2, generator=gen)}
    labels = {"identity": identities[:, None], "expression": expressions[:, None]}
    for metric in ("cosine", "l2"):
        matrix = mad.retrieval_matrix(codes, labels, metric)
        assert matrix["identity"]["identity"] == 1.0
        assert matrix["expression"]["expression"] == 1.0
        assert matrix["identity"]["pose"] < 0.5 and matrix["identity"]["expression"] < 0.5
    text = mad.format_matrix(matrix)
    assert "z_identity" in text and "identity labels" in text and "1.000" in text
    # a label seen once is not a query: 3 images, labels 0, 0, 1 -> only the two 0s count
    lone = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 1.1]])
    assert mad.nearest_neighbour_accuracy(lone, torch.tensor([[0], [0], [1]]), "l2") == 0.0
    assert mad.nearest_neighbour_accuracy(lone, torch.tensor([[0], [1], [0]]), "l2") == 1.0
    assert math.isnan(mad.nearest_neighbour_accuracy(lone, torch.tensor([[0], [1], [2]])))
    with pytest.raises(InputError, match="cosine"):
        mad.nearest_neighbour_accuracy(codes["pose"], labels["identity"], "dot")


# ------------------------------------------------------------------------------------------------
# Command line end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, face_attr_cache):
    """`python mad.py --smoke --stage S` for the three stages in order, through the command line."""
    out = tmp_path_factory.mktemp("mad_smoke")
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    stdout = {}
    for stage in mad.STAGES:
        proc = subprocess.run([sys.executable, str(ROOT / "mad.py"), "--smoke", "--out", str(out),
                               "--stage", stage], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        stdout[stage] = proc.stdout
    return out, stdout


def test_smoke_runs_of_the_three_stages_write_their_files(smoke_runs):
    out, stdout = smoke_runs
    states = {}
    for stage in mad.STAGES:
        folder = out / stage
        state = torch.load(folder / "ckpt.pt", weights_only=True)
        states[stage] = state
        assert state["stage"] == stage and state["step"] == 4 and state["config"]["img_size"] == 32
        assert state["attr_names"] == mad.default_attrs("demo:16")
        assert ("opt_d" in state) == (stage != "disentangle") and state["opt_ae"]["state"]
        records = common.read_jsonl(folder / "metrics.jsonl")
        assert [r["step"] for r in records] == [2, 4]
        factor_keys = {"pose", "trip_identity", "trip_expression", "trip_style"}
        assert (factor_keys <= set(records[-1])) == (stage != "ae")
        assert all(math.isfinite(v) for r in records for v in r.values())
        assert f"step 4/4 [{stage}]" in stdout[stage] and "img/s" in stdout[stage]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["step_000004.png"]
        with Image.open(folder / "samples" / "step_000004.png") as grid:
            # 8 rows x 8 columns of 32 px (input, recon, B, 4 swaps, prior), labelled
            assert grid.width > 8 * 32 and grid.height > 8 * 32
        assert (folder / "losses.png").is_file() and not (folder / "ckpt.pt.tmp").exists()
    assert "starting from" in stdout["disentangle"] and str(out / "ae" / "ckpt.pt") in stdout["disentangle"]
    # the disentangle stage changed only the encoder's head
    ae, dis = states["ae"], states["disentangle"]
    for net in ("decoder", "d_z", "d_x"):
        assert all(torch.equal(v, dis[net][k]) for k, v in ae[net].items())
    trunk = [k for k in ae["encoder"] if k.startswith("trunk.")]
    assert trunk and all(torch.equal(ae["encoder"][k], dis["encoder"][k]) for k in trunk)
    assert not torch.equal(ae["encoder"]["head.2.weight"], dis["encoder"]["head.2.weight"])
    assert not torch.equal(dis["decoder"]["fc.weight"], states["joint"]["decoder"]["fc.weight"])


def test_swap_sample_and_eval_commands(smoke_runs, tmp_path):
    out, _ = smoke_runs
    ckpt = out / "joint" / "ckpt.pt"
    path = mad.main(["swap", "--ckpt", str(ckpt), "--pairs", "3", "--out", str(tmp_path / "s.png")])
    with Image.open(path) as grid:
        assert grid.width > 3 * 32 and grid.height > 7 * 32  # 7 rows x 3 pairs
    folder = mad.main(["sample", "--ckpt", str(ckpt), "--count", "5", "--frames", "4",
                       "--out", str(tmp_path)])
    assert (folder / "random.png").is_file() and (folder / "interpolate.png").is_file()
    with Image.open(folder / "interpolate_identity.gif") as gif:
        assert gif.n_frames == 6 and gif.width == 128  # 4 frames there, 2 back; x4 upscaled
    result = mad.main(["eval", "--ckpt", str(ckpt), "--max-images", "40"])
    assert result["images"] == 40
    assert set(result["retrieval"]) == {"identity", "expression", "style"}
    assert set(result["retrieval"]["identity"]) == set(mad.FACTORS)
    assert all(0 <= v <= 1 for row in result["retrieval"].values() for v in row.values())
    assert 0 < result["psnr"] < 60


def test_load_for_eval(smoke_runs):
    out, _ = smoke_runs
    model = mad.load_for_eval(out / "joint" / "ckpt.pt")
    assert model.img_size == 32 and model.crop == 170 and model.edit is None
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert model.reconstruct(images).shape == images.shape
    codes = model.encode(images)
    assert {k: v.shape for k, v in codes.items()} == {
        "pose": (3, 3), "identity": (3, 32), "style": (3, 32), "expression": (3, 32)}
    faces = model.generate(torch.zeros(2, len(model.attr_names)), seed=1)
    assert faces.shape == (2, 3, 32, 32) and torch.equal(faces, model.generate(torch.zeros(2, 1), seed=1))


def test_resume_after_2_steps_then_2_more_equals_4_straight(smoke_runs, tmp_path):
    """In the joint stage (all networks, all losses, identity-paired batches, triplets)."""
    out, _ = smoke_runs
    init = str(out / "ae" / "ckpt.pt")
    straight, split = tmp_path / "straight", tmp_path / "split"
    common_args = ["--smoke", "--stage", "joint", "--init", init, "--log-every", "1"]
    mad.main([*common_args, "--steps", "4", "--out", str(straight)])
    mad.main([*common_args, "--steps", "2", "--out", str(split)])
    mad.main([*common_args, "--steps", "4", "--out", str(split), "--resume"])
    a = torch.load(straight / "joint" / "ckpt.pt", weights_only=True)
    b = torch.load(split / "joint" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for net in ("encoder", "decoder", "d_z", "d_x"):  # parameters and buffers
        for key, value in a[net].items():
            assert torch.equal(value, b[net][key]), f"{net}.{key} differs after resume"
    for opt in ("opt_ae", "opt_d"):
        for index, moments in a[opt]["state"].items():
            assert torch.equal(moments["exp_avg"], b[opt]["state"][index]["exp_avg"])
    assert [r["step"] for r in common.read_jsonl(split / "joint" / "metrics.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(InputError, match="margin=1.0"):
        mad.main([*common_args, "--steps", "4", "--out", str(split), "--resume", "--margin", "2"])


def test_missing_init_checkpoint_is_a_clear_error(tmp_path):
    """A stage after 'ae' without its previous stage's checkpoint: refused before any training."""
    with pytest.raises(InputError, match="checkpoint not found") as err:
        mad.main(["--smoke", "--stage", "disentangle", "--out", str(tmp_path)])
    assert str(tmp_path / "ae" / "ckpt.pt") in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "disentangle").exists()
