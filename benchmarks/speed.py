"""Training throughput of every method on this machine: img/s at each method's default size, for
batch sizes 32 and 64, bf16 autocast on/off and torch.compile on/off.

Each cell runs the method's own training loop through its command line, exactly as a user would
(the demo data, cached as uint8 on the device), for --steps steps, and reads img/s from the last
line of its metrics.jsonl: the second logging interval, so cuDNN autotuning, the first batches
and torch.compile's compilation stay out of the number. An image counts once per update it takes
part in (AttGAN: a D or a G step counts its batch; Dual Training: both images of a pair).

    python benchmarks/speed.py                          # all methods, full grid (a GPU machine)
    python benchmarks/speed.py --methods attgan --batch-sizes 32 --amp on --compile off on
    python benchmarks/speed.py --quick                  # the --smoke networks: a CPU check
"""
from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import InputError  # noqa: E402
from cli import output_path, run, vet, write_output  # noqa: E402

# Flags that select each method's default (full-size) configuration when run on the demo data.
# (Without them a CPU would switch to the methods' small cpu-demo presets.) feature_ae.py times its
# VGG feature loss with random weights: the same arithmetic, and no weights file is needed.
FULL_SIZE = {
    "attgan": ["--preset", "paper"],
    "dual_transfer": ["--preset", "default", "--cls-steps", "2"],  # stage 1 is not timed
    "cgan": [],
    "feature_ae": ["--preset", "paper", "--vgg-weights", "random"],  # the DFC loss's cost, no file
    "mad": ["--preset", "paper"],
}
METHODS = tuple(FULL_SIZE)


@functools.lru_cache(maxsize=None)
def has_compile_flag(method):
    """Whether <method>.py takes --compile / --no-compile (read from its --help)."""
    proc = subprocess.run([sys.executable, str(ROOT / f"{method}.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    return "--no-compile" in proc.stdout


def measure(method, batch_size, amp, compile_, steps, quick, device, data, workdir):
    """Run `steps` training steps of one method -> img/s of the second logging interval."""
    out = Path(workdir) / f"{method}_b{batch_size}_amp{int(amp)}_c{int(compile_)}"
    half = max(steps // 2, 1)
    command = [sys.executable, str(ROOT / f"{method}.py"), "--data", data, "--out", str(out),
               "--steps", str(2 * half), "--log-every", str(half), "--batch-size", str(batch_size),
               "--sample-every", str(10 ** 9), "--ckpt-every", str(10 ** 9), "--device", device,
               "--amp" if amp else "--no-amp"]
    if has_compile_flag(method):
        command.append("--compile" if compile_ else "--no-compile")
    elif compile_:
        return None, f"{method}.py has no --compile option"
    command += ["--smoke"] if quick else FULL_SIZE[method]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    metrics = next(out.rglob("metrics.jsonl"), out / "metrics.jsonl")  # mad.py: <out>/<stage>/
    if proc.returncode != 0 or not metrics.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, tail[0]
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return records[-1]["img_per_s"], None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--amp", nargs="+", choices=("on", "off"), default=["on", "off"],
                        help="bf16 autocast settings to time (CUDA only; the CPU runs fp32)")
    parser.add_argument("--compile", nargs="+", choices=("on", "off"), default=["off", "on"],
                        help="torch.compile settings to time")
    parser.add_argument("--steps", type=int, default=60, help="training steps per cell")
    parser.add_argument("--quick", action="store_true",
                        help="time the tiny --smoke networks (a check that runs on a CPU)")
    parser.add_argument("--device", default="auto", help="'auto', 'cuda' or 'cpu'")
    parser.add_argument("--data", default="demo:16", help="dataset the loops read")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = vet(parser.parse_args(argv), positive=("batch_sizes", "steps"))
    if args.json:  # checked before the timing, written after it
        output_path(args.json, "--json", args.overwrite)
    rows = []
    print(f"{'method':<15}{'batch':>6}{'bf16':>6}{'compile':>9}{'img/s':>10}")
    with tempfile.TemporaryDirectory() as workdir:
        for method in args.methods:
            if not (ROOT / f"{method}.py").is_file():
                raise InputError(f"{method}.py is not in {ROOT}")
            for batch in args.batch_sizes:
                for amp in args.amp:
                    for compile_ in args.compile:
                        rate, error = measure(method, batch, amp == "on", compile_ == "on",
                                              args.steps, args.quick, args.device, args.data,
                                              workdir)
                        rows.append(dict(method=method, batch_size=batch, amp=amp,
                                         compile=compile_, img_per_s=rate, error=error))
                        shown = f"{rate:10.1f}" if rate is not None else f"  failed: {error}"
                        print(f"{method:<15}{batch:>6}{amp:>6}{compile_:>9}{shown}", flush=True)
    if args.json:
        write_output(args.json, json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    run(main)
