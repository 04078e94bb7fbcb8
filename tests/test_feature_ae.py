"""Tests for feature_ae.py: shapes of both autoencoders at every PGAE resolution, the fade-in
blend, the phase schedule, the DFC loss (random VGG, and the torchvision weight layout), MSE below
32 px, the attribute-vector arithmetic on a toy encoder, and the command line end to end (smoke
run, exact resume across a PGAE phase change, vectors / grid / lerp / morph, missing VGG weights,
the evaluation contract)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import feature_ae
from conftest import ROOT
from feature_ae import AutoEncoder, InputError

torch.set_num_threads(1)


def no_amp():
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
def test_dcae_shapes_match_the_original_net3():
    """32 px, nef = ndf = 32: encoder 32/64/128 channels down to 4x4, a 2048 -> 100 bottleneck,
    decoder 128 -> 64 -> 32 -> RGB (the original's Net3)."""
    model = AutoEncoder(32, 100, 32, 32).eval()
    assert [model.encoder[s][0].out_channels for s in ("32", "16", "8")] == [32, 64, 128]
    assert model.encoder["32"][0].in_channels == 3  # no fromRGB in the DCAE
    assert model.to_z.in_features == 128 * 4 * 4 and model.to_z.out_features == 100
    assert [model.decoder[s][1].out_channels for s in ("8", "16", "32")] == [64, 32, 3]
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    z = model.encode(images)
    assert z.shape == (3, 100)
    out = model.decode(z)
    assert out.shape == (3, 3, 32, 32) and out.abs().max() <= 1
    assert model(images).shape == (3, 3, 32, 32)


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_pgae_shapes_at_every_resolution(size):
    model = AutoEncoder(64, 12, 4, 4, progressive=True).eval()
    assert model.sizes == [8, 16, 32, 64]
    images = torch.rand(2, 3, size, size) * 2 - 1
    z = model.encode(images)
    assert z.shape == (2, 12)
    recon = model.decode(z, size)
    assert recon.shape == (2, 3, size, size) and recon.abs().max() <= 1
    if size > 8:  # fading in: same shapes
        assert model(images, 0.5).shape == (2, 3, size, size)
        assert model.encode(images, 0.3).shape == (2, 12)
    else:
        with pytest.raises(InputError, match="no fade-in"):
            model(images, 0.5)


def test_pgae_channels_and_wrong_resolution():
    model = AutoEncoder(64, 100, 32, 32, progressive=True)
    # maps of side 32, 16, 8, 4 have 32, 64, 128, 256 channels; fromRGB_64 gives 16
    assert model.from_rgb["64"][0].out_channels == 16
    assert [model.encoder[s][0].out_channels for s in ("64", "32", "16", "8")] == [32, 64, 128, 256]
    assert model.to_z.in_features == 256 * 16
    with pytest.raises(InputError, match="works at"):
        model.encode(torch.zeros(1, 3, 24, 24))


# ------------------------------------------------------------------------------------------------
# Fade-in and the phase schedule
# ------------------------------------------------------------------------------------------------
def test_fade_in_at_alpha_0_is_the_lower_resolution_path_upsampled():
    torch.manual_seed(0)
    model = AutoEncoder(64, 10, 4, 4, progressive=True).eval()
    z = torch.randn(3, 10)
    for size in (16, 32, 64):
        low = model.decode(z, size // 2, 1.0)
        assert torch.allclose(model.decode(z, size, 0.0),
                              F.interpolate(low, scale_factor=2, mode="nearest"), atol=1e-6)
        images = torch.rand(3, 3, size, size) * 2 - 1
        assert torch.allclose(model.encode(images, 0.0),
                              model.encode(F.avg_pool2d(images, 2), 1.0), atol=1e-5)


def test_fade_in_at_alpha_1_is_the_new_block_alone():
    """At α = 1 the previous resolution's toRGB / fromRGB play no part; at α = 0.5 they do."""
    torch.manual_seed(0)
    model = AutoEncoder(64, 10, 4, 4, progressive=True).eval()
    z, images = torch.randn(2, 10), torch.rand(2, 3, 16, 16) * 2 - 1
    before = model.decode(z, 16, 1.0), model.encode(images, 1.0)
    half = model.decode(z, 16, 0.5), model.encode(images, 0.5)
    with torch.no_grad():
        for module in (model.to_rgb["8"], model.from_rgb["8"]):
            for p in module.parameters():
                p.add_(1.0)
    assert torch.equal(model.decode(z, 16, 1.0), before[0])
    assert torch.equal(model.encode(images, 1.0), before[1])
    assert not torch.allclose(model.decode(z, 16, 0.5), half[0])
    assert not torch.allclose(model.encode(images, 0.5), half[1])
    # and the α = 1 output is exactly toRGB_16(block_16(hidden at 8 px))
    hidden = model.decoder["8"](model.from_z(z).view(-1, *model.bottleneck))
    assert torch.equal(before[0], model.to_rgb["16"](model.decoder["16"](hidden)))


def test_pg_schedule():
    schedule = [feature_ae.pg_schedule(step, 3, fade_steps=2, stable_steps=1) for step in range(8)]
    assert schedule == [(0, 1.0), (1, 0.0), (1, 0.5), (1, 1.0), (2, 0.0), (2, 0.5), (2, 1.0),
                        (2, 1.0)]
    assert feature_ae.pg_schedule(10 ** 6, 4, 2500, 2500) == (3, 1.0)
    assert feature_ae.pg_schedule(3750, 4, 2500, 2500) == (1, 0.5)  # halfway into 16 px's fade
    assert feature_ae.pg_schedule(123, 1, 2, 1) == (0, 1.0)  # DCAE: one resolution
    assert feature_ae.resolutions(64, True) == [8, 16, 32, 64]
    assert feature_ae.resolutions(32, False) == [32]


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_vgg():
    return feature_ae.load_vgg("random", "cpu")


def test_dfc_loss_zero_for_identical_images_positive_otherwise(random_vgg):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert feature_ae.loss_dfc(random_vgg, images, images.clone()).item() == 0.0
    recon = (images + 0.1 * torch.randn_like(images)).requires_grad_(True)
    loss = feature_ae.loss_dfc(random_vgg, recon, images)
    assert loss.item() > 0
    loss.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0  # the gradient reaches x̂
    assert all(p.grad is None and not p.requires_grad for p in random_vgg.parameters())  # frozen
    taps = random_vgg(images)
    assert [t.shape[1:] for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    random_vgg.train()
    assert not random_vgg.training  # stays in eval mode


def test_vgg_layout_loads_torchvision_weights(tmp_path):
    """A file laid out as torchvision's vgg19 state dict loads, and the taps equal torchvision's
    features[:12] outputs at indices 1, 6, 11 on ImageNet-normalised input."""
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(2)
    features = make_layers(cfgs["E"]).eval()
    path = tmp_path / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    vgg = feature_ae.load_vgg(str(path), "cpu")
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    hidden = ((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = []
    with torch.no_grad():
        for index in range(12):
            hidden = features[index](hidden)
            if index in (1, 6, 11):
                expected.append(hidden.clone())
    for got, want in zip(vgg(images), expected):
        assert torch.allclose(got, want, atol=1e-5)
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not torchvision's VGG19"):
        feature_ae.load_vgg(str(tmp_path / "other.pth"), "cpu")


def test_missing_vgg_weights_say_what_to_fetch_and_where(tmp_path):
    with pytest.raises(InputError) as err:
        feature_ae.load_vgg(str(tmp_path / "absent.pth"), "cpu")
    message = str(err.value)
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert str(feature_ae.default_vgg_path().parent) in message and "--vgg-weights" in message


def test_cpu_demo_preset_falls_back_to_mse_without_weights_paper_does_not(tmp_path):
    cpu = torch.device("cpu")
    missing = str(tmp_path / "absent.pth")
    args = feature_ae.apply_presets(feature_ae.Args(vgg_weights=missing), cpu)
    assert args.preset == "cpu-demo" and args.loss == "mse" and args.img_size == 32
    args = feature_ae.apply_presets(feature_ae.Args(vgg_weights=missing, preset="paper"), cpu)
    assert args.loss == "dfc" and args.steps == 20000
    args = feature_ae.apply_presets(feature_ae.Args(arch="pgae", vgg_weights="random"), cpu)
    assert args.loss == "dfc" and args.img_size == 64
    args = feature_ae.apply_presets(feature_ae.Args(vgg_weights=missing, loss="dfc"), cpu)
    assert args.preset == "cpu-demo" and args.loss == "dfc"  # asked for: it will need the file


def test_pgae_uses_mse_below_32_px(random_vgg):
    torch.manual_seed(3)
    model = AutoEncoder(32, 8, 4, 4, progressive=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    small = torch.rand(4, 3, 16, 16) * 2 - 1
    stats = feature_ae.train_step(model, optimizer, small, 1.0, "dfc", None, no_amp)  # no VGG
    assert "dfc" not in stats and torch.equal(stats["loss"], stats["mse"])
    large = torch.rand(4, 3, 32, 32) * 2 - 1
    model.eval()  # BatchNorm on running statistics, so train_step's forward equals this one
    with torch.no_grad():
        expected = feature_ae.loss_dfc(random_vgg, model(large, 0.5), large)
    stats = feature_ae.train_step(model, optimizer, large, 0.5, "dfc", random_vgg, no_amp)
    assert torch.equal(stats["loss"], stats["dfc"])
    assert stats["dfc"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["psnr"].item() == pytest.approx(10 * torch.log10(4 / stats["mse"]).item())
    assert not feature_ae.uses_dfc("mse", 64) and feature_ae.uses_dfc("dfc", 32)


# ------------------------------------------------------------------------------------------------
# Attribute vectors
# ------------------------------------------------------------------------------------------------
def test_attribute_vectors_on_a_toy_encoder():
    """Images of one grey level each; the toy encoder returns (mean pixel, 2·mean pixel), so
    v_a = mean code with a − mean code without a, computed by hand."""
    values = torch.tensor([0, 40, 80, 120, 160, 200, 240, 255])
    images = values.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).to(torch.uint8).contiguous()
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1], [1, 0], [0, 0], [0, 1], [1, 1]]).float()
    encode = lambda x: torch.stack([x.mean((1, 2, 3)), 2 * x.mean((1, 2, 3))], 1)  # noqa: E731
    vectors, counts = feature_ae.attribute_vectors(encode, images, labels, max_per_side=1000)
    levels = values.float() / 127.5 - 1  # what common.to_float makes of them
    for a in range(2):
        on, off = labels[:, a] > 0.5, labels[:, a] < 0.5
        diff = levels[on].mean() - levels[off].mean()
        assert torch.allclose(vectors[a], torch.stack([diff, 2 * diff]), atol=1e-6)
        assert counts[a].tolist() == [int(on.sum()), int(off.sum())]
    capped, counts = feature_ae.attribute_vectors(encode, images, labels, max_per_side=2)
    assert counts.tolist() == [[2, 2], [2, 2]]
    # an attribute nobody has gets a zero vector
    vectors, counts = feature_ae.attribute_vectors(encode, images, torch.zeros(8, 1))
    assert counts.tolist() == [[0, 8]] and vectors.abs().sum() == 0


def test_edit_codes_adds_and_removes_vectors():
    z = torch.zeros(2, 3)
    vectors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    src = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    tgt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    edited = feature_ae.edit_codes(z, vectors, src, tgt, 1.5)
    assert edited.tolist() == [[1.5, -1.5, 0.0], [0.0, 0.0, 0.0]]


def test_lerp_frames_go_from_start_to_end():
    model = AutoEncoder(16, 4, 4, 4).eval()
    z_start, z_end = torch.zeros(1, 4), torch.ones(1, 4)
    frames = feature_ae.lerp_frames(model, z_start, z_end, 5, 16, 1.0)
    assert frames.shape == (5, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(frames[0], model.decode(z_start, 16)[0], atol=1e-5)
        assert torch.allclose(frames[-1], model.decode(z_end, 16)[0], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Command line end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, face_attr_cache):
    """`python feature_ae.py --smoke --arch pgae` through the command line (8 -> 16 -> 32 px)."""
    out = tmp_path_factory.mktemp("fae_smoke")
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "feature_ae.py"), "--smoke", "--arch", "pgae",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def run_cli(cache_env, *args):
    env = dict(cache_env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "feature_ae.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_smoke_run_writes_checkpoint_metrics_and_samples(smoke_run):
    out, stdout = smoke_run
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "step", "phase", "config", "attr_names", "rng"} <= set(state)
    assert state["step"] == 6 and state["config"]["arch"] == "pgae"
    assert state["phase"] == {"size": 32, "alpha": 0.5}  # step 5: 32 px fading in, α = 1/2
    assert state["attr_names"] == feature_ae.default_attrs("demo:16")
    assert state["optimizer"]["state"]
    records = common.read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["res"] for r in records] == [16, 16, 32]
    assert "dfc" in records[2] and "dfc" not in records[0]  # the feature loss only at 32 px
    assert all(r["psnr"] > 0 and r["mse"] > 0 for r in records)
    assert "warning: --vgg-weights random" in stdout and "step 6/6" in stdout and "ETA" in stdout
    for step, size in ((3, 16), (6, 32)):
        with Image.open(out / "samples" / f"step_{step:06d}.png") as grid:
            # 8 rows x (input, recon, ± 6 attributes) = 14 columns, shown at >= 96 px each
            assert grid.width > 14 * 96 and grid.height > 8 * 96
    assert (out / "losses.png").is_file() and not (out / "ckpt.pt.tmp").exists()


def test_resume_across_a_pgae_phase_change_equals_a_straight_run(tmp_path):
    """2 steps (8 px, then 16 px fading in), resume to 4 (16 px α 0.5, then stable): identical to
    4 steps straight, parameters, BatchNorm buffers and Adam moments."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common_args = ["--smoke", "--arch", "pgae", "--sample-every", "100"]
    feature_ae.main([*common_args, "--steps", "4", "--out", str(straight)])
    feature_ae.main([*common_args, "--steps", "2", "--out", str(split)])
    assert torch.load(split / "ckpt.pt", weights_only=True)["phase"] == {"size": 16, "alpha": 0.0}
    feature_ae.main([*common_args, "--steps", "4", "--out", str(split), "--resume"])
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["phase"] == b["phase"] == {"size": 16, "alpha": 1.0}
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, moments in a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg"], b["optimizer"]["state"][index]["exp_avg"])
    assert [r["step"] for r in common.read_jsonl(split / "metrics.jsonl")] == [2, 4]


def test_resume_with_another_architecture_is_refused(smoke_run):
    out, _ = smoke_run
    with pytest.raises(InputError, match="arch='pgae'.*arch='dcae'"):  # checkpoint pgae, run dcae
        feature_ae.main(["--smoke", "--out", str(out), "--resume"])


def test_missing_vgg_weights_stop_training_with_one_line(cache_env, tmp_path):
    proc = run_cli(cache_env, "--smoke", "--out", tmp_path, "--vgg-weights", tmp_path / "no.pth")
    assert proc.returncode == 1
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error:") and "vgg19-dcbb9e9d.pth" in message
    assert "Traceback" not in proc.stderr and not (tmp_path / "ckpt.pt").exists()


def test_vectors_grid_lerp_and_morph(smoke_run, cache_env, tmp_path):
    out, _ = smoke_run
    ckpt = out / "ckpt.pt"
    feature_ae.main(["vectors", "--ckpt", str(ckpt), "--max-per-side", "50", "--device", "cpu"])
    saved = torch.load(out / "vectors.pt", weights_only=True)
    assert saved["attr_names"] == feature_ae.default_attrs("demo:16") and saved["step"] == 6
    for name in saved["attr_names"]:
        assert saved["vectors"][name].shape == (16,)  # smoke z_size
        assert all(0 < n <= 50 for n in saved["counts"][name])

    feature_ae.main(["grid", "--ckpt", str(ckpt), "--count", "3", "--attrs", "Smiling", "Male",
                     "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    with Image.open(tmp_path / "grid.png") as grid:  # 3 rows x 6 columns at 32 px (shown x3)
        assert grid.width > 6 * 96 and grid.height > 3 * 96 and grid.width > grid.height

    # A large strength so that consecutive frames differ (Pillow merges identical ones).
    proc = run_cli(cache_env, "lerp", "--ckpt", ckpt, "--attr", "smiling", "--frames", 6,
                   "--strength", 400, "--out", tmp_path, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in ("add", "remove"):
        with Image.open(tmp_path / f"lerp_Smiling_{word}.gif") as gif:
            assert gif.n_frames == 6 and gif.size == (32 * 4, 32 * 4)
    proc = run_cli(cache_env, "morph", "--ckpt", ckpt, "--index-a", 0, "--index-b", 5,
                   "--frames", 5, "--scale", 2, "--out", tmp_path / "morph.gif", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(tmp_path / "morph.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (64, 64)
    with pytest.raises(InputError, match="--frames 1"):
        feature_ae.main(["morph", "--ckpt", str(ckpt), "--frames", "1", "--device", "cpu"])


def test_load_for_eval(smoke_run):
    out, _ = smoke_run
    model = feature_ae.load_for_eval(out / "ckpt.pt")
    assert model.img_size == 32 and model.generate is None
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    recon = model.reconstruct(images)
    assert recon.shape == (3, 3, 32, 32) and recon.abs().max() <= 1
    assert model.encode(images)["z"].shape == (3, 16)
    attrs = torch.zeros(3, len(model.attr_names))
    assert torch.allclose(model.edit(images, attrs, attrs), recon, atol=1e-6)  # no change asked
    target = attrs.clone()
    target[:, 0] = 1
    edited = model.edit(images, attrs, target)
    assert edited.shape == (3, 3, 32, 32) and not torch.allclose(edited, recon)
