#!/usr/bin/env bash
# cpu_vs_llama.sh - Forge and llama.cpp side by side on the CPU, interleaved per file and round
# (the method issue 13 asks for: same files, same machine, same minute, 2 threads).
#
#   bench/cpu_vs_llama.sh LLAMA_BENCH ROUNDS TEST FILE...
#
# LLAMA_BENCH: path of a llama-bench built outside the project; TEST: pp512, tg128 or both
# ("pp512,tg128"). Prints one tab-separated line per measurement:
#   round  file  test  forge_tok_s  llama_tok_s  ratio  load_average
# FORGE (default build/forge) and THREADS (default 2) may be set in the environment.
set -euo pipefail

if [ $# -lt 4 ]; then
    echo "usage: $0 LLAMA_BENCH ROUNDS TEST[,TEST] FILE..." >&2
    exit 2
fi
llama=$1 rounds=$2 tests=$3
shift 3
forge=${FORGE:-build/forge}
threads=${THREADS:-2}
[ -x "$llama" ] || { echo "$0: $llama: not an executable llama-bench" >&2; exit 1; }
[ -x "$forge" ] || { echo "$0: $forge: not an executable (make first)" >&2; exit 1; }
case "$rounds" in '' | *[!0-9]*) echo "$0: ROUNDS must be a number, not '$rounds'" >&2; exit 2 ;; esac
for f in "$@"; do [ -r "$f" ] || { echo "$0: $f: cannot read" >&2; exit 1; }; done

# the tok/s column of the line of a test in either tool's markdown table
rate() { awk -F'|' -v t="$1" '$0 ~ "\\| *"t" *\\|" {gsub(/ /, "", $(NF-1)); split($(NF-1), a, "±"); print a[1]}'; }

printf 'round\tfile\ttest\tforge\tllama\tratio\tload\n'
for ((r = 1; r <= rounds; r++)); do
    for f in "$@"; do
        for t in ${tests//,/ }; do
            case "$t" in
            pp*) p=${t#pp} n=0 ;;
            tg*) p=0 n=${t#tg} ;;
            *) echo "$0: unknown test '$t' (ppN or tgN)" >&2; exit 2 ;;
            esac
            load=$(cut -d' ' -f1 /proc/loadavg)
            fv=$("$forge" bench -m "$f" -p "$p" -n "$n" -t "$threads" -r 1 --device cpu 2>&1 | rate "$t")
            lv=$("$llama" -m "$f" -p "$p" -n "$n" -t "$threads" -r 1 2>&1 | rate "$t")
            ratio=$(awk -v a="$fv" -v b="$lv" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
            printf '%d\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$(basename "$f")" "$t" "${fv:--}" "${lv:--}" "$ratio" "$load"
        done
    done
done
