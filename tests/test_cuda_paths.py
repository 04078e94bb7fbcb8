"""The CUDA code paths, run on the CPU: each method's training step for a few updates under bf16
autocast (what --amp does on a GPU), then with its networks under torch.compile (what --compile
does), and common's batch stream (what a GPU run without room for the images uses) without pinning.

Each file's `autocast(device, enabled)` is a no-op off CUDA, so the tests enter
torch.autocast("cpu", dtype=torch.bfloat16) themselves; CPU autocast casts the same op lists to
bf16 (convolutions, linear layers) as CUDA's, so a dtype mix between an fp32 tensor and a bf16
activation fails here as it would on the GPU. The models are channels-last, as train makes them
on CUDA. torch.compile runs with backend="aot_eager": dynamo's graph capture and AOT autograd's
forward and backward graphs, run eagerly, so no C++ compiler is needed; the code generation of
the default inductor backend is not tested. The files compile with the default mode, where a graph
break only costs speed; fullgraph=True here turns one into a failure. attgan, dual_transfer and
feature_ae (dcae) have --compile and are wrapped as their train wraps them; cgan and mad have no
--compile, and their networks are compiled here one by one all the same.
"""
import dataclasses

import pytest
import torch

import attgan
import cgan
import common
import dual_transfer
import feature_ae
import mad
from test_mad import random_batch as mad_batch

CHANNELS_LAST = torch.channels_last


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def eager(module):
    return module


def compiled(module):
    return torch.compile(module, backend="aot_eager", fullgraph=True)


def smoke_args(module, **changes):
    """The file's Args with its --smoke preset (feature_ae's may hold a value per arch)."""
    arch = changes.get("arch", "dcae")
    preset = {k: v[arch] if isinstance(v, dict) else v for k, v in module.PRESETS["smoke"].items()}
    return dataclasses.replace(module.Args(**{k: v for k, v in preset.items() if k != "data"}), **changes)


def images_and_labels(batch=8, size=32, attrs=4, seed=0):
    """Channels-last images in [-1, 1] and 0/1 labels, as get_batch gives them on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).contiguous(memory_format=CHANNELS_LAST)
    return images, torch.randint(0, 2, (batch, attrs), generator=gen).float()


# Each setup builds the smoke-sized networks as train does and returns (trained modules, frozen
# modules, run): run() makes three updates with the file's own step, called as train calls it.
def setup_attgan(wrap):
    args = smoke_args(attgan)
    torch.manual_seed(0)
    g, d = (m.to(memory_format=CHANNELS_LAST) for m in attgan.build_models(vars(args), 4))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.999)) for m in (g, d))
    g_run, d_fast = wrap(g), wrap(d)  # train: D's update d_run (= d_fast on one rank), the penalty d
    img_real, attr_src = images_and_labels()
    return [g, d], [], lambda: [attgan.train_step(g_run, d_fast, opt_g, opt_d, step, img_real, attr_src, args,
                                                  0, d_fast, d) for step in range(3)]  # n_d 1: D, G, D


def setup_cgan(wrap):
    args = smoke_args(cgan)
    config = vars(args)
    torch.manual_seed(0)
    g, d = (m.to(memory_format=CHANNELS_LAST) for m in cgan.build_models(config, 4))
    opt_g, opt_d = (cgan.make_optimizer(m.parameters(), args) for m in (g, d))
    img_real, attr_real = images_and_labels(size=config["img_size"])

    def run():
        rng = torch.Generator().manual_seed(0)
        return [cgan.train_step(wrap(g), wrap(d), opt_g, opt_d, img_real, attr_real, cgan.sample_noise(config, 8, rng),
                                args, bf16, rng) for _ in range(3)]
    return [g, d], [], run


def setup_dual_transfer(wrap):
    args = smoke_args(dual_transfer)
    torch.manual_seed(0)
    encoder, decoder, classifier = (m.to(memory_format=CHANNELS_LAST)
                                    for m in dual_transfer.build_models(vars(args), 4))
    classifier.eval().requires_grad_(False)  # stage 2: C frozen
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=args.lr)
    models = [wrap(m) for m in (encoder, decoder, classifier)]
    images, attrs = images_and_labels(batch=16)
    pair = [dual_transfer.to_unit(images[:8]), dual_transfer.to_unit(images[8:]), attrs[:8], attrs[8:]]
    return [encoder, decoder], [classifier], lambda: [
        dual_transfer.dual_step(models, optimizer, *pair, args, bf16) for _ in range(3)]


def setup_dual_classifier(wrap):
    """Stage 1 of dual_transfer: C alone, with the positive weights of the BCE (never compiled)."""
    args = smoke_args(dual_transfer)
    torch.manual_seed(0)
    classifier = dual_transfer.build_models(vars(args), 4)[2].to(memory_format=CHANNELS_LAST)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.cls_lr)
    images, attrs = images_and_labels(batch=16)
    pair = [dual_transfer.to_unit(images[:8]), dual_transfer.to_unit(images[8:]), attrs[:8], attrs[8:]]
    return [classifier], [], lambda: [dual_transfer.classifier_step(
        classifier, optimizer, *pair, torch.full((4,), 2.0), bf16) for _ in range(3)]


def setup_feature_ae(wrap, arch="dcae"):
    args = smoke_args(feature_ae, arch=arch)
    torch.manual_seed(0)
    model = feature_ae.build_model(vars(args)).to(memory_format=CHANNELS_LAST)
    vgg = feature_ae.load_vgg("random", "cpu")  # L_dfc: autocast off inside, fp32 VGG on bf16 images
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model_train = wrap(model)  # train: torch.compile(model) for dcae only
    img_real = images_and_labels(size=args.img_size)[0]

    def run():
        stats = []
        for step in range(3 if arch == "dcae" else 6):  # pgae: 8, 16 then 32 px (fading in: alpha < 1)
            index, alpha = feature_ae.pg_schedule(step, len(model.sizes), args.phase_steps)
            size = model.sizes[index]
            stats.append(feature_ae.train_step(model_train, optimizer, torch.nn.functional.adaptive_avg_pool2d(
                img_real, size), alpha, vgg if size >= feature_ae.DFC_MIN_SIZE else None, bf16))
        assert "dfc" in stats[-1]  # the last update went through the VGG
        return stats
    return [model], [vgg], run


def setup_mad(wrap):
    args = smoke_args(mad, stage="joint", attrs=mad.EXPRESSION_ATTRS + mad.STYLE_ATTRS)
    torch.manual_seed(0)
    nets = mad.build_models(vars(args)).to(memory_format=CHANNELS_LAST)
    optimizers = mad.configure_stage(nets, "joint", args)
    images, targets = mad_batch()
    images = images.contiguous(memory_format=CHANNELS_LAST)
    nets_run = torch.nn.ModuleDict({name: wrap(net) for name, net in nets.items()})
    return list(nets.values()), [], lambda: [mad.train_step(nets_run, optimizers, step, images, targets, args, bf16,
                                                            torch.Generator().manual_seed(step)) for step in range(4)]


SETUPS = {"attgan": setup_attgan, "cgan": setup_cgan, "dual_transfer": setup_dual_transfer,
          "dual_transfer_stage1": setup_dual_classifier, "feature_ae_dcae": setup_feature_ae,
          "feature_ae_pgae": lambda wrap: setup_feature_ae(wrap, "pgae"), "mad_joint": setup_mad}
COMPILED = ("attgan", "dual_transfer", "feature_ae_dcae", "cgan", "mad_joint")  # cgan, mad: no --compile


def run_and_check(name, wrap):
    """Three (mad: four, pgae: six) updates under bf16 autocast: every reported loss finite and, where
    a tensor, fp32 (the files compute each loss term in fp32); every trained parameter changed and
    still fp32 (but one with zero gradients); the frozen modules bit-identical."""
    torch._dynamo.reset()
    trained, frozen, run = SETUPS[name](wrap)
    before = [[p.detach().clone() for p in m.parameters()] for m in trained + frozen]
    with bf16():
        stats = run()
    assert {type(s) for s in stats} == {dict}
    for record in stats:
        for key, value in record.items():
            value = torch.as_tensor(value)
            assert value.dtype == torch.float32, (key, value.dtype)
            assert torch.isfinite(value).all(), (key, value)
    for module, old in zip(trained + frozen, before):
        params = list(module.parameters())
        assert all(p.dtype == torch.float32 for p in params), type(module).__name__
        changed = [not torch.equal(p, q) for p, q in zip(params, old)]
        if module in frozen:
            assert not any(changed), type(module).__name__
        else:  # a parameter no loss reaches (the bias of a WGAN critic's score) gets zero gradients
            idle = [p.grad is None or not p.grad.any() for p in params]
            assert all(c or i for c, i in zip(changed, idle)) and any(changed), type(module).__name__
    return stats


@pytest.mark.parametrize("name", SETUPS)
def test_training_steps_under_bf16_autocast(name):
    run_and_check(name, eager)


@pytest.mark.parametrize("name", COMPILED)
def test_training_steps_under_torch_compile_with_bf16_autocast(name):
    """The networks compiled as train compiles them (whole graphs), under bf16 autocast (--amp is
    on by default); attgan's penalty takes the eager D (a double backward through a compiled module
    is unsupported) and must report the same value as an eager run of the same first update."""
    stats = run_and_check(name, compiled)
    if name == "attgan":
        reference = run_and_check(name, eager)
        assert torch.allclose(stats[0]["gp"], reference[0]["gp"], rtol=1e-2)
        assert torch.allclose(stats[0]["d_loss"], reference[0]["d_loss"], rtol=1e-2)


def test_the_batch_stream_on_the_cpu_prefetches_unpinned_batches_equal_to_direct_ones():
    """gpu_cache='off' on the CPU: the rows are gathered ahead in a background thread into plain
    memory (pinning needs a GPU); each batch, channels-last as on CUDA, equals the direct one."""
    data = common.load_celeba("demo:16", ["Male", "Smiling"], "train", 16, verbose=False)
    streamed = common.to_device(data, "cpu", gpu_cache="off", ahead=2)
    assert streamed.stream is not None and streamed.stream.pin is False
    for step in range(4):
        got = common.get_batch(streamed, step, 4, seed=3, channels_last=True)
        want = common.get_batch(data, step, 4, seed=3)
        assert got[0].is_contiguous(memory_format=CHANNELS_LAST)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), step
        queued = {key[1]: future for key, future in streamed.stream.pending.items()}
        assert sorted(queued) == [step + 1, step + 2]
        indices = common.batch_indices(len(data.images), step + 1, 4, 3)
        assert torch.equal(queued[step + 1].result(timeout=30), data.images[indices])  # the thread's rows
