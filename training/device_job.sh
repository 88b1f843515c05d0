#!/usr/bin/env bash
# A whole training run for a lent GPU machine, in one command, from the repository root:
#   bash training/device_job.sh OUT [MINUTES]
# It reads the bundle in runs/bundle (`python -m training bundle runs/bundle --max-mb 42`, carried along),
# trains the gpu-online configuration for about MINUTES (default 6) and writes into OUT the slim
# checkpoint (model.pt, for `python -m export --checkpoint`), history.json and train.log.
# CONFIG, DEVICE (cuda) and BUNDLE override the defaults; DEVICE=cpu runs it anywhere, slowly.
set -euo pipefail
out=${1:?usage: bash training/device_job.sh OUT [MINUTES]}
minutes=${2:-6}
config=${CONFIG:-gpu-online}
device=${DEVICE:-cuda}
bundle=${BUNDLE:-runs/bundle}
python=${PYTHON:-python3}
run=${RUN_DIR:-runs/device}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
if [ "$device" = cuda ]; then
    "$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device here'; print(torch.__version__, torch.cuda.get_device_name())"
fi
"$python" -m training train --config "$config" --data "$bundle/data" --weights "$bundle/vgg16-fp16.pth" \
    --out "$run" --device "$device" --max-minutes "$minutes" 2>&1 | tee "$out/train.log"
"$python" -m training slim "$run/last.pt" "$out/model.pt"
cp "$run/history.json" "$out/history.json"
