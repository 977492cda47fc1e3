#!/usr/bin/env bash
# Reward model on real human preferences (HH-RLHF harmless, read in place from ../shared):
# SFT on the chosen responses of the train split, then the RM on the train pairs, evaluated
# on the 200 test pairs. Byte tokenizer, tiny Llama-style model, 2 CPU cores.
#   bash experiments/hh_rm/run.sh /tmp/hh_rm [size] [sft_steps] [rm_steps]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-/tmp/hh_rm}; SIZE=${2:-tiny}; SFT_STEPS=${3:-300}; RM_STEPS=${4:-300}
export JAXRLHF_NO_PROGRESS=1
start=$(date +%s)
python -m jaxrlhf.train --config "configs/sft.py:data=hh,size=$SIZE,steps=$SFT_STEPS" \
  --workdir "$OUT/sft" --config.train.batch_size=16 --config.train.lr=1e-3 \
  --config.train.eval_every=100
python -m jaxrlhf.train --config "configs/rm.py:data=hh,init_from=$OUT/sft,steps=$RM_STEPS" \
  --workdir "$OUT/rm" --config.train.batch_size=16 --config.train.lr=3e-4 \
  --config.train.eval_every=100
end=$(date +%s)
python - "$OUT" "$((end - start))" <<'PY'
import json, sys
out, wall = sys.argv[1], int(sys.argv[2])
sft = json.load(open(f"{out}/sft/summary.json")); rm = json.load(open(f"{out}/rm/summary.json"))
print(json.dumps({"num_params": rm["num_params"], "sft_eval_loss": sft["eval_loss"],
                  "rm_eval_accuracy": rm["eval_accuracy"], "rm_eval_pairs": rm["eval_num_pairs"],
                  "wall_time_s": wall}, indent=2))
PY
