"""Faults of the machine around a run, through the real command line of the method scripts: a signal
during training (SIGTERM, Ctrl-C, a second Ctrl-C while the checkpoint is written), Ctrl-C while
the data loads, a full disk (a small RLIMIT_FSIZE in the child, SIGXFSZ ignored so that writes
fail with EFBIG), an output path under a regular file (it refuses root too, unlike permission
bits), a run refused after its data loaded, and attributes that never vary.

The signals come from the child itself at an exact point (the `FAULT` driver wraps a function of
common.py and sends the signal when it is called for the k-th time), so no test waits on a clock.
"""
import re
import resource
import signal
import subprocess
import sys
import types

import pytest
import torch

import common
from common import InputError
from conftest import ROOT

# python -c FAULT <script> <SIGNAL> <common function> <k> <extra> <script args...>: run the script
# as __main__ and send SIGNAL to this process at the k-th call of common.<function>; with extra
# 'replace', send SIGINT once more inside each os.replace (a Ctrl-C while a checkpoint is written).
FAULT = r"""
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import common
script, number, name, at, extra, *argv = sys.argv[1:]
original, calls = getattr(common, name), []
def wrapped(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(at):
        os.kill(os.getpid(), getattr(signal, number))
    return original(*args, **kwargs)
setattr(common, name, wrapped)
if extra == "replace":
    replace = os.replace
    def interrupted_replace(src, dst):
        os.kill(os.getpid(), signal.SIGINT)
        replace(src, dst)
    os.replace = interrupted_replace
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def run_with_fault(env, script, number, function, at, *args, extra="-"):
    return subprocess.run([sys.executable, "-c", FAULT, script, number, function, str(at), extra, *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def tensors(state, prefix=""):
    """Every tensor of a (nested) checkpoint dict, by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def assert_same_tensors(path_a, path_b):
    a, b = (tensors(torch.load(p, weights_only=True)) for p in (path_a, path_b))
    assert a.keys() == b.keys() and len(a) > 10
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


CONTINUE = re.compile(r"^(SIG\w+): stopped after step (\d+); (\S+) holds it; continue with: (.+)$")


def stopped(proc, code, ckpt):
    """The one line an interrupted run prints -> (signal name, step, the command to continue)."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    match = CONTINUE.match(proc.stderr.strip().splitlines()[-1])
    assert match and match.group(3) == str(ckpt), proc.stderr[-1000:]
    return match.group(1), int(match.group(2)), match.group(4)


# Signals during training ---------------------------------------------------------------------------
def test_sigterm_mid_run_then_resume_equals_the_uninterrupted_run(attgan_smoke, cache_env, tmp_path):
    """SIGTERM while update 3 of 6 loads its batch: the checkpoint holds the step after which the run
    stopped (no periodic checkpoint would: --ckpt-every 100), exit 143; --resume then ends with
    every tensor equal to the uninterrupted smoke run's."""
    out = tmp_path / "run"
    args = ["--smoke", "--out", out, "--ckpt-every", "100", "--sample-every", "100"]
    proc = run_with_fault(cache_env, "attgan.py", "SIGTERM", "get_batch", 3, *args)
    name, step, command = stopped(proc, 143, out / "ckpt.pt")
    assert name == "SIGTERM" and 3 <= step < 6 and torch.load(out / "ckpt.pt", weights_only=True)["step"] == step
    assert command.endswith(f"--out {out} --ckpt-every 100 --sample-every 100 --resume")
    assert not (out / "samples").exists() and not list(out.glob("*.tmp"))
    resumed = subprocess.run([sys.executable, "attgan.py", *map(str, args), "--resume"], cwd=ROOT, env=cache_env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_tensors(attgan_smoke[0] / "ckpt.pt", out / "ckpt.pt")


def test_a_second_ctrl_c_while_the_checkpoint_is_written_does_not_break_it(cgan_smoke, cache_env, tmp_path):
    """Ctrl-C at update 2 of 4, and Ctrl-C again inside every os.replace (the checkpoint being
    written): the save completes, exit 130, and the resumed run equals the uninterrupted one."""
    out = tmp_path / "run"
    args = ["--smoke", "--out", out, "--ckpt-every", "100", "--sample-every", "100"]
    proc = run_with_fault(cache_env, "cgan.py", "SIGINT", "get_batch", 2, *args, extra="replace")
    name, step, _ = stopped(proc, 130, out / "ckpt.pt")
    assert name == "SIGINT" and torch.load(out / "ckpt.pt", weights_only=True)["step"] == step < 4
    assert not list(out.glob("*.tmp"))
    resumed = subprocess.run([sys.executable, "cgan.py", *map(str, args), "--resume"], cwd=ROOT, env=cache_env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_tensors(cgan_smoke[0] / "ckpt.pt", out / "ckpt.pt")


def test_dual_transfer_stage_1_stopped_by_a_signal_continues_exactly(dual_transfer_smoke, cache_env, tmp_path):
    """Stage 1 (the classifier) keeps its step in classifier.pt; the same command continues it (not
    --resume: there is no stage-2 checkpoint yet), and both files end as an uninterrupted run's."""
    out = tmp_path / "run"
    proc = run_with_fault(cache_env, "dual_transfer.py", "SIGINT", "batch_indices", 2, "--smoke", "--out", out)
    name, step, command = stopped(proc, 130, out / "classifier.pt")
    assert step == 3 and command.endswith(f"--smoke --out {out}")
    assert sorted(p.name for p in out.iterdir()) == ["classifier.pt"]
    assert torch.load(out / "classifier.pt", weights_only=True)["step"] == 3
    again = subprocess.run([sys.executable, "dual_transfer.py", "--smoke", "--out", str(out)], cwd=ROOT,
                           env=cache_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "stopped at step 3: continuing it" in again.stdout, again.stderr[-3000:]
    assert re.findall(r"classifier step (\d+)/4", again.stdout) == ["4"]  # only the update left to do
    for name in ("classifier.pt", "ckpt.pt"):
        assert_same_tensors(dual_transfer_smoke[0] / name, out / name)


def test_ctrl_c_while_the_data_loads_ends_with_one_line(cache_env, tmp_path):
    """Outside the training loop Ctrl-C is a KeyboardInterrupt: one line (its message, if any), 130."""
    proc = run_with_fault(cache_env, "mad.py", "SIGINT", "load_celeba", 1, "--smoke", "--out", tmp_path / "a")
    assert (proc.returncode, proc.stderr.splitlines()[-1:], "Traceback" in proc.stderr) == (130, ["interrupted"], False)
    code = ("import runpy, sys, common\n"
            "def load(*a, **k): raise KeyboardInterrupt('the cache build stopped; nothing of it was kept')\n"
            "common.load_celeba = load\nsys.argv = ['feature_ae.py', '--smoke', '--out', sys.argv[1]]\n"
            "runpy.run_path('feature_ae.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], cwd=ROOT, env=cache_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130
    assert proc.stderr.splitlines()[-1:] == ["interrupted: the cache build stopped; nothing of it was kept"]


# A full disk -------------------------------------------------------------------------------------
def small_files(limit):
    """preexec_fn: files of this process may not grow past `limit` bytes; writes then fail (EFBIG)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("limit,failed,kept", [
    (1_000_000, "ckpt.pt", "; the previous checkpoint is kept"),  # the 1.7 MB checkpoint of step 6
    (200_000, "samples/step_000006.png", ""),  # the 0.35 MB sample grid of step 6
    (100, "metrics.jsonl", ""),  # the resume's rewrite of the log
])
def test_a_full_disk_ends_with_one_line_and_keeps_the_checkpoint(tmp_path, cache_env, limit, failed, kept):
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "attgan.py", "--smoke", "--steps", "3", "--out", str(out)],
                           cwd=ROOT, env=cache_env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt.99999.tmp").write_bytes(b"left by a crashed save")
    proc = subprocess.run([sys.executable, "attgan.py", "--smoke", "--out", str(out), "--resume"], cwd=ROOT,
                          env=cache_env, capture_output=True, text=True, timeout=600, preexec_fn=small_files(limit))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == f"error: {out / failed}: could not write it (File too large){kept}"
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.rglob("*.tmp"))


# Output paths, refused runs ----------------------------------------------------------------------
def test_output_paths_are_checked_before_the_work(attgan_smoke, mad_smoke, dual_transfer_smoke, feature_ae_smoke,
                                                  tmp_path, run_commands):
    """An output under a regular file cannot be written (by root either): each command says so in one
    line before it loads a model, and writes nothing."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    out = blocked / "sub"
    runs = run_commands(
        ("attgan.py", ["edit", "--ckpt", attgan_smoke[0] / "ckpt.pt", "--out", out / "edit.png"]),
        ("dual_transfer.py", ["edit", "--ckpt", dual_transfer_smoke[0] / "ckpt.pt", "--image", "none.jpg",
                              "--out", out / "edit.png"]),
        ("mad.py", ["swap", "--ckpt", mad_smoke[0] / "joint" / "ckpt.pt", "--out", out / "swap.png"]),
        ("feature_ae.py", ["show", "--ckpt", feature_ae_smoke[0] / "ckpt.pt", "--out", out]))
    for proc, name in zip(runs, ["edit.png", "edit.png", "swap.png", "grid.png"]):
        assert proc.returncode == 1 and proc.stdout == "", (proc.args, proc.stdout, proc.stderr)
        assert proc.stderr.splitlines() == [f"error: {out / name}: expected a file this user can write (Not a "
                                            f"directory)"], proc.stderr
    assert blocked.read_text() == ""


def test_a_run_refused_after_its_data_loaded_leaves_the_folder_reusable(tmp_path, run_commands):
    """--batch-size larger than the data is refused after the data loads; the corrected rerun into
    the same --out must then start (no metrics.jsonl or samples/ left behind)."""
    out = tmp_path / "mad"
    refused, rerun = run_commands(("mad.py", ["--smoke", "--stage", "ae", "--out", out, "--batch-size", "100000"]),
                                  ("mad.py", ["--smoke", "--stage", "ae", "--out", out, "--steps", "1"]))
    assert refused.returncode == 1 and "fewer than one batch of 100000" in refused.stderr
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert [r["step"] for r in common.read_jsonl(out / "ae" / "metrics.jsonl")] == [1]


# Attributes that cannot be learned ---------------------------------------------------------------
def test_check_attr_rates_refuses_below_1_and_above_99_percent(capsys):
    labels = torch.zeros(200, 5)
    labels[:1, 0] = 1  # 0.5 %: refused
    labels[:2, 1] = 1  # 1 %: kept
    labels[:, 2] = 1  # 100 %: refused
    labels[:198, 3] = 1  # 99 %: kept
    labels[:100, 4] = 1
    data = types.SimpleNamespace(labels=labels, attr_names=["A", "B", "C", "D", "E"])
    with pytest.raises(InputError) as caught:
        common.check_attr_rates(data)
    assert str(caught.value).startswith("--attrs: A on 0.5%, C on 100.0% of the 200 training images; ")
    assert "--allow-rare-attrs" in str(caught.value)
    assert common.check_attr_rates(data, allow=True) == data.attr_names
    assert capsys.readouterr().err == "note: rare attributes, trained anyway: A on 0.5%, C on 100.0%\n"
    common.check_attr_rates(types.SimpleNamespace(labels=labels[:, [1, 3, 4]], attr_names=["B", "D", "E"]))
    assert capsys.readouterr().err == ""


def test_every_script_refuses_an_attribute_that_never_varies(tmp_path, run_commands):
    """demo:16 draws no bald face: each script that trains on attributes refuses Bald in one line
    with its rate (computed here from the labels), and leaves no run files behind."""
    labels = common.load_celeba("demo:16", ["Bald", "Smiling"], "train", 32, None, verbose=False).labels
    assert labels[:, 0].sum() == 0 and 0 < labels[:, 1].mean() < 1
    calls = [(script, ["--smoke", "--no-allow-rare-attrs", "--attrs", "Bald", "Smiling", "--out", tmp_path / script])
             for script in ("attgan.py", "cgan.py", "dual_transfer.py", "feature_ae.py", "mad.py")]
    for (script, _), proc in zip(calls, run_commands(*calls)):
        assert proc.returncode == 1, (script, proc.stderr[-2000:])
        assert proc.stderr.splitlines()[-1] == (f"error: --attrs: Bald on 0.0% of the {len(labels)} training images; "
                                                f"expected attributes present on 1% to 99% (--allow-rare-attrs "
                                                f"trains anyway)"), script
        assert not (tmp_path / script).exists(), script  # the folders the refused run made are gone
