#!/usr/bin/env bash
# The prepared GPU check: one command, about 9 minutes on one H100, everything it measures in one
# folder ($OUT when set, else runs/gpu_check). Run it from the repository root:
#
#   bash benchmarks/gpu_check.sh                # on the GPU machine, the real sample in .data/
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the same steps at toy sizes (a CPU check)
#
# Sections, each bounded by `timeout` so one slow part cannot eat the others' time:
#   1. attgan training img/s at 128 px, batch 32 and 64, bf16 and fp32, compile off; compile on
#      for bf16 (benchmarks/speed.py runs the real loop from the uint8 cache, end to end).
#   2. every other method's img/s at its default size, bf16, batch 32.
#   3. bf16 against fp32 on the real sample: the same seed and steps, both loss curves in one
#      figure (bf16_vs_fp32.png) and the final numbers side by side (bf16_vs_fp32.json).
#   4. a 128 px attgan run on the real sample (about 3 minutes), a judge, benchmarks/evaluate.py.
# nvidia-smi, the versions and every command's output go to log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
DATA="${GPU_CHECK_DATA:-.data/celeba_sample}"
TINY="${GPU_CHECK_TINY:-0}"
LOG="$OUT/log.txt"
export FACE_ATTR_CACHE="${FACE_ATTR_CACHE:-$OUT/cache}"

if [ "$TINY" = 1 ]; then   # toy sizes: checks that every step runs, on any machine
    DATA="demo:16"; DEVICE=cpu; SPEED=(--quick --steps 2); BF=(--smoke --steps 8 --log-every 2)
    RUN=(--smoke --steps 12); JUDGE=(--smoke); LIMIT=600
else
    DEVICE=cuda; SPEED=(--steps 120); BF=(--img-size 128 --steps 2000 --log-every 50)
    RUN=(--img-size 128 --epochs 160 --lr-decay-epoch 120 --sample-every 3000 --ckpt-every 3000)
    JUDGE=(--steps 1500)
    LIMIT=240
fi
section() { echo; echo "== $1 ($(date +%T))" | tee -a "$LOG"; }
run() { echo "\$ $*" >> "$LOG"; timeout "$LIMIT" "$@" 2>&1 | tee -a "$LOG"; }

section "machine"
{ nvidia-smi || true; python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; } 2>&1 | tee -a "$LOG"

section "1. attgan img/s at 128 px (speed.py: the real training loop from the cache)"
run python benchmarks/speed.py --methods attgan --batch-sizes 32 64 --amp on off --compile off \
    --device "$DEVICE" --data "$DATA" --json "$OUT/speed_attgan.json" --overwrite "${SPEED[@]}"
run python benchmarks/speed.py --methods attgan --batch-sizes 32 64 --amp on --compile on \
    --device "$DEVICE" --data "$DATA" --json "$OUT/speed_attgan_compile.json" --overwrite "${SPEED[@]}"

section "2. the other methods' img/s at their default sizes"
run python benchmarks/speed.py --methods dual_transfer cgan feature_ae mad --batch-sizes 32 --amp on \
    --compile off --device "$DEVICE" --data "$DATA" --json "$OUT/speed_others.json" --overwrite "${SPEED[@]}"

section "3. bf16 against fp32 (same seed, same steps)"
rm -rf "$OUT/bf16" "$OUT/fp32"
run python attgan.py --data "$DATA" --device "$DEVICE" --out "$OUT/bf16" --amp "${BF[@]}"
run python attgan.py --data "$DATA" --device "$DEVICE" --out "$OUT/fp32" --no-amp "${BF[@]}"
run python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = Path(sys.argv[1])
runs = {name: [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("bf16", "fp32") if (out / name / "metrics.jsonl").is_file()}
keys = ["g_rec", "g_cls", "d_cls", "gp", "d_adv", "img_per_s"]
fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
for ax, key in zip(axes, keys):
    for name, records in runs.items():
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), label=name) if points else None
    ax.set_title(key); ax.set_xlabel("step"); ax.legend()
fig.tight_layout(); fig.savefig(out / "bf16_vs_fp32.png", dpi=80)
summary = {name: {k: records[-1].get(k) for k in keys} for name, records in runs.items() if records}
(out / "bf16_vs_fp32.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY

section "4. a 128 px attgan run on the sample, a judge, evaluate.py"
rm -rf "$OUT/attgan128"
run python attgan.py --data "$DATA" --device "$DEVICE" --out "$OUT/attgan128" "${RUN[@]}"
run python benchmarks/judge.py --data "$DATA" --device "$DEVICE" --out "$OUT/judge.pt" --overwrite "${JUDGE[@]}"
run python benchmarks/evaluate.py --method attgan --ckpt "$OUT/attgan128/ckpt.pt" --data "$DATA" \
    --judge "$OUT/judge.pt" --device "$DEVICE" --json "$OUT/eval_attgan128.json" --overwrite
run python benchmarks/evaluate.py --method noop --img-size 128 --data "$DATA" --judge "$OUT/judge.pt" \
    --device "$DEVICE" --json "$OUT/eval_noop128.json" --overwrite
rm -rf "$FACE_ATTR_CACHE"   # the image cache is rebuilt from the data; nothing to bring back
section "done: $OUT"
ls -la "$OUT" | tee -a "$LOG"
