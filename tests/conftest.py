"""Shared test fixtures.

Every test runs with FACE_ATTR_CACHE pointing at one session-wide temporary folder, so the small
synthetic demo set ('demo:16') and the uint8 image caches are built once per test session and
never land in the repository. Scripts are run through `run_script`, exactly as a user would.
"""
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
