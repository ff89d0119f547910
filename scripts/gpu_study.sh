#!/usr/bin/env bash
# A whole label-efficiency study on one GPU: one `pix2rep benchmark` process per method, all
# filling one study folder at once, then `--report-only` writes the report from every cell.
#
# The `cpu` preset's U-Net leaves an H200 nearly idle, so the methods run side by side. Each
# method that starts from a pretraining waits until the first method of that pretraining has
# finished it (its first cell exists), so every pretraining runs once. Cells are written
# atomically: a run stopped by the time limit keeps every finished cell, and the report marks
# entries with fewer seeds than planned. Rerunning the same command resumes.
#
# usage: scripts/gpu_study.sh OUT SECONDS BENCHMARK-ARGS...
#   OUT      the study folder (logs go to OUT-logs)
#   SECONDS  stop every process after this many seconds (0: no limit)
#   BENCHMARK-ARGS  the arguments every process shares, e.g.
#            --data ../shared/data/acdc/training --preset cpu --protocol label-free --device cuda
# METHODS=a,b in the environment runs only those methods (their missing cells), e.g. to redo
# rows after a fix: delete their cells, then rerun with METHODS set.
set -u
out=$1 limit=$2
shift 2
common=("$@" --out "$out" --no-progress)
logs=$out-logs
mkdir -p "$logs"
py=${PYTHON:-python}  # the interpreter that has pix2rep
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # a dozen processes share the host's cores
start=$(date +%s)

# method -> the method whose first cell means its pretraining is done ("" : none to wait for)
leaders=(baseline:"" pix2rep-lp:"" pix2rep-v2-lp:"" simclr-lp:"" invariance-lp:"" random-lp:"" baseline-mt:""
         pix2rep-ft:pix2rep-lp pix2rep-mt:pix2rep-lp pix2rep-v2-ft:pix2rep-v2-lp simclr-ft:simclr-lp
         invariance-ft:invariance-lp)
all_methods=$(printf '%s\n' "${leaders[@]}" | cut -d: -f1 | paste -sd, -)
if [ -n "${METHODS:-}" ]; then  # METHODS=a,b: run only these (the report still covers every cell)
    keep=()
    declare -A stands_for  # a method not run -> the kept method that makes its pretraining instead
    for entry in "${leaders[@]}"; do
        method=${entry%%:*} after=${entry#*:}
        [[ ",$METHODS," == *",$method,"* ]] || continue
        if [ -n "$after" ] && [[ ",$METHODS," != *",$after,"* ]]; then
            if [ -z "${stands_for[$after]:-}" ]; then stands_for[$after]=$method; after=; else after=${stands_for[$after]}; fi
        fi
        keep+=("$method:$after")
    done
    leaders=("${keep[@]}")
fi

left() {  # seconds left before the limit (a large number when there is none)
    if [ "$limit" -le 0 ]; then echo 1000000; else echo $((limit - ($(date +%s) - start))); fi
}

run_method() {  # run_method METHOD [--resume]
    [ "$(left)" -gt 0 ] || { echo "$1 not started: no time left" | tee -a "$logs/summary.txt"; return; }
    timeout --signal=INT --kill-after=20 "$(left)" "$py" -m pix2rep benchmark "${common[@]}" --methods "$1" "${@:2}" \
        >"$logs/$1.log" 2>&1
    local rc=$?  # 124/130: stopped by the time limit
    echo "$(date -u +%T) $1 finished with exit code $rc after $(($(date +%s) - start)) s" | tee -a "$logs/summary.txt"
}

# The first process creates the study (and fills the data cache); the others resume into it.
if [ -f "$out/config.yaml" ]; then first_flag=--resume; else first_flag=; fi
declare -A pid_of
run_method "${leaders[0]%%:*}" $first_flag &
pids=($!)
pid_of[${leaders[0]%%:*}]=$!
while [ ! -f "$out/config.yaml" ] && kill -0 "${pids[0]}" 2>/dev/null; do sleep 1; done
[ -f "$out/config.yaml" ] || { echo "the first process stopped before creating $out; see $logs/${leaders[0]%%:*}.log"; exit 1; }

for entry in "${leaders[@]:1}"; do
    method=${entry%%:*} after=${entry#*:}
    if [ -z "$after" ]; then
        run_method "$method" --resume &
        pid_of[$method]=$!
        pids+=($!)
    else
        (  # wait for the pretraining, unless its method stopped without making it
            while [ -z "$(ls "$out"/cells/"$after"-N*-s*.json 2>/dev/null)" ] && kill -0 "${pid_of[$after]}" 2>/dev/null \
                  && [ "$(left)" -gt 0 ]; do sleep 2; done
            run_method "$method" --resume
        ) &
        pids+=($!)
    fi
done
wait "${pids[@]}"
echo "all methods stopped after $(($(date +%s) - start)) s"

# One report over every cell, with the grid the processes were given (for the seed counts).
"$py" -m pix2rep benchmark "${common[@]}" --methods "$all_methods" --report-only >"$logs/report.log" 2>&1
echo "report-only: exit code $? ($out/REPORT.md)" | tee -a "$logs/summary.txt"
echo "wall time of the whole study: $(($(date +%s) - start)) s" | tee -a "$logs/summary.txt"
