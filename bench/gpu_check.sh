#!/usr/bin/env bash
# The checks of one session with a GPU, in order of value, each under its own time limit, so a slow part
# cannot take the rest with it. Logs go to $1 (default out/gpu), each part's as it runs.
#
#   bash bench/gpu_check.sh out/gpu                    # all parts, within $BUDGET (560) seconds
#   PARTS="compile digits" bash bench/gpu_check.sh out/gpu   # some of them
#
# step     bench/freeflow_step.py on SiT-XL/2, eager: fp32 and bf16 (then bf16 one-step vs 250-step SDE
#          sampling); about 2 minutes on an H200 (docs/gpu.md)
# digits   a short real distillation of a small SiT: `freeflow.py --toy digits` at its defaults (bf16 on a
#          GPU), from the teacher cached at $TEACHER (trained on a CPU) so its numbers compare with
#          docs/digits.md; about 5 minutes on an H200, whose step is no faster than a CPU's for this network
# compile  bench/freeflow_step.py with torch.compile: bf16, then fp32, in the time left; more than 200 s
#          on an H200 for the bf16 row alone
set -u
dir=${1:-out/gpu}
budget=${BUDGET:-560}
model=${MODEL:-XL/2}
teacher=${TEACHER:-out/toy/digits/teacher.pt}
parts=" ${PARTS:-step digits compile} "
mkdir -p "$dir"
export PYTHONUNBUFFERED=1 PYTHONPATH=.
start=$SECONDS
left() { local n=$(( budget - (SECONDS - start) )); echo $(( n > 1 ? n : 1 )); }
part() {  # part NAME LIMIT COMMAND...: run COMMAND for at most LIMIT seconds, its output to $dir/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s, $(( SECONDS - start )) s in): $*" | tee -a "$dir/parts.txt"
    timeout "$limit" "$@" > "$dir/$name.txt" 2>&1
    echo "== $name: exit $? after $(( SECONDS - start )) s" | tee -a "$dir/parts.txt"
    tr '\r' '\n' < "$dir/$name.txt" | grep -av "it/s\]$\|s/it\]$" | tail -n 40
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  nproc; } >> "$dir/parts.txt" 2>&1
cat "$dir/parts.txt"
if [[ $parts == *" step "* ]]; then
    part step_fp32 150 python3 bench/freeflow_step.py --model "$model" --precision fp32 --compile off --sde-steps 0
    part step_bf16 150 python3 bench/freeflow_step.py --model "$model" --precision bf16 --compile off
fi
if [[ $parts == *" digits "* ]]; then
    part digits 360 python3 freeflow.py --toy digits --out "$dir/digits" --toy-teacher "$teacher"
fi
if [[ $parts == *" compile "* ]]; then
    part compile_bf16 "$(left)" python3 bench/freeflow_step.py --model "$model" --precision bf16 --compile on --sde-steps 0
    part compile_fp32 "$(left)" python3 bench/freeflow_step.py --model "$model" --precision fp32 --compile on --sde-steps 0
fi
echo "== done after $(( SECONDS - start )) s" | tee -a "$dir/parts.txt"
