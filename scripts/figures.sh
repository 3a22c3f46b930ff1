#!/usr/bin/env bash
# Regenerate every figure in docs/figures/ (the README's Reproductions) from runs this script
# makes, and the claims table they sit beside. About 30 minutes on 2 CPU cores (see README).
#
#   scripts/figures.sh [RUNS_DIR]      runs under RUNS_DIR (default figures_runs/); run again,
#                                      it reuses the finished ones
set -euo pipefail
cd "$(dirname "$0")/.."
normexp=${NORMEXP:-.venv/bin/normexp}
runs=${1:-figures_runs}
dest=docs/figures
mkdir -p "$dest"

# the file a report.md shows under the heading $2
shown_under() {
  local file
  file=$(sed -n "s/^!\[$2\](\(.*\))\$/\1/p" "$1")
  [ -n "$file" ] || { echo "figures.sh: no figure '$2' in $1" >&2; exit 1; }
  echo "$(dirname "$1")/$file"
}

# 1. every claim at --quick: Xiong et al.'s Fig. 3 at width 128 (claim 1), Wortsman et al.'s
#    Fig. 1 at 100 steps (claim 8, the report of its sweep), the depth study (claims 9, 10),
#    DyT (claim 12)
"$normexp" claims --quick --out "$runs/claims_quick"
cp "$runs/claims_quick/expected_gradients.png" "$dest/xiong_fig3_quick.png"
report="$runs/claims_quick/lr_sensitivity/report/report.md"
cp "$(shown_under "$report" "Final loss vs learning rate: placement=pre")" \
  "$dest/wortsman_pre_100_steps.png"
cp "$(shown_under "$report" "Final loss vs learning rate: placement=peri")" \
  "$dest/wortsman_peri_100_steps.png"
# claims 9 and 10: per-block variance, pruning damage and angular distance (the depth study)
cp "$runs/claims_quick/curse_of_depth.png" "$dest/curse_of_depth_quick.png"
cp "$runs/claims_quick/mix_ln.png" "$dest/mix_ln_quick.png"
# claim 12: DyT's loss against alpha0, and its saturated share over training
cp "$runs/claims_quick/dyt_alpha.png" "$dest/dyt_alpha_quick.png"
cp "$runs/claims_quick/dyt_saturation.png" "$dest/dyt_saturation_quick.png"

# 2. claim 1 at the paper's width, 512
"$normexp" claims --quick --only 1 --scale init_width=512 --out "$runs/claims_width512"
cp "$runs/claims_width512/expected_gradients.png" "$dest/xiong_fig3_width512.png"

# 3. claim 8's sweep for Pre-LN at 1000 steps, and its report
"$normexp" sweep configs/sweeps/lr_sensitivity.yaml --out "$runs/lr1000" --max-parallel 2 \
  --set 'model.placement=[pre]' 'model.final_norm=[true]' 'model.d_model=[16,32,64]' \
  model.n_layer=2 model.n_head=2 data.seq_len=32 data.eval_batches=4 train.batch_size=8 \
  train.steps=1000 optim.warmup_steps=50 log.every=10 log.grad_norms=false \
  train.eval_every=1000 train.checkpoint_every=1000
"$normexp" report "$runs/lr1000"
report="$runs/lr1000/report/report.md"
cp "$(shown_under "$report" "Final loss vs learning rate")" "$dest/wortsman_pre_1000_steps.png"
cp "$(shown_under "$report" "Max attention logit over training")" \
  "$dest/wortsman_pre_1000_steps_logit_max.png"
# the README's verdicts on it: claim 8's judges on the Pre-LN runs
"${PYTHON:-.venv/bin/python}" - "$runs/lr1000" <<'EOF' | tee "$runs/lr1000/verdicts.txt"
import sys
from normexp import lr_study, lr_verdicts
numbers = lr_study.lr_sensitivity_numbers(sys.argv[1])
for judge, arg in ((lr_verdicts.judge_qk_sensitivity, numbers["sensitivity"]["pre"]),
                   (lr_verdicts.judge_logit_growth, numbers["runs"]["pre"])):
    verdict = judge(arg)
    print(f"{verdict.verdict}: {verdict.figure}")
EOF

# 4. claim 11's sweep at 1000 steps: the largest stable lr of each attention setup
"$normexp" sweep configs/sweeps/qkv_norm.yaml --out "$runs/qkv1000" --max-parallel 2 \
  --set 'model.d_model=[16,32,64]' model.n_layer=2 model.n_head=2 data.seq_len=32 \
  data.eval_batches=4 train.batch_size=8 train.steps=1000 optim.warmup_steps=50 log.every=10 \
  log.grad_norms=false train.eval_every=1000 train.checkpoint_every=1000
"${PYTHON:-.venv/bin/python}" - "$runs/qkv1000" "$dest/rybakov_1000_steps.png" <<'EOF' \
  | tee "$runs/qkv1000/verdicts.txt"
import sys
from normexp import plots, qkv_study, lr_verdicts
from normexp.report import png
numbers = qkv_study.stable_lrs(sys.argv[1])
verdict = lr_verdicts.judge_higher_lr(numbers["stable"], numbers["lrs"])
print(f"{verdict.verdict}: {verdict.figure}")
for row in numbers["table"]:
    print(f"width {row['model.d_model']} {row['setup']}: LR sensitivity "
          f"{row['lr_sensitivity']:.3f}, best lr {row['best_lr']:g}, loss {row['best_loss']:.3f}")
runs = qkv_study.load_runs(sys.argv[1])
with open(sys.argv[2], "wb") as f:
    f.write(png(plots.loss_vs_lr(runs, line="model.d_model", panel="setup")))
EOF

echo "figures.sh: wrote $(ls "$dest" | wc -l) figures in $dest; claims table: \
$runs/claims_quick/claims.md" >&2
