#!/usr/bin/env bash
# GPU benchmark run: this pack's A&E sampler vs plain ComfyUI sampling vs diffusers' A&E pipeline.
#
# Run from the repository root on a CUDA machine whose python3 has torch, transformers, safetensors, einops, scipy
# and psutil. Carry two git-ignored folders with the working tree:
#   .whl/      wheels of torchsde, trampoline and diffusers (installed here into /tmp/site, no network needed)
#   .comfyui/  the ComfyUI 0.3.75 source (scripts/bootstrap.sh creates it)
#
#   [BENCH_COMMIT=<sha>] bash benchmarks/run_gpu.sh [all|headline|sd15|sd15-b1|sd15-b4|sd15-down-mid|sdxl|sdxl-down-mid|passes|graphs|dit]
#
# "headline": the speed and memory targets of docs/performance.md, each part while the budget allows: sdxl batch 1
# (recompute auto), sd15 batch 1 (+ diffusers), sdxl batch 1 with the pass stored (recompute off, no refinement),
# sd15 batch 4 (+ diffusers), sdxl batch 4 (no refinement), then sd15 and sdxl batch 1 on ComfyUI 0.8.0 when
# .comfyui-0.8.0/ is carried. Every row has the first run's time (the warm-up: graph capture) next to the later ones.
# Order under "all", each part only while the budget allows: sd15 batch 1 (+ diffusers), sdxl batch 1 (50 steps
# each); "passes": benchmarks/pass_timing.py (one gradient pass vs one plain step on the real SD1.5 and SDXL UNets,
# cuDNN benchmark mode off and on, with per-pass operator profiles; about 1-2 minutes); "graphs": pass_timing.py
# --graph (the eager pass vs the same pass replayed from a CUDA graph); then sdxl batch 1 with
# attention_blocks=down_mid, sd15 batch 4 (+ diffusers), sd15 batch 1 with down_mid; last "dit":
# benchmarks/dit_bench.py, Flux.1 and SD3.5 medium at full size, 1024², DIT_STEPS (28) steps, plain vs A&E without
# refinement, DIT_REPEATS (1) timed runs each after a DIT_WARMUP_STEPS (8) warm-up (about 2-3 minutes; rows in
# dit_results.jsonl and dit_table.md).
# Results go to $OUT (default ./bench_out): results.jsonl (one JSON object per measurement), table.md, bench.log,
# pass_timing.jsonl, pass_table.md, graph_timing.jsonl, graph_table.md, and profiles.tgz (the profile folders).
# Environment: REPEATS (3), WARMUP_STEPS (= STEPS; the untimed warm-up run per measurement), BENCH_BUDGET_S (520: no
# measurement starts later than this many seconds after the script started; keep it ~80 s under the command's time
# limit), PROFILE (1: also write a torch.profiler table of one run per A&E measurement to $OUT/profile),
# WEIGHTS (reference|copy), CUDA_GRAPH (on|off: the sampler's cuda_graph option), CHECK_GRAPH (1: one extra run
# per A&E measurement without the graph, to report how far the results differ), RECORD_MAPS (1: timed runs record
# maps and losses as the nodes do by default), ORDER (interleaved: timed runs in rounds of plain, A&E, A&E at cap, so the
# host's speed drifts hit every mode alike; sequential: all runs of one mode, then the next), COMFYUI_ROOT (./.comfyui), BENCH_COMMIT (the commit to report when .git is not carried); for a dry run
# on a CPU-only machine: BENCH_DEVICE=cpu STEPS=4 REPEATS=1 WARMUP_STEPS=2.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PART="${1:-all}"
OUT="${OUT:-$PWD/bench_out}"
REPEATS="${REPEATS:-3}"
STEPS="${STEPS:-50}"
DEVICE="${BENCH_DEVICE:-cuda}"  # cpu only to try this script out on a machine without a GPU
WARMUP_STEPS="${WARMUP_STEPS:-$STEPS}"  # a warm-up as long as a timed run: first-run costs stay out of the timings
BUDGET="${BENCH_BUDGET_S:-520}"
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/bench.log"
: > "$LOG"
rm -f "$OUT/results.jsonl"

case "$PART" in all|headline|sd15|sd15-b1|sd15-b4|sd15-down-mid|sdxl|sdxl-down-mid|passes|graphs|dit) ;;
  *) echo "unknown part '$PART' (all|headline|sd15|sd15-b1|sd15-b4|sd15-down-mid|sdxl|sdxl-down-mid|passes|graphs|dit)" >&2; exit 2 ;; esac
EXTRA=(--weights "${WEIGHTS:-reference}" --cuda-graph "${CUDA_GRAPH:-on}" --order "${ORDER:-interleaved}")
if [ "${CHECK_GRAPH:-1}" = 1 ]; then EXTRA+=(--check-graph); fi
if [ "${RECORD_MAPS:-0}" = 1 ]; then EXTRA+=(--record-maps); fi
if [ "${PROFILE:-0}" = 1 ]; then EXTRA+=(--profile "$OUT/profile"); fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 || { echo "installing .whl/*.whl failed; see $LOG" >&2; tail -n 20 "$LOG" >&2; exit 3; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "warning: no .whl/*.whl carried; torchsde/trampoline/diffusers must already be importable" >&2
fi
export COMFYUI_ROOT="${COMFYUI_ROOT:-$PWD/.comfyui}"
if [ -z "${BENCH_COMMIT:-}" ]; then
  BENCH_COMMIT="$(git rev-parse HEAD 2> /dev/null || true)"
fi
export BENCH_COMMIT
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DIFFUSERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false

{
  echo "== $(date -u +%FT%TZ) part=$PART device=$DEVICE steps=$STEPS repeats=$REPEATS warmup_steps=$WARMUP_STEPS budget=${BUDGET}s commit=${BENCH_COMMIT:-?}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python3 -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" 2>&1
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -n 1
} >> "$LOG"

RC=0
LEFT=0
# budget_left MIN WHAT: sets LEFT to the seconds of budget left; fails (and logs WHAT as skipped) under MIN
budget_left() {
  LEFT=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$LEFT" -le "$1" ]; then
    echo "budget spent: skipped $2" | tee -a "$LOG" >&2
    RC=1
    return 1
  fi
  echo "== $2 (budget ${LEFT}s)" >> "$LOG"
}

bench() {
  budget_left 30 "bench.py $*" || return
  python3 benchmarks/bench.py --device "$DEVICE" --steps "$STEPS" --repeats "$REPEATS" --warmup-steps "$WARMUP_STEPS" \
    --budget-s "$LEFT" --comfy-root "$COMFYUI_ROOT" --out "$OUT/results.jsonl" --append "${EXTRA[@]}" "$@" \
    > /dev/null 2>> "$LOG" \
    || { echo "bench.py $* exited with $?" | tee -a "$LOG" >&2; RC=1; }
  if [ -s "$OUT/results.jsonl" ]; then
    python3 benchmarks/bench.py --table-from "$OUT/results.jsonl" --markdown "$OUT/table.md" > /dev/null
  fi
}

passes() {
  budget_left 60 "pass_timing.py" || return
  timeout "$LEFT" python3 benchmarks/pass_timing.py --device "$DEVICE" --arch sd15,sdxl --comfy-root "$COMFYUI_ROOT" \
    --profile "$OUT/pass_profile" --markdown "$OUT/pass_table.md" > "$OUT/pass_timing.jsonl" 2>> "$LOG" \
    || { echo "pass_timing.py exited with $?" | tee -a "$LOG" >&2; RC=1; }
}
graphs() {
  [ "$DEVICE" = cuda ] || return 0
  budget_left 60 "pass_timing.py --graph" || return
  timeout "$LEFT" python3 benchmarks/pass_timing.py --device "$DEVICE" --arch sd15,sdxl --comfy-root "$COMFYUI_ROOT" \
    --graph --markdown "$OUT/graph_table.md" > "$OUT/graph_timing.jsonl" 2>> "$LOG" \
    || { echo "pass_timing.py --graph exited with $?" | tee -a "$LOG" >&2; RC=1; }
}

# Flux.1 and SD3.5 medium (joint attention): their own rows, their own files
dit() {
  budget_left 60 "dit_bench.py" || return
  rm -f "$OUT/dit_results.jsonl"
  timeout "$LEFT" python3 benchmarks/dit_bench.py --device "$DEVICE" --arch flux,sd35m --steps "${DIT_STEPS:-28}" \
    --repeats "${DIT_REPEATS:-1}" --warmup-steps "${DIT_WARMUP_STEPS:-8}" --budget-s "$LEFT" \
    --comfy-root "$COMFYUI_ROOT" --out "$OUT/dit_results.jsonl" --markdown "$OUT/dit_table.md" > /dev/null 2>> "$LOG" \
    || { echo "dit_bench.py exited with $?" | tee -a "$LOG" >&2; RC=1; }
}

case "$PART" in headline) bench --arch sdxl --batch 1 ;; esac  # first: the target never measured with the graph
case "$PART" in all|headline|sd15|sd15-b1) bench --arch sd15 --batch 1 --diffusers ;; esac
case "$PART" in headline) bench --arch sdxl --batch 1 --recompute off --modes plain,ae_no_refine ;; esac  # stored pass
case "$PART" in headline) bench --arch sd15 --batch 4 --diffusers ;; esac
case "$PART" in headline) bench --arch sdxl --batch 4 --modes plain,ae_no_refine ;; esac
if [ "$PART" = headline ] && [ -f .comfyui-0.8.0/main.py ]; then  # the same rows on the newer host, where carried
  COMFYUI_ROOT="$PWD/.comfyui-0.8.0" bench --arch sd15,sdxl --batch 1 --modes plain,ae_no_refine
fi
case "$PART" in all|sdxl) bench --arch sdxl --batch 1 ;; esac
case "$PART" in all|passes) passes ;; esac
case "$PART" in all|graphs) graphs ;; esac
case "$PART" in all|sdxl-down-mid) bench --arch sdxl --batch 1 --blocks down_mid ;; esac
case "$PART" in all|sd15|sd15-b4) bench --arch sd15 --batch 4 --diffusers ;; esac
case "$PART" in all|sd15-down-mid) bench --arch sd15 --batch 1 --blocks down_mid ;; esac
case "$PART" in all|dit) dit ;; esac

# the profile folders go into one archive, so that the results folder holds few files
PROFILES=()
for d in profile pass_profile; do [ -d "$OUT/$d" ] && PROFILES+=("$d"); done
if [ ${#PROFILES[@]} -gt 0 ]; then
  tar czf "$OUT/profiles.tgz" -C "$OUT" "${PROFILES[@]}" && (cd "$OUT" && rm -rf "${PROFILES[@]}")
fi

echo "== done after $(( $(date +%s) - START ))s, rc=$RC" >> "$LOG"
grep -E "WARNING ae_|ERROR|Error|Traceback|budget|exited" "$LOG" | tail -n 40
echo
if [ -s "$OUT/table.md" ]; then cat "$OUT/table.md"; else echo "no bench.py results"; fi
for f in pass_table.md graph_table.md dit_table.md; do if [ -s "$OUT/$f" ]; then echo; cat "$OUT/$f"; fi; done
exit $RC
