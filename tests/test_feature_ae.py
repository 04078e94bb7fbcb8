"""Tests for feature_ae.py: both autoencoders against the original's layer sizes and (PGAE) a plain
re-implementation of the original's encode/decode index arithmetic, at every resolution and in the
fade; the phase schedule; the DFC loss against an independent computation on a random VGG19 (and
in fp32 under bf16 autocast); the attribute vectors; vectors.pt keyed by the weights (the bug of a
reused vectors.pt); the command line (smoke run, exact resume across a phase change, --help,
out-of-range arguments, foreign checkpoints, the NaN guard) and the evaluation adapter."""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import feature_ae
from conftest import ROOT, commands
from feature_ae import DCAE, PGAE, InputError

sys.path.insert(0, str(ROOT / "benchmarks"))
from adapters import feature_ae as adapter  # noqa: E402

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Models: the original's sizes, the original's PGAE arithmetic, the fade
# ------------------------------------------------------------------------------------------------
def test_dcae_has_the_original_net3_layers():
    """src/net.py Net3 at 32 px, nef 32, z 100: its parameter shapes in order, and a bare last conv."""
    model = DCAE(32, 100).eval()
    expected = [(32, 3, 4, 4), (32,), (32,), (32,), (64, 32, 4, 4), (64,), (64,), (64,),
                (128, 64, 4, 4), (128,), (128,), (128,), (100, 2048), (100,), (2048, 100), (2048,),
                (64, 128, 3, 3), (64,), (64,), (64,), (32, 64, 3, 3), (32,), (32,), (32,),
                (3, 32, 3, 3), (3,)]
    assert [tuple(p.shape) for p in model.parameters()] == expected
    assert sum(p.numel() for p in model.parameters()) == 671_111
    assert isinstance(model.decoder[-1], nn.Conv2d)  # no tanh (the original's output)
    assert [m.eps for m in model.decoder if isinstance(m, nn.BatchNorm2d)] == [1e-3, 1e-3]
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert model.encode(images).shape == (3, 100) and model(images).shape == (3, 3, 32, 32)


def test_pgae_widths_are_the_original_8_to_128_with_bare_rgb_convs():
    model = PGAE(64, 8)
    assert model.sizes == [8, 16, 32, 64] and model.code_shape == (128, 4, 4)
    assert [m.out_channels for m in model.from_rgb] == [8, 16, 32, 64]
    assert [m[0].out_channels for m in model.enc] == [16, 32, 64, 128]
    assert [(m[0].in_channels, m[0].out_channels) for m in model.dec] == [(128, 64), (64, 32), (32, 16), (16, 8)]
    for conv in [*model.from_rgb, *model.to_rgb]:  # fromRGB / toRGB: a bare 1x1 conv (src/net.py)
        assert type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
    assert sum(p.numel() for p in model.parameters()) == 443_652  # the original's PGAE(4, 8)


def reference_pgae(model, images, step, merge):
    """The original's PGAE.encode/.decode (src/net.py) written out with its own index arithmetic
    (encoders[steps - step], decoders[step - 1], the merge), on `model`'s weights. EBlock: fromRGB,
    conv pair, max-pool; DBlock: bilinear x2 (align_corners False), conv pair, toRGB."""
    steps = len(model.enc)

    def eblock(i, y, rgb_input=False):
        return F.max_pool2d(model.enc[i](model.from_rgb[i](y) if rgb_input else y), 2)

    def dblock(i, y, rgb_output=False):
        y = model.dec[i](F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False))
        return model.to_rgb[i](y) if rgb_output else y

    z = images
    if step > 1 and merge < 1:
        z_prev = model.from_rgb[steps - step + 1](F.avg_pool2d(z, 2))
        z = merge * eblock(steps - step, z, True) + (1 - merge) * z_prev
    else:
        z = eblock(steps - step, z, True)
    for i in range(steps - step + 1, steps):
        z = eblock(i, z)
    y = z
    for i in range(step - 1):
        y = dblock(i, y)
    if step != 1:
        y_prev = F.interpolate(model.to_rgb[step - 2](y), scale_factor=2)  # the default: nearest
        y = merge * dblock(step - 1, y, True) + (1 - merge) * y_prev
    else:
        y = dblock(step - 1, y, True)
    return z.flatten(1), y


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_pgae_equals_the_original_arithmetic_at_every_resolution_and_in_the_fade(size):
    torch.manual_seed(0)
    model = PGAE(64, 8).eval()
    step = model.sizes.index(size) + 1  # the original's net.step: 1 at 8 px ... 4 at 64 px
    images = torch.rand(2, 3, size, size) * 2 - 1
    for alpha in ([1.0] if size == 8 else [0.0, 0.3, 1.0]):
        z_ref, y_ref = reference_pgae(model, images, step, alpha)
        z = model.encode(images, alpha)
        assert z.shape == (2, 2048) and torch.allclose(z, z_ref, atol=1e-6)
        y = model.decode(z, size, alpha)
        assert y.shape == (2, 3, size, size) and torch.allclose(y, y_ref, atol=1e-6)
        assert torch.allclose(model(images, alpha), y_ref, atol=1e-6)


def test_fade_at_alpha_0_is_the_previous_resolution_and_at_1_the_new_block_alone():
    torch.manual_seed(1)
    model = PGAE(32, 4).eval()
    z = torch.randn(3, 32 * 16)
    for size in (16, 32):
        low = model.decode(z, size // 2, 1.0)
        assert torch.allclose(model.decode(z, size, 0.0), F.interpolate(low, scale_factor=2, mode="nearest"), atol=1e-6)
        images = torch.rand(3, 3, size, size) * 2 - 1
        assert torch.allclose(model.encode(images, 0.0), model.encode(F.avg_pool2d(images, 2), 1.0), atol=1e-5)
    images = torch.rand(2, 3, 16, 16)
    before = model.decode(z[:2], 16, 1.0), model.encode(images, 1.0)
    with torch.no_grad():  # the 8-px toRGB / fromRGB play no part at α = 1
        model.to_rgb[0].weight.add_(1.0)
        model.from_rgb[2].weight.add_(1.0)
    assert torch.equal(model.decode(z[:2], 16, 1.0), before[0]) and torch.equal(model.encode(images, 1.0), before[1])


def test_pg_schedule_fades_each_new_resolution_over_one_phase_then_stays():
    schedule = [feature_ae.pg_schedule(step, 3, 2) for step in range(8)]
    assert schedule == [(0, 1.0), (0, 1.0), (1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0), (2, 1.0), (2, 1.0)]
    # the original's 64 px model, one epoch = 10 steps: 8 px 0-9, fades 10-19, 20-29, 30-39, then 64 px
    assert feature_ae.pg_schedule(10, 4, 10) == (1, 0.1) and feature_ae.pg_schedule(29, 4, 10) == (2, 1.0)
    assert feature_ae.pg_schedule(30, 4, 10) == (3, 0.1) and feature_ae.pg_schedule(59, 4, 10) == (3, 1.0)
    assert feature_ae.pg_schedule(123, 1, 5) == (0, 1.0)  # dcae: one resolution


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random VGG19 in torchvision's file layout (features.N.*), and its full feature stack."""
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(2)
    features = make_layers(cfgs["E"]).eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path, features


def test_dfc_loss_equals_an_independent_computation(vgg_file):
    """src/vgg_loss.py: name VGG19's layers, feed RAW [0, 1] images, take relu1_1, relu2_1 and
    relu3_1 (flattened), sum nn.MSELoss('mean') over them; the whole stack is run here."""
    path, features = vgg_file
    names = ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1", "relu2_1", "conv2_2",
             "relu2_2", "pool2", "conv3_1", "relu3_1"] + [f"rest{i}" for i in range(len(features) - 12)]
    torch.manual_seed(3)
    img_real = torch.rand(2, 3, 32, 32) * 2 - 1  # 32 px: the whole stack pools 5 times
    img_recon = (img_real + 0.3 * torch.randn_like(img_real)).clamp(-1.5, 1.5)

    def content(images):
        out, hidden = [], images
        for name, layer in zip(names, features):
            hidden = layer(hidden)
            if name in ("relu1_1", "relu2_1", "relu3_1"):
                out.append(hidden.reshape(len(images), -1))
        return out

    with torch.no_grad():
        expected = sum(nn.MSELoss()(a, b) for a, b in zip(content((img_recon + 1) / 2), content((img_real + 1) / 2)))
        got = feature_ae.loss_dfc(feature_ae.load_vgg(str(path), "cpu"), img_recon, img_real)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dfc_loss_is_fp32_under_bf16_autocast_and_reaches_only_the_reconstruction(vgg_file):
    vgg = feature_ae.load_vgg(str(vgg_file[0]), "cpu")
    torch.manual_seed(4)
    img_real = torch.rand(2, 3, 16, 16) * 2 - 1
    img_recon = (img_real + 0.2 * torch.randn_like(img_real)).requires_grad_(True)
    with torch.no_grad():  # the fp32 reference: relu1_1, relu2_1, relu3_1 of u(x), outside autocast
        taps = [[], []]
        for side, hidden in enumerate(((img_recon + 1) / 2, (img_real + 1) / 2)):
            for index, layer in enumerate(vgg):
                hidden = layer(hidden)
                taps[side] += [hidden] if index in (1, 6, 11) else []
        expected = sum(((a - b) ** 2).mean() for a, b in zip(*taps))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = feature_ae.loss_dfc(vgg, img_recon, img_real)
    assert under_amp.dtype == torch.float32 and under_amp.item() == pytest.approx(expected.item(), rel=1e-5)
    under_amp.backward()
    assert img_recon.grad.abs().sum() > 0 and all(p.grad is None for p in vgg.parameters())


def test_train_step_uses_mse_on_unit_images_without_vgg_and_dfc_with(vgg_file):
    """L_mse on [0, 1] images is a quarter of the [-1, 1] MSE; with a VGG the loss is L_dfc."""
    torch.manual_seed(5)
    model = DCAE(16, 8, nef=4).eval()  # eval: BatchNorm uses running stats, so forwards agree
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        recon = model(images)
    no_amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    stats = feature_ae.train_step(model, optimizer, images, 1.0, None, no_amp)
    mse = ((recon - images) ** 2).mean() / 4
    assert stats["loss"].item() == pytest.approx(mse.item(), rel=1e-5) and "dfc" not in stats
    assert stats["psnr"].item() == pytest.approx(10 * torch.log10(1 / mse).item(), rel=1e-5)
    vgg = feature_ae.load_vgg(str(vgg_file[0]), "cpu")
    with torch.no_grad():
        expected = feature_ae.loss_dfc(vgg, model(images), images)
    stats = feature_ae.train_step(model, optimizer, images, 1.0, vgg, no_amp)
    assert stats["loss"].item() == pytest.approx(expected.item(), rel=1e-5) == stats["dfc"].item()


def test_missing_vgg_weights_say_how_to_provide_the_file(tmp_path):
    with pytest.raises(InputError) as err:
        feature_ae.load_vgg(str(tmp_path / "absent.pth"), "cpu")
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in str(err.value)
    assert "by hand" in str(err.value) and "--vgg-weights" in str(err.value)
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not torchvision's VGG19"):
        feature_ae.load_vgg(str(tmp_path / "other.pth"), "cpu")


# ------------------------------------------------------------------------------------------------
# Attribute vectors
# ------------------------------------------------------------------------------------------------
def test_attribute_vectors_on_a_toy_encoder():
    """Images of one grey level each; the encoder returns (mean pixel, 2·mean pixel)."""
    values = torch.tensor([0, 40, 80, 120, 160, 200, 240, 255])
    images = values.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).to(torch.uint8).contiguous()
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1], [1, 0], [0, 0], [0, 1], [1, 1]]).float()
    encode = lambda x: torch.stack([x.mean((1, 2, 3)), 2 * x.mean((1, 2, 3))], 1)  # noqa: E731
    vectors, counts = feature_ae.attribute_vectors(encode, images, labels, max_per_side=1000)
    levels = values.float() / 127.5 - 1
    for a in range(2):
        on, off = labels[:, a] > 0.5, labels[:, a] < 0.5
        diff = levels[on].mean() - levels[off].mean()
        assert torch.allclose(vectors[a], torch.stack([diff, 2 * diff]), atol=1e-6)
        assert counts[a].tolist() == [int(on.sum()), int(off.sum())]
    assert feature_ae.attribute_vectors(encode, images, labels, max_per_side=2)[1].tolist() == [[2, 2], [2, 2]]
    vectors, counts = feature_ae.attribute_vectors(encode, images, torch.zeros(8, 1))
    assert counts.tolist() == [[0, 8]] and vectors.abs().sum() == 0


def test_edit_codes_adds_and_removes_vectors():
    vectors = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    src, tgt = torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert feature_ae.edit_codes(torch.zeros(2, 3), vectors, src, tgt).tolist() == [[1.5, -1.5, 0.0], [0.0] * 3]


# ------------------------------------------------------------------------------------------------
# Command line end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli(tmp_path_factory, face_attr_cache):
    """This file's command lines, in order, in ONE fresh interpreter (conftest.commands):
    `python feature_ae.py --smoke --arch pgae` (8 -> 16 -> 32 px), --help of the script and of
    show, and show with another script's checkpoint."""
    folder = tmp_path_factory.mktemp("fae_smoke")
    torch.save({"script": "attgan.py", "model": {}}, folder / "attgan.pt")
    calls = {"smoke": ["--smoke", "--arch", "pgae", "--out", folder / "run"], "help": ["--help"],
             "show_help": ["show", "--help"], "foreign": ["show", "--ckpt", folder / "attgan.pt"]}
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    result = dict(zip(calls, commands([("feature_ae.py", argv) for argv in calls.values()], env,
                                      folder / "driver")))
    result["folder"] = folder
    return result


@pytest.fixture(scope="module")
def smoke_run(cli):
    """`python feature_ae.py --smoke --arch pgae` through the command line (8 -> 16 -> 32 px)."""
    proc = cli["smoke"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cli["folder"] / "run", proc.stdout


def test_smoke_run_writes_checkpoint_metrics_and_samples(smoke_run):
    out, stdout = smoke_run
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["script"] == "feature_ae.py" and state["step"] == 6 and state["config"]["arch"] == "pgae"
    assert state["phase"] == {"size": 32, "alpha": 1.0} and state["schedule"] == {"steps": 6, "phase_steps": 2}
    assert state["config"]["img_size"] == 32 and state["optimizer"]["state"]
    records = common.read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["res"], r["alpha"]) for r in records] == [(2, 8, 1.0), (4, 16, 1.0), (6, 32, 1.0)]
    assert "dfc" in records[2] and "dfc" not in records[1]  # the feature loss only from 32 px
    assert "warning: --vgg-weights random" in stdout and "step 6/6" in stdout
    for step in (3, 6):  # 8 rows x (input, recon, ± 6 demo attributes) = 14 columns, >= 96 px each
        with Image.open(out / "samples" / f"step_{step:06d}.png") as grid:
            assert grid.width > 14 * 96 and grid.height > 8 * 96
    assert (out / "losses.png").is_file() and not list(out.glob("*.tmp"))


def test_training_loads_the_whole_frame_and_default_steps_are_one_epoch(tmp_path, monkeypatch):
    """crop None (the original squashes the 178x218 frame); --steps 0 = len(train) // batch."""
    crops, load = [], common.load_celeba
    monkeypatch.setattr(common, "load_celeba", lambda *a, **k: crops.append(a[4]) or load(*a, **k))
    feature_ae.main(["--smoke", "--loss", "mse", "--steps", "0", "--batch-size", "64", "--out", str(tmp_path)])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    train_images = len(load("demo:16", [], "train", 32, None, verbose=False).images)
    assert state["step"] == train_images // 64 and set(crops) == {None}


def test_resume_across_a_pgae_phase_change_equals_a_straight_run(tmp_path):
    """2 steps at 8 px, then resume into the 16 px fade: identical to 4 steps straight."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--smoke", "--arch", "pgae", "--img-size", "16", "--sample-every", "100"]
    feature_ae.main([*args, "--steps", "4", "--out", str(straight)])
    feature_ae.main([*args, "--steps", "2", "--out", str(split)])
    assert torch.load(split / "ckpt.pt", weights_only=True)["phase"] == {"size": 8, "alpha": 1.0}
    feature_ae.main([*args, "--steps", "4", "--out", str(split), "--resume"])
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (straight, split))
    assert a["step"] == b["step"] == 4 and a["phase"] == b["phase"] == {"size": 16, "alpha": 1.0}
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after resume"
    for index, moments in a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg_sq"], b["optimizer"]["state"][index]["exp_avg_sq"])
    assert [r["step"] for r in common.read_jsonl(split / "metrics.jsonl")] == [2, 4]
    with pytest.raises(InputError, match="arch='pgae'.*arch='dcae'"):
        feature_ae.main(["--smoke", "--img-size", "16", "--out", str(split), "--resume"])


def test_help_of_the_script_and_its_sub_command(cli):
    for name, words in (("help", ["--arch", "--phase-steps", "--vgg-weights"]),
                        ("show_help", ["--ckpt", "--frames", "--image"])):
        proc = cli[name]  # `python feature_ae.py [show] --help`
        assert proc.returncode == 0 and all(w in proc.stdout for w in words), proc.stderr[-2000:]


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "-2"], "--batch-size -2"), (["--lr", "-1"], "--lr -1"), (["--lr", "0"], "--lr 0"),
    (["--log-every", "0"], "--log-every 0"), (["--steps", "-3"], "--steps -3"),
    (["--ckpt-every", "0"], "--ckpt-every 0"), (["--arch", "vae"], "--arch 'vae'"),
    (["--arch", "pgae", "--img-size", "48"], "--img-size 48"), (["--lr", "nan"], "--lr nan")])
def test_out_of_range_arguments_are_refused_before_any_data_is_read(argv, message, tmp_path):
    with pytest.raises(InputError) as err:  # a missing --data folder would fail later, differently
        feature_ae.main([*argv, "--data", str(tmp_path / "no_such_folder"), "--out", str(tmp_path)])
    assert message in str(err.value)


def test_presets_keep_typed_arguments_and_fall_back_to_mse_only_on_cpu_demo(tmp_path):
    cpu, missing = torch.device("cpu"), str(tmp_path / "absent.pth")

    def configure(*argv):
        return feature_ae.configure(feature_ae.parse_dataclass(feature_ae.Args, list(argv)), cpu)

    args = configure("--smoke", "--arch", "pgae", "--img-size", "64")
    assert args.img_size == 64 and args.batch_size == 8  # typed: kept; not typed: the preset's
    args = configure("--vgg-weights", missing)
    assert (args.preset, args.loss, args.img_size, args.steps, args.batch_size) == ("cpu-demo", "mse", 32, 1500, 64)
    assert configure("--arch", "pgae", "--vgg-weights", missing).steps == 900  # cpu-demo: 6 epochs of 150 in 5 phases
    args = configure("--vgg-weights", missing, "--preset", "paper")
    assert (args.loss, args.batch_size, args.steps) == ("dfc", 256, 0)  # the original: batch 256, 1 epoch
    args = configure("--arch", "pgae", "--preset", "paper")
    assert (args.img_size, args.batch_size, args.phase_steps) == (64, 128, 0)
    assert configure("--vgg-weights", missing, "--loss", "dfc").loss == "dfc"  # typed: it will need the file
    assert configure("--attrs", "smiling", "male").attrs == ["Smiling", "Male"]


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(smoke_run):
    out, _ = smoke_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(InputError, match="holds a run"):
        feature_ae.main(["--smoke", "--arch", "pgae", "--out", str(out)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_foreign_checkpoints_are_refused_in_one_line(tmp_path, cli, smoke_run):
    torch.save({"script": "attgan.py", "model": {}}, tmp_path / "attgan.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for path, writer in ((tmp_path / "attgan.pt", "attgan.py"), (tmp_path / "tensor.pt", "not a checkpoint")):
        with pytest.raises(InputError, match=f"expected a checkpoint written by feature_ae.py, found {writer}"):
            feature_ae.load(path)
    proc = cli["foreign"]  # `python feature_ae.py show --ckpt <the same attgan.py checkpoint>`
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "attgan.py" in proc.stderr
    with pytest.raises(InputError, match="--frames 1"):
        feature_ae.main(["show", "--ckpt", str(smoke_run[0] / "ckpt.pt"), "--frames", "1"])


def test_a_diverging_run_stops_non_zero_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A BatchNorm variance that becomes inf while the loss is finite (seen in this method) stops
    the run at the next log step, before the checkpoint, which stays the one of step 2."""
    feature_ae.main(["--smoke", "--loss", "mse", "--steps", "2", "--out", str(tmp_path)])
    good = (tmp_path / "ckpt.pt").read_bytes()
    real_step = feature_ae.train_step

    def overflowing_step(model, *args):
        stats = real_step(model, *args)
        model.encoder[2].running_var.fill_(float("inf"))  # the loss stays finite
        return stats

    monkeypatch.setattr(feature_ae, "train_step", overflowing_step)
    with pytest.raises(FloatingPointError, match="step 3: non-finite weights"):
        feature_ae.main(["--smoke", "--loss", "mse", "--steps", "6", "--out", str(tmp_path), "--resume"])
    assert (tmp_path / "ckpt.pt").read_bytes() == good


# ------------------------------------------------------------------------------------------------
# vectors.pt and the evaluation adapter
# ------------------------------------------------------------------------------------------------
def reference_vectors(model_ns):
    """v_a by the plain mean difference over the whole training split (demo:16 has fewer than
    1000 images per side, so the 1000-per-side cap does not apply)."""
    config = model_ns.config
    faces = common.load_celeba(config["data"], model_ns.attr_names, "train", config["img_size"], None, verbose=False)
    with torch.no_grad():
        codes = model_ns.model.encode(F.adaptive_avg_pool2d(common.to_float(faces.images), model_ns.size), model_ns.alpha)
    return torch.stack([codes[faces.labels[:, a] > 0.5].mean(0) - codes[faces.labels[:, a] < 0.5].mean(0)
                        for a in range(len(model_ns.attr_names))])


def test_show_writes_the_grid_and_20_frame_256_px_gifs(smoke_run, tmp_path, monkeypatch):
    """The GIFs walk the code from z to z ± 2·v in 20 equal steps, t = 0 … 1 (src/main.py media), z the
    first test image's, v each attribute's own vector; their frames are those codes decoded, at 256
    px, 10 frames/s. The codes and frames `show` computes are checked, not the GIF's frame count: the
    smoke model's v is tiny (|v| about 0.005) and its frames differ by less than a grey level, which
    an image library may merge into one frame."""
    out, _ = smoke_run
    calls, codes, save_gif, decode = [], [], common.save_gif, PGAE.decode
    monkeypatch.setattr(common, "save_gif", lambda frames, path, fps: calls.append((frames, path, fps))
                        or save_gif(frames, path, fps=fps))
    monkeypatch.setattr(PGAE, "decode", lambda self, z, *a: codes.append(z) or decode(self, z, *a))
    feature_ae.main(["show", "--ckpt", str(out / "ckpt.pt"), "--count", "3", "--attrs", "Smiling", "Male",
                     "--out", str(tmp_path), "--device", "cpu"])
    with Image.open(tmp_path / "grid.png") as grid:  # 3 rows x 6 columns at 32 px, shown x3
        assert grid.width > 6 * 96 and grid.height > 3 * 96
    monkeypatch.undo()
    trained = feature_ae.load(out / "ckpt.pt")
    vectors = reference_vectors(trained)  # the checkpoint's attributes, Smiling and Male among them
    first = common.to_float(common.load_celeba("demo:16", [], "test", 32, None, verbose=False).images[:1])
    t = torch.arange(20.0).view(-1, 1) / 19
    gifs = [(name, word) for name in ("Smiling", "Male") for word in ("add", "remove")]
    assert [(path.name, fps) for _, path, fps in calls] == [(f"lerp_{n}_{w}.gif", 10) for n, w in gifs]
    walks = [z for z in codes if len(z) == 20]  # the grid decodes batches of 3
    assert len(walks) == len(gifs)
    with torch.no_grad():
        z = trained.model.encode(first, 1.0)
        for (frames, path, _), walk, (name, word) in zip(calls, walks, gifs):
            end = z + (2 if word == "add" else -2) * vectors[trained.attr_names.index(name)]
            assert torch.allclose(walk, (1 - t) * z + t * end, rtol=0, atol=1e-6), path.name
            expected = trained.model.decode((1 - t) * z + t * end, 32, 1.0).clamp(-1, 1)
            expected = F.interpolate(expected, size=(256, 256), mode="bilinear")
            assert frames.shape == (20, 3, 256, 256) and torch.allclose(frames, expected, atol=1e-5), path.name
            steps = (frames[1:] - frames[:-1]).flatten(1).abs().amax(1)
            assert (steps > 0).all(), f"{path.name}: two consecutive frames are equal"
            with Image.open(path) as gif:
                assert gif.size == (256, 256) and gif.format == "GIF"


def test_adapter_edits_with_the_vectors_of_exactly_these_weights(tmp_path, face_attr_cache):
    """The bug: vectors.pt was reused whenever its step matched. Here run B's checkpoint (same step,
    another seed) replaces run A's beside A's vectors.pt: the edit must use B's own vectors."""
    runs = {}
    for seed in (0, 1):
        runs[seed] = tmp_path / f"seed{seed}"
        feature_ae.main(["--smoke", "--loss", "mse", "--steps", "4", "--seed", str(seed), "--out", str(runs[seed])])
    model_a = adapter.load(runs[0] / "ckpt.pt")
    images = common.to_float(common.load_celeba("demo:16", model_a.attr_names, "test", 32, None, verbose=False).images[:4])
    src = torch.zeros(4, len(model_a.attr_names))
    tgt = src.clone()
    tgt[:, 0] = 1
    model_a.edit(images, src, tgt)  # computes A's vectors and writes seed0/vectors.pt
    stale = torch.load(runs[0] / "vectors.pt", weights_only=True)
    assert stale["step"] == 4
    (runs[0] / "ckpt.pt").write_bytes((runs[1] / "ckpt.pt").read_bytes())  # B into A's folder
    model_b, trained_b = adapter.load(runs[0] / "ckpt.pt"), feature_ae.load(runs[0] / "ckpt.pt")
    vectors = reference_vectors(trained_b)
    assert (vectors[0] - stale["vectors"][model_a.attr_names[0]]).abs().max() > 1e-3  # they differ
    with torch.no_grad():
        z = trained_b.model.encode(images, 1.0) + 1.5 * vectors[0]
        expected = trained_b.model.decode(z, 32, 1.0).clamp(-1, 1)
    assert torch.allclose(model_b.edit(images, src, tgt), expected, atol=1e-4)
    assert torch.allclose(model_b.edit(images, src, src), model_b.reconstruct(images), atol=1e-6)
    assert model_b.crop is None and model_b.generate is None and model_b.img_size == 32
    assert model_b.encode(images)["z"].shape == (4, 16)
    saved = torch.load(runs[0] / "vectors.pt", weights_only=True)
    assert saved["weights_hash"] == trained_b.weights_hash != stale["weights_hash"]
