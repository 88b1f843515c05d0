#!/usr/bin/env bash
# A whole training run for a lent GPU machine, in one command, from the repository root:
#   bash training/device_job.sh OUT [MINUTES]
# It reads the bundle in runs/bundle (`python -m training bundle runs/bundle --max-mb 44`,
# carried along), trains the gpu-online configuration fitted to about MINUTES (default 6; --fit-to-time) with
# WORKERS processes drawing the pairs (default 12), and writes into OUT the slim checkpoints of the last epoch
# (model.pt), of the epoch with the best validation PSNR (best.pt) and of the mean of the last AVERAGE epochs
# (average.pt, default 8: fixed in advance, so the validation photos can still judge it, which they cannot
# best.pt), for `python -m export --checkpoint`, with history.json and train.log. A run that breaks still
# brings back its last finished epoch.
# INIT starts from a checkpoint or an exported U-Net graph (INIT=archivecolor/models/assets/unet.onnx
# CONFIG=gpu-finetune trains on the packaged model).
# CONFIG, DEVICE (cuda) and BUNDLE override the defaults; DEVICE=cpu runs it anywhere, slowly. TRAIN_TIMEOUT
# (seconds) stops the training by force, still leaving time to bring back its last finished epoch.
set -uo pipefail
out=${1:?usage: bash training/device_job.sh OUT [MINUTES]}
minutes=${2:-6}
config=${CONFIG:-gpu-online}
device=${DEVICE:-cuda}
bundle=${BUNDLE:-runs/bundle}
workers=${WORKERS:-12}
python=${PYTHON:-python3}
run=${RUN_DIR:-runs/device}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
if [ "$device" = cuda ]; then
    "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
fi
timeout "${TRAIN_TIMEOUT:-0}" "$python" -m training train --config "$config" --data "$bundle/data" --weights "$bundle/vgg16-fp16.pth" \
    --out "$run" --device "$device" --max-minutes "$minutes" --fit-to-time --workers "$workers" \
    ${INIT:+--init "$INIT"} 2>&1 | tee "$out/train.log"
status=${PIPESTATUS[0]}
[ -f "$run/last.pt" ] || { echo "no epoch finished" >&2; exit 1; }
"$python" -m training slim "$run/last.pt" "$out/model.pt" || exit 1
best=$("$python" -c "import json, sys; h = json.load(open(sys.argv[1])); print(max(h, key=lambda r: r['val_psnr'])['epoch'])" "$run/history.json")
[ -f "$run/epoch$best.pt" ] && "$python" -m training slim "$run/epoch$best.pt" "$out/best.pt"
last=$("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))[-1]['epoch'])" "$run/history.json")
epochs=()
for ((e = last - ${AVERAGE:-8} + 1; e <= last; e++)); do [ -f "$run/epoch$e.pt" ] && epochs+=("$run/epoch$e.pt"); done
[ ${#epochs[@]} -gt 0 ] && "$python" -m training average "$out/average.pt" "${epochs[@]}"
cp "$run/history.json" "$out/history.json"
exit "$status"
