"""Shared test fixtures.

Every test runs with FACE_ATTR_CACHE pointing at one session-wide temporary folder, so the small
synthetic demo set ('demo:16') and the uint8 image caches are built once per test session and
never land in the repository. Scripts are run through `run_script`, exactly as a user would, or,
where a test runs several commands, through `run_commands`: the same command lines, one after the
other in ONE fresh interpreter (each script executed as __main__ with its sys.argv), so torch is
imported once instead of once per command. The `<method>_smoke` fixtures train each method's
--smoke run once per session, shared by tests/test_<method>.py and tests/test_benchmarks.py (a
test that changes files copies the run first).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def face_attr_cache(tmp_path_factory):
    """A throw-away cache root for demo sets and image caches, shared by the whole session."""
    path = tmp_path_factory.mktemp("face_attr_cache")
    os.environ["FACE_ATTR_CACHE"] = str(path)
    # One thread everywhere, in this process and in every script a test runs: CPU float sums then
    # come out the same in both, so a run in a subprocess and one in-process can be compared
    # bit for bit (and 2 cores are not oversubscribed by parallel-in-parallel).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    return path


@pytest.fixture
def cache_env(face_attr_cache):
    """The environment for subprocess runs (inherits FACE_ATTR_CACHE)."""
    return dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache))


@pytest.fixture
def run_script(cache_env):
    """run_script('attgan.py', '--smoke', '--out', path) runs a script from the repository root;
    by default a non-zero exit fails the test and shows the script's output."""

    def run(script, *args, check=True, input=None, timeout=600):
        proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                              env=cache_env, capture_output=True, text=True, input=input,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                                 f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    return run


# One interpreter, several command lines. Each command runs the script as `python <script> <args>`
# would (runpy as __main__, sys.argv, sys.path[0] the script's folder, stdout and stderr captured)
# and ends as the interpreter would end it: SystemExit(None) -> 0, SystemExit(int) -> that int,
# SystemExit(text) -> the text on stderr and 1, any other exception -> its traceback and 1.
# Before each command torch's global generator gets a fresh random seed, as a new process has: a
# command cannot lean on the random state an earlier one left (a resume that forgot to restore it).
DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
calls_file, results_file = sys.argv[1:3]
calls, results = json.load(open(calls_file)), []
for script, argv in calls:
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    out, err = io.StringIO(), io.StringIO()
    sys.argv, sys.path[0] = [script, *argv], os.path.dirname(script)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code
            if not (code is None or isinstance(code, int)):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code or 0, out.getvalue(), err.getvalue()])
json.dump(results, open(results_file, "w"))
"""


def commands(calls, env, workdir, timeout=600):
    """Run [(script, [args...]), ...] in one fresh interpreter -> a CompletedProcess per call."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    calls = [(str(ROOT / script), [str(a) for a in args]) for script, args in calls]
    (workdir / "calls.json").write_text(json.dumps(calls))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(workdir / "calls.json"),
                           str(workdir / "results.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"the command driver failed\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((workdir / "results.json").read_text())
    return [subprocess.CompletedProcess([script, *args], code, out, err)
            for (script, args), (code, out, err) in zip(calls, results)]


@pytest.fixture
def run_commands(cache_env, tmp_path_factory):
    """run_commands(("attgan.py", ["--help"]), ("attgan.py", ["edit", "--help"])) -> one
    CompletedProcess per command line, all run in one fresh interpreter."""
    return lambda *calls: commands(calls, cache_env, tmp_path_factory.mktemp("commands"))


def smoke(tmp_path_factory, face_attr_cache, script):
    """`python <script> --smoke --out <fresh folder>` -> (folder, stdout); it must succeed."""
    out = tmp_path_factory.mktemp(Path(script).stem + "_smoke") / "run"
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="session")
def attgan_smoke(tmp_path_factory, face_attr_cache):
    """`python attgan.py --smoke` -> (run folder, stdout)."""
    return smoke(tmp_path_factory, face_attr_cache, "attgan.py")


@pytest.fixture(scope="session")
def cgan_smoke(tmp_path_factory, face_attr_cache):
    """`python cgan.py --smoke` -> (run folder, stdout)."""
    return smoke(tmp_path_factory, face_attr_cache, "cgan.py")


@pytest.fixture(scope="session")
def dual_transfer_smoke(tmp_path_factory, face_attr_cache):
    """`python dual_transfer.py --smoke` (both stages) -> (run folder, stdout)."""
    return smoke(tmp_path_factory, face_attr_cache, "dual_transfer.py")


@pytest.fixture(scope="session")
def feature_ae_smoke(tmp_path_factory, face_attr_cache):
    """`python feature_ae.py --smoke` (the DCAE) -> (run folder, stdout)."""
    return smoke(tmp_path_factory, face_attr_cache, "feature_ae.py")


@pytest.fixture(scope="session")
def mad_smoke(tmp_path_factory, face_attr_cache):
    """`python mad.py --smoke --stage S` for the three stages in order, as three command lines in
    one interpreter -> (out folder holding ae/, disentangle/, joint/; {stage: stdout})."""
    out = tmp_path_factory.mktemp("mad_smoke")
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    stages = ("ae", "disentangle", "joint")
    procs = commands([("mad.py", ["--smoke", "--out", out, "--stage", s]) for s in stages], env,
                     tmp_path_factory.mktemp("mad_commands"))
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, {s: p.stdout for s, p in zip(stages, procs)}
