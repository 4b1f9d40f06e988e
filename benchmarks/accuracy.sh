#!/usr/bin/env bash
# Accuracy of FITMM at the released defaults on the real datasets, seeds 1-3, until early stopping.
#   bash benchmarks/accuracy.sh [DATA_ROOT] [OUT_ROOT] [extra fitmm train args, e.g. --set consistency=cross_modal]
# Runs one after another with 1 torch thread each (start two copies on different datasets to use
# 2 cores); an interrupted run is resumed, a finished one skipped. Then prints the table.
set -euo pipefail
data_root=${1:-../shared/data}
out_root=${2:-runs/accuracy}
shift $(( $# > 2 ? 2 : $# ))
for data in ml100k_mm tiktok_mmssl; do
  for seed in 1 2 3; do
    out="$out_root/fitmm-$data-s$seed"
    if [ -f "$out/summary.json" ]; then continue; fi
    if [ -f "$out/last.pt" ]; then
      fitmm train --resume "$out"
    else
      fitmm train --data "$data_root/$data" --out "$out" --seed "$seed" --set threads=1 "$@"
    fi
  done
done
fitmm report "$out_root"/fitmm-*
