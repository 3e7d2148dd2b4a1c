#!/usr/bin/env bash
# The checks of one session with a GPU, in order of value, each under its own time limit, so a slow part
# cannot take the rest with it. Logs go to $1 (default out/gpu), each part's as it runs.
#
#   PARTS="step compile" bash bench/gpu_check.sh out/gpu     # one call of the device (about 8 minutes)
#   PARTS="digits graphs" bash bench/gpu_check.sh out/gpu    # a second call (about 7 minutes)
#
# A lease is 15 minutes of device time in all, a call at most 10: two calls of the parts above fit, the first
# one first. Rehearse on a CPU (small model, few steps) with
#   MODEL=T/2 BATCH=8 DIGITS_STEPS=20 DIGITS_FLAGS="--eval-samples 100 --scan-samples 100" \
#       TEACHER=out/toy/digits/teacher.pt bash bench/gpu_check.sh out/rehearsal
#
# step     bench/freeflow_step.py on SiT-XL/2, eager: bf16 with the three ∂_s F paths (the float32 JVP of
#          before, the bf16 JVP, the one-sided bf16 difference), fp32 with two, then one-step vs 250-step SDE
#          sampling in bf16; about 2 minutes on an H200
# compile  the same with torch.compile over every pass of the step, bf16: the bf16 JVP (the ImageNet default),
#          then the one-sided difference, in the time left; each row's "first step" column is its compile time
# digits   `freeflow.py --toy digits` at its defaults (bf16 on a GPU, the bf16 JVP), from the teacher cached at
#          $TEACHER (trained on a CPU) so its numbers compare with docs/digits.md; about 5 minutes on an H200
# graphs   the digits run at 1000 steps with --compile --compile-mode reduce-overhead (CUDA graphs): the small
#          SiT's step is host-bound on a GPU, and this is how it would stop being so
set -u
dir=${1:-out/gpu}
budget=${BUDGET:-560}
model=${MODEL:-XL/2}
batch=${BATCH:-32}
teacher=${TEACHER:-out/toy/digits/teacher.pt}
digits_steps=${DIGITS_STEPS:-3000}
digits_flags=${DIGITS_FLAGS:-}
parts=" ${PARTS:-step compile digits graphs} "
mkdir -p "$dir"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$SECONDS
left() { local n=$(( budget - (SECONDS - start) )); echo $(( n > 1 ? n : 1 )); }
part() {  # part NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds (or what is left), its output to $dir/NAME.txt
    local name=$1 limit=$2; shift 2
    (( limit > $(left) )) && limit=$(left)
    echo "== $name (limit ${limit} s, $(( SECONDS - start )) s in): $*" | tee -a "$dir/parts.txt"
    timeout "$limit" "$@" > "$dir/$name.txt" 2>&1
    echo "== $name: exit $? after $(( SECONDS - start )) s" | tee -a "$dir/parts.txt"
    tr '\r' '\n' < "$dir/$name.txt" | grep -av "it/s\]$\|s/it\]$" | tail -n 40
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  nproc; git log --oneline -1 2>/dev/null; } >> "$dir/parts.txt" 2>&1
cat "$dir/parts.txt"
step="python3 bench/freeflow_step.py --model $model --batch $batch"
if [[ $parts == *" step "* ]]; then
    part step_bf16 150 $step --precision bf16 --compile off --dsdt jvp-fp32 jvp fd-forward --sde-steps 250
    part step_fp32 110 $step --precision fp32 --compile off --dsdt jvp fd-forward --sde-steps 0
fi
if [[ $parts == *" compile "* ]]; then
    part compile_jvp 300 $step --precision bf16 --compile on --dsdt jvp --sde-steps 0
    part compile_fd 300 $step --precision bf16 --compile on --dsdt fd-forward --sde-steps 0
fi
if [[ $parts == *" digits "* ]]; then
    part digits 360 python3 freeflow.py --toy digits --steps "$digits_steps" --out "$dir/digits" --toy-teacher "$teacher" \
        $digits_flags
fi
if [[ $parts == *" graphs "* ]]; then
    part graphs 240 python3 freeflow.py --toy digits --steps $(( digits_steps < 1000 ? digits_steps : 1000 )) \
        --out "$dir/digits_graphs" --toy-teacher "$teacher" --compile --compile-mode reduce-overhead $digits_flags
fi
echo "== done after $(( SECONDS - start )) s" | tee -a "$dir/parts.txt"
