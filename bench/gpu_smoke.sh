#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step functions are called indirectly: step NAME LIMIT FUNCTION
# bench/gpu_smoke.sh (issue 22): one prepared smoke run of clipda's GPU paths, for the first
# session that gets a GPU machine (15 minutes of GPU time in all: this script stops itself
# after --budget seconds, 540 by default; expected to take 6-8 minutes on one H100).
#
#   bash bench/gpu_smoke.sh [--cpu] [--out DIR] [--budget S] [--fraction F] [--keep]
#                           [--only STEP,STEP] [--wheels DIR|none]
#
# Steps, each under its own timeout (cut to what is left of --budget), each outcome
# recorded, the script going on after a failure; in this order (most wanted first):
#   probe           torch / CUDA versions, GPU names and compute capability, bf16 support,
#                   faiss version and GPU support (get_num_gpus), missing project modules,
#                   pip's nvidia / cuda / faiss packages, nvidia-smi's name, memory, driver
#   tiny_world      `python -m pipeline synth` of a tiny sample world (tests' TINY sizes)
#   torchrun_embed  torchrun --nproc-per-node 2 -m pipeline embed (its Flickr30k, 4 shards):
#                   the device each rank used, read from each part's runtime metadata;
#                   skipped with fewer than 2 GPUs
#   scale_gpu1      bench/scale.py --fractions 0.01 with compute.deterministic=on (GPU)
#   caption         `clipda caption` (python -m pipeline caption) of two tiny-world images
#                   with scale_gpu1's ada model, and which faiss index served it: derived
#                   by building decode.TokenIndex for that model on that device (what
#                   caption builds), as nothing prints it but a warning for a CPU fallback
#   scale_gpu2      scale_gpu1 again (the same settings): bitwise the same weights?
#   train_caption   bench/train_caption.py --loss ce: peak GPU memory and ms per step
#   embed_bench     bench/embed.py --device cuda: images/s of the stage vs the bare forward
#   scale_cpu       scale_gpu1 on the CPU (CUDA_VISIBLE_DEVICES=''): the CPU reference
#   scale_gpu_nodet scale with the default compute.deterministic (auto: off on CUDA): what
#                   determinism costs, and how far the default drifts from it
#   compare         sha256 and max |diff| of the saved weights (ada caption decoder, VQA
#                   head), max |diff| of the headline metrics and of the embeddings, and
#                   the stage seconds, between the scale runs
# then one summary table (step, status ok / FAILED / skipped, seconds, key result).
#
# --cpu is a dry run on a machine without a GPU: every GPU step runs on the CPU instead
# (smaller sizes for train_caption and embed_bench; torchrun with 2 CPU ranks), so the
# plumbing is tested; about 7 minutes on 2 busy cores. --out DIR (default: a new temp
# folder, printed) gets logs/NN_step.log, summary.txt and logs.tar.gz; the data go to
# DIR/work and are removed at the end unless --keep. --only runs the named steps (others
# skipped). Python: $PYTHON, else .venv/bin/python, else python, else python3.
#
# On the device machine (no venv there: python3 holds torch; faiss (faiss-cpu, or faiss-gpu
# as docs/gpu.md says), ijson, msgspec and nltk are not installed): carry their wheels
# (Python 3.12, manylinux x86_64, --no-deps) in .whl/ (.gitignore'd), which this script
# then installs into DIR/work/site and puts on PYTHONPATH (--wheels none: don't); copy the
# two result files into $OUT, e.g.
#   bash bench/gpu_smoke.sh --out /tmp/smoke; cp /tmp/smoke/summary.txt /tmp/smoke/logs.tar.gz "$OUT"/
# Send back: the summary table (summary.txt) and logs.tar.gz.

set -uo pipefail

usage() { sed -n '3,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

CPU=0 OUT="" KEEP=0 BUDGET=540 FRACTION=0.01 ONLY="" WHEELS=""
while (($#)); do
  case $1 in
    --cpu) CPU=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --fraction) FRACTION=${2:?--fraction needs a number}; shift ;;
    --keep) KEEP=1 ;;
    --only) ONLY=",${2:?--only needs step names},"; shift ;;
    --wheels) WHEELS=${2:?--wheels needs a folder or none}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "--budget: whole seconds, got $BUDGET" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$REPO" || exit 2
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python
elif command -v python >/dev/null; then PY=python
else PY=python3
fi
if [[ -z $OUT ]]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX") || exit 2; fi
mkdir -p "$OUT/logs" "$OUT/work" || exit 2
OUT=$(cd "$OUT" && pwd) || exit 2
LOGS=$OUT/logs WORK=$OUT/work
RUNS=$WORK/runs TINY=$WORK/tiny
mkdir -p "$RUNS" "$TINY"
export PYTHONUNBUFFERED=1 PYTHONHASHSEED=0 DVC_NO_ANALYTICS=1
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
if ((CPU)); then
  export CUDA_VISIBLE_DEVICES=""  # torch sees no GPU: every `auto` device is the CPU
  DEV=cpu
else
  DEV=cuda
fi
if [[ -z $WHEELS ]] && ((!CPU)) && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  WHEELS=$REPO/.whl
fi
[[ $WHEELS == none ]] && WHEELS=""

# --------------------------------------------------------------------------- step machinery
START=$SECONDS RESERVE=20 INTERRUPTED=0 STEP_PID="" STEP_DEADLINE=0
PIDFILE=$WORK/.timeout.pid KEYFILE=$WORK/.key SKIPFILE=$WORK/.skip
NAMES=() STATUS=() SECS=() RESULTS=()

# Inside a step: run a command under the step's deadline, its whole process group killed
# (TERM, then KILL 10 s later) when the deadline passes; exit status 124 then.
limited() {
  local left=$((STEP_DEADLINE - SECONDS))
  if ((left <= 0)); then echo "no time left in this step for: $*"; return 124; fi
  timeout --kill-after=10 "$left" "$@" <&0 &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  wait "$pid"
}
key() { printf '%s\n' "$*" >"$KEYFILE"; }  # the step's key result (for the table)
skip() { key "$*"; : >"$SKIPFILE"; }        # the step chose not to run (with the reason)

on_signal() {
  INTERRUPTED=1
  if [[ -s $PIDFILE ]]; then kill -TERM -- "-$(<"$PIDFILE")" 2>/dev/null; fi
  if [[ -n $STEP_PID ]]; then kill -TERM "$STEP_PID" 2>/dev/null; fi
}
trap on_signal INT TERM

record() {  # record NAME STATUS SECONDS RESULT
  NAMES+=("$1") STATUS+=("$2") SECS+=("$3") RESULTS+=("$4")
  local secs=$3
  [[ $secs == - ]] || secs+=s
  printf '[%s] %-16s %-8s %7s  %s\n' "$(date +%T)" "$1" "$2" "$secs" "$4"
}

now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

step() {  # step NAME TIMEOUT FUNCTION [ARGS...]
  local name=$1 limit=$2 fn=$3
  shift 3
  local log
  log=$LOGS/$(printf '%02d' $((${#NAMES[@]} + 1)))_$name.log
  if ((INTERRUPTED)); then record "$name" skipped - "interrupted"; return; fi
  if [[ -n $ONLY && $ONLY != *",$name,"* ]]; then record "$name" skipped - "not in --only"; return; fi
  local left=$((BUDGET - (SECONDS - START)))
  [[ $name == compare ]] || left=$((left - RESERVE))
  if ((left < 15)); then record "$name" skipped - "time budget (--budget $BUDGET) spent"; return; fi
  ((limit > left)) && limit=$left
  rm -f "$KEYFILE" "$SKIPFILE" "$PIDFILE"
  STEP_DEADLINE=$((SECONDS + limit))
  printf '[%s] %-16s running (limit %ss, log %s)\n' "$(date +%T)" "$name" "$limit" "$log"
  local t0 rc status result
  t0=$(now)
  ("$fn" "$@") >"$log" 2>&1 &
  STEP_PID=$!
  wait "$STEP_PID"
  rc=$?
  while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; rc=$?; done  # after a signal
  STEP_PID=""
  if [[ -e $SKIPFILE ]]; then status=skipped
  elif ((rc == 0)); then status=ok
  elif ((INTERRUPTED)); then status=FAILED
    result="interrupted (exit $rc)"
  elif ((rc == 124 || rc == 137)) || ((SECONDS >= STEP_DEADLINE)); then status=FAILED
    result="timed out after ${limit}s"
  else status=FAILED
    result="exit $rc"
  fi
  if [[ -s $KEYFILE ]]; then result="${result:+$result; }$(<"$KEYFILE")"
  elif [[ $status != ok ]]; then  # the log's last line says why
    result="${result:+$result: }$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c 1-150)"
  fi
  record "$name" "$status" "$(elapsed "$t0")" "${result:-}"
}

# --------------------------------------------------------------------------- python helpers
PROBE_PY=$(cat <<'EOF'
import importlib, os, sys
print("python", sys.version.split()[0], sys.executable)
mods = ["torch", "transformers", "tokenizers", "safetensors", "pyarrow", "faiss", "numpy",
        "nltk", "typer", "PIL", "ijson", "msgspec", "tqdm", "yaml", "psutil", "jinja2"]
missing = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:
        missing.append(m)
        print(f"import {m}: FAILED ({type(exc).__name__}: {exc})")
parts = []
try:
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch {torch.__version__}, torch.version.cuda {torch.version.cuda}, cudnn "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}, "
          f"cuda available {torch.cuda.is_available()}, {n} device(s), "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    names = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu {i}: {p.name}, compute capability {p.major}.{p.minor}, "
              f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
        names.append(f"{p.name} (sm {p.major}.{p.minor})")
    if n:
        bf16 = torch.cuda.is_bf16_supported()
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            native = "?"
        print(f"torch.cuda.is_bf16_supported(): {bf16} (without emulation: {native})")
        parts.append(f"{n} GPU: {', '.join(names)}; bf16 {bf16}")
    else:
        parts.append("no CUDA device")
    parts.insert(0, f"torch {torch.__version__} cuda {torch.version.cuda}")
except Exception as exc:
    print(f"torch: {type(exc).__name__}: {exc}")
try:
    import faiss
    gpu = hasattr(faiss, "StandardGpuResources")
    ngpu = faiss.get_num_gpus() if gpu else None
    print(f"faiss {faiss.__version__}, GPU support {gpu}, faiss.get_num_gpus() {ngpu}")
    parts.append(f"faiss {faiss.__version__} " + (f"GPU ({ngpu} GPUs)" if gpu else "CPU-only"))
except Exception as exc:
    print(f"faiss: {type(exc).__name__}: {exc}")
if missing:
    parts.append("MISSING: " + " ".join(missing))
print("KEY:", "; ".join(parts))
sys.exit(1 if missing else 0)
EOF
)

PARTS_PY=$(cat <<'EOF'
import json, sys
from pathlib import Path
import pyarrow as pa
out, world = Path(sys.argv[1]), int(sys.argv[2])
seen = {}
for p in sorted(out.glob("part-*.arrow")):
    with pa.memory_map(str(p), "r") as src:
        meta = pa.ipc.open_file(src).schema.metadata or {}
    rt = json.loads(meta.get(b"clipda.runtime", b"{}"))
    rank = int(p.stem.split("-")[1]) % world  # `--shard i/n`: shards k with k % n == i
    what = f"{rt.get('device', '?')} {rt.get('gpu') or rt.get('cpu_capability', '')}".strip()
    print(f"{p.name}: rank {rank}, {what}, precision {rt.get('precision')}, "
          f"deterministic {rt.get('deterministic')}, threads {rt.get('threads')}")
    seen.setdefault(rank, set()).add(what)
manifest = json.loads((out / "manifest.json").read_text())
print("manifest runtime:", json.dumps(manifest.get("runtime"), indent=1))
print("KEY:", "; ".join(f"rank {r}: {', '.join(sorted(v))}" for r, v in sorted(seen.items()))
      + f"; {manifest.get('rows')} rows")
EOF
)

SCALE_KEY_PY=$(cat <<'EOF'
import json, sys
from pathlib import Path
record, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
secs = {k: next(iter(v.values()))["seconds"] for k, v in record["stages"].items()}
for k, v in secs.items():
    print(f"{k:18s}{v:8.1f} s")
try:
    rt = json.loads((out / "emb/vg/manifest.json").read_text())["runtime"][0]
    where = f"{rt['device']} {rt.get('gpu', '')}".strip()
    how = f"{rt.get('precision')}, deterministic {rt.get('deterministic')}"
except (OSError, KeyError, IndexError, ValueError):
    where, how = "?", "?"
slow = max(secs, key=secs.get)
print(f"KEY: {len(secs)} stages {sum(secs.values()):.1f} s on {where} ({how}); "
      f"slowest {slow} {secs[slow]:.1f} s")
EOF
)

FAISS_PY=$(cat <<'EOF'
import sys
import faiss, torch
from pipeline.caption.decode import TokenIndex, load_caption_model
model = load_caption_model(sys.argv[1], sys.argv[2])
index = TokenIndex(model)  # what `clipda caption` builds for this model on this device
name, gpu = type(index.index).__name__, getattr(index, "gpu", None)
has_gpu = hasattr(faiss, "StandardGpuResources")
where = f"faiss GPU {gpu}" if gpu is not None else ("GPU" if "Gpu" in name else "CPU")
print(f"faiss {faiss.__version__}: GPU support {has_gpu}, torch.cuda.is_available() "
      f"{torch.cuda.is_available()}; decoder on {model.token_table.device}; "
      f"decode.TokenIndex for {sys.argv[1]} built {name} on {where} (search space "
      f"{model.search_space})")
print(f"KEY: faiss {name} on {where} (derived: decode.TokenIndex built for the model on "
      f"{model.token_table.device}; faiss GPU support {has_gpu})")
EOF
)

COMPARE_PY=$(cat <<'EOF'
import hashlib, json, sys
from pathlib import Path
import numpy as np
import pyarrow as pa

runs = Path(sys.argv[1])
have = {p.name: p for p in sorted(runs.iterdir()) if p.is_dir()}
print("runs:", ", ".join(have) or "none")

def sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None

def weights(p):
    from safetensors.torch import load_file
    return {k: v.float().numpy() for k, v in load_file(str(p)).items()} if p.exists() else None

def leaves(d, pre=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{pre}{k}.")
        elif isinstance(v, (int, float)):
            yield f"{pre}{k}", float(v)

def metrics(run):
    out = {}
    for name in ("vqa", "caption"):  # a folder of headline rows (pipeline.metrics.layout)
        for f in sorted((run / f"metrics_{name}").glob("*.json")):
            out.update({f"{name}.{f.stem}.{k}": v for k, v in leaves(json.loads(f.read_text()))})
    return out

def embeddings(run):
    out = {}
    for f in sorted(run.glob("emb/*/*.arrow")):
        with pa.memory_map(str(f), "r") as src:
            t = pa.ipc.open_file(src).read_all()
        for col in t.column_names:
            if pa.types.is_fixed_size_list(t.schema.field(col).type):
                c = t.column(col).combine_chunks()
                arr = c.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                out[f"{f.parent.name}/{f.name}:{col}"] = arr.reshape(len(c), -1)
    return out

def maxdiff(a, b):
    """(max |a - b| over common keys of same shape, its key, keys compared)."""
    best, where, n = 0.0, "-", 0
    for k in sorted(set(a) & set(b)):
        x, y = np.asarray(a[k], np.float64), np.asarray(b[k], np.float64)
        if x.shape != y.shape:
            print(f"  {k}: shapes differ {x.shape} vs {y.shape}")
            continue
        n += 1
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        if d > best or where == "-":
            best, where = d, k
    return best, where, n

def seconds(label):
    f = runs / f"{label}.json"
    if not f.exists():
        return None
    stages = json.loads(f.read_text())["stages"]
    return {k: next(iter(v.values()))["seconds"] for k, v in stages.items()}

files = {"ada": "ada/model.safetensors", "vqa": "vqa/model.safetensors"}
for label, run in have.items():
    print(f"{label}: " + ", ".join(f"{k} sha256 {str(sha(run / f))[:16]}" for k, f in files.items()))

pairs = [("gpu1", "gpu2", "repeat"), ("gpu1", "cpu", "gpu-cpu"),
         ("gpu2", "gpu_nodet", "det on-off")]
key = []
for a, b, what in pairs:
    if a not in have or b not in have:
        print(f"{what}: {a} vs {b}: not both present")
        continue
    ra, rb = have[a], have[b]
    same = [k for k, f in files.items() if sha(ra / f) is not None and sha(ra / f) == sha(rb / f)]
    wd = [maxdiff(weights(ra / f) or {}, weights(rb / f) or {}) for f in files.values()]
    md = maxdiff(metrics(ra), metrics(rb))
    ed = maxdiff(embeddings(ra), embeddings(rb))
    print(f"{what} ({a} vs {b}): bitwise-equal weights: {', '.join(same) or 'none'}; "
          + "; ".join(f"{k} weights max|d| {d:.3g} ({w})" for k, (d, w, _) in zip(files, wd))
          + f"; metrics max|d| {md[0]:.4g} ({md[1]}, {md[2]} compared); "
          f"embeddings max|d| {ed[0]:.3g} ({ed[1]}, {ed[2]} columns)")
    bits = "weights bitwise " + ("yes" if len(same) == len(files) else
                                 f"NO (same: {', '.join(same) or 'none'})")
    where = f" ({md[1]})" if md[0] else ""
    key.append(f"{what}: {bits}, metrics max|d| {md[0]:.3g}{where}, emb max|d| {ed[0]:.3g}")

secs = {k: seconds(k) for k in ("gpu1", "gpu2", "cpu", "gpu_nodet")}
secs = {k: v for k, v in secs.items() if v}
if secs:
    stages = list(next(iter(secs.values())))
    print(f"\n{'stage seconds':18s}" + "".join(f"{k:>11s}" for k in secs))
    for s in stages:
        print(f"{s:18s}" + "".join(f"{v.get(s, float('nan')):11.1f}" for v in secs.values()))
    print(f"{'total':18s}" + "".join(f"{sum(v.values()):11.1f}" for v in secs.values()))
if "gpu2" in secs and "gpu_nodet" in secs:
    on, off = sum(secs["gpu2"].values()), sum(secs["gpu_nodet"].values())
    key.append(f"deterministic on {on:.0f} s vs off {off:.0f} s ({100 * (on / off - 1):+.0f}%)")
print("KEY:", "; ".join(key) if key else "nothing to compare")
EOF
)

# --------------------------------------------------------------------------- the steps
py_key() {  # run a python helper (code, args...) under the deadline; its KEY: line is the key
  local tmp=$WORK/.py.out
  limited "$PY" -c "$@" | tee "$tmp"
  local rc=$?
  local line
  line=$(grep '^KEY: ' "$tmp" | tail -n 1)
  [[ -n $line ]] && key "${line#KEY: }"
  return "$rc"
}

s_wheels() {
  echo "installing $WHEELS/*.whl into $WORK/site"
  limited "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl || return
  key "$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) wheels into $WORK/site (PYTHONPATH)"
}

s_probe() {
  local rc=0
  py_key "$PROBE_PY" || rc=$?
  echo "--- pip list | grep -i -E 'nvidia|cuda|faiss'"
  { "$PY" -m pip list 2>/dev/null || pip list 2>/dev/null; } | grep -i -E 'nvidia|cuda|faiss' ||
    echo "(none)"
  echo "--- nvidia-smi"
  if command -v nvidia-smi >/dev/null; then
    limited nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    limited nvidia-smi -L
  else
    echo "nvidia-smi: not present"
  fi
  return "$rc"
}

s_tiny_world() {
  cat >"$TINY/params.yaml" <<'EOF'
# tests/test_pipeline_e2e.py's TINY synth sizes (no CLIP probes); embed in 8-image shards
seed: 0
synth: {vg_images: 40, laion_samples: 80, laion_shard_size: 40, flickr30k_images: 30,
        probe_images: 0, probe_scenes: 0}
embed: {shard_size: 8, num_workers: 1, batch_size: 8}
EOF
  rm -rf "$TINY/world"
  limited "$PY" -m pipeline synth --out "$TINY/world" --params "$TINY/params.yaml" |
    tee "$WORK/.synth.out" || return
  key "$(tail -n 1 "$WORK/.synth.out" | sed -E 's/^synth: //; s/ -> .*//')"
}

s_torchrun_embed() {
  local ngpu
  ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
  echo "GPUs seen by torch: ${ngpu:-?}"
  if ((!CPU)) && ((${ngpu:-0} < 2)); then
    skip "${ngpu:-0} GPU(s): needs 2 (each rank takes cuda:LOCAL_RANK)"
    return 0
  fi
  [[ -d $TINY/world/flickr30k ]] || { echo "no tiny world (step tiny_world failed)"; return 1; }
  ((CPU)) && echo "--cpu: 2 ranks on the CPU"
  rm -rf "$TINY/emb"
  limited "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m pipeline embed --dataset flickr30k --input "$TINY/world/flickr30k" \
    --images "$TINY/world/flickr30k" --clip models/clip_standin --out "$TINY/emb" \
    --params "$TINY/params.yaml" || return
  py_key "$PARTS_PY" "$TINY/emb" 2
}

s_scale() {  # s_scale LABEL cpu|dev [scale.py options...]
  local label=$1 where=$2
  shift 2
  [[ $where == cpu ]] && export CUDA_VISIBLE_DEVICES=""
  echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-(unset)}"
  rm -rf "${RUNS:?}/$label" "$RUNS/$label.json"
  limited "$PY" bench/scale.py --fractions "$FRACTION" --root "$WORK/scale" --keep \
    --out "$RUNS/$label.json" "$@"
  local rc=$? out
  for out in "$WORK"/scale/f*/out; do
    [[ -d $out ]] || continue
    for f in "$out"/*.log; do
      [[ -e $f ]] || continue
      echo "=== ${f##*/} (last 25 lines)"
      tail -n 25 "$f"
    done
    mv "$out" "$RUNS/$label"
  done
  if ((rc == 0)); then
    py_key "$SCALE_KEY_PY" "$RUNS/$label.json" "$RUNS/$label"
    return
  fi
  return "$rc"
}

s_caption() {
  local model="" img=() run
  for run in gpu1 gpu2 gpu_nodet cpu; do
    if [[ -f $RUNS/$run/ada/model.safetensors ]]; then model=$RUNS/$run/ada; break; fi
  done
  [[ -n $model ]] || { echo "no trained ada model (the scale runs failed)"; return 1; }
  local from
  for from in "$TINY/world/flickr30k" "$WORK"/scale/f*/flickr30k; do  # the tiny world's first
    mapfile -t img < <(find "$from" -name '*.jpg' 2>/dev/null | sort | head -n 2)
    ((${#img[@]} == 2)) && break
  done
  ((${#img[@]} == 2)) || { echo "no two images (tiny_world and scale worlds missing)"; return 1; }
  echo "model $model; images ${img[*]}"
  limited "$PY" -m pipeline caption "${img[@]}" --model "$model" --device "$DEV" |
    tee "$WORK/.caption.out" || return
  local n
  n=$(grep -c . "$WORK/.caption.out")
  py_key "$FAISS_PY" "$model" "$DEV" || return
  key "$n captions ($run model), $(<"$KEYFILE")"
}

s_train_caption() {
  local args=(--loss ce --device "$DEV")
  if ((CPU)); then  # a small decoder: the plumbing, not the numbers
    args+=(--captions 2000 --dim 128 --vocab 4000 --token-width 128 --width 128 --layers 1
      --heads 2 --batch 16 --steps 2 --warmup 1 --threads 1)
  else
    args+=(--steps 20 --warmup 3)  # paper scale (6 x 512, vocab 49408), batch 256
  fi
  limited "$PY" bench/train_caption.py "${args[@]}" | tee "$WORK/.tc.out" || return
  local res
  res=$(grep -E '^ *(noada|ada):' "$WORK/.tc.out" |
    sed -E 's|^ *([a-z]+): *([0-9.]+) ms/step.*peak GPU mem ([0-9.]+ GiB).*|\1 \3, \2 ms/step|;
            s|^ *([a-z]+): *([0-9.]+) ms/step.*|\1 \2 ms/step|' | paste -sd ';' -)
  if ((CPU)); then key "${res//;/; } (no GPU memory on the CPU)"
  else key "peak GPU mem: ${res//;/; }"
  fi
}

s_embed_bench() {
  local args=(--device "$DEV")
  if ((CPU)); then
    args+=(--images 24 --size 250x188 --texts 100 --batch-size 8 --text-batch-size 32
      --workers 1 --threads 1)
  else
    args+=(--images 2000 --batch-size 256 --workers 8 --threads 4)
  fi
  limited "$PY" bench/embed.py "${args[@]}" | tee "$WORK/.eb.out" || return
  local res
  res=$(grep -E '^(images|texts): stage' "$WORK/.eb.out" |
    sed -E 's|^([a-z]+): stage ([0-9.]+) ([a-z]+)/s .*bare forward ([0-9.]+) [a-z]+/s .*ratio ([0-9.]+).*|\1 \2 \3/s vs bare \4 (ratio \5)|' |
    paste -sd ';' -)
  key "${res//;/; }"
}

s_compare() { py_key "$COMPARE_PY" "$RUNS"; }

# --------------------------------------------------------------------------- run
echo "gpu_smoke: out $OUT; python $PY; budget ${BUDGET}s; scale fraction $FRACTION$(
  ((CPU)) && echo "; --cpu: every GPU step runs on the CPU")"
if [[ -n $WHEELS ]]; then
  step wheels 120 s_wheels
  [[ -d $WORK/site ]] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step probe 60 s_probe
step tiny_world 60 s_tiny_world
step torchrun_embed 120 s_torchrun_embed
step scale_gpu1 200 s_scale gpu1 dev --set compute.deterministic=on
step caption 90 s_caption
step scale_gpu2 150 s_scale gpu2 dev --set compute.deterministic=on
step train_caption 120 s_train_caption
step embed_bench 150 s_embed_bench
step scale_cpu 200 s_scale cpu cpu
step scale_gpu_nodet 150 s_scale gpu_nodet dev
step compare 60 s_compare

# --------------------------------------------------------------------------- summary
{
  echo
  echo "gpu_smoke summary ($(date '+%F %T'), $((SECONDS - START)) s, $(
    ((CPU)) && echo "--cpu dry run" || echo "GPU run"), out $OUT)"
  printf '%-16s %-8s %8s  %s\n' step status seconds "key result"
  for i in "${!NAMES[@]}"; do
    printf '%-16s %-8s %8s  %s\n' "${NAMES[i]}" "${STATUS[i]}" "${SECS[i]}" "${RESULTS[i]}"
  done
} | tee "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs summary.txt
rm -f "$PIDFILE" "$KEYFILE" "$SKIPFILE"
((KEEP)) || rm -rf "$WORK"
echo "logs: $LOGS; send back $OUT/summary.txt and $OUT/logs.tar.gz"
((INTERRUPTED)) && exit 130
failed=0
for s in "${STATUS[@]}"; do [[ $s == FAILED ]] && failed=$((failed + 1)); done
exit $((failed > 0))
