#!/usr/bin/env bash
# Installs the streaming peers that bench/peers.py compares streamd with, into ./.peers-venv
# (git-ignored; never the project's .venv, whose pins they would break). Idempotent: a stamp
# file records what was installed, and a second run with the same pins does nothing.
#
#   bash bench/peers/setup.sh
#   UFAL_WHISPER_STREAMING_SRC=DIR bash bench/peers/setup.sh   # DIR: ufal/whisper_streaming
#
# What goes in, and why this way:
# - torch==2.13.0 first, from the machine's local CPU wheel: whisperlivekit and silero-vad
#   require torch, and an unpinned torch would pull several GB of CUDA packages. A constraints
#   file keeps every later install on this exact torch.
# - faster-whisper, silero-vad, and whisperlivekit's own requirements, pinned below.
# - whisperlivekit with --no-deps: it also requires torchaudio, which has no 2.13.0 build (any
#   torchaudio would replace torch), and whisperlivekit's LocalAgreement + faster-whisper path
#   never imports it.
# - ufal/whisper_streaming is not on PyPI (the PyPI project `whisper-streaming` is a different,
#   reworked package without OnlineASRProcessor or the VAD controller), so its source is a
#   manual step: a checkout of https://github.com/ufal/whisper_streaming at $UFAL_COMMIT, given
#   as UFAL_WHISPER_STREAMING_SRC (a work tree or a git directory), or cloned when the network
#   allows. It goes to .peers-venv/src/ufal_whisper_streaming, outside the repository.
# - whisper-live (collabora/WhisperLive) with --no-deps too: it requires nvidia-cublas-cu12,
#   nvidia-cudnn-cu12, torchaudio, openvino*, optimum-intel, PyAudio and exact pins
#   (faster-whisper==1.2.0, tokenizers==0.20.3); its server with the faster_whisper backend
#   imports none of those beyond what is installed here.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=.peers-venv
PY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"
UFAL_COMMIT=1f25a1a48bd9807159989e6596178c69e797ac75
UFAL_DIR="$VENV/src/ufal_whisper_streaming"
PEERS=(
    "faster-whisper==1.2.1"
    "silero-vad==6.2.3"
    # whisperlivekit 0.2.26's requirements less torch (pinned above) and torchaudio, at the
    # versions first resolved here; their own dependencies float (see freeze.txt)
    "fastapi==0.165.0" "uvicorn==0.54.0" "websockets==17.4" "huggingface-hub==2.4.0"
    "tiktoken==0.14.0" "python-multipart==0.0.34" "starlette==1.10.0" "tqdm==4.70.1"
    "soundfile==0.14.0" "librosa==0.11.0"
)
WLK_PIN="whisperlivekit==0.2.26"
WL_PIN="whisper-live==0.10.0"
STAMP="$VENV/.installed"
WANT="$(printf '%s\n' "$TORCH_PIN" "${PEERS[@]}" "$WLK_PIN" "$WL_PIN" "$UFAL_COMMIT" | sha256sum | cut -c1-16)"

pip_install() {
    "$PY" -m pip install -q --disable-pip-version-check -c "$VENV/constraints.txt" "$@" 2>&1 |
        grep -v "is ignored" || true
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "peers: $VENV is up to date ($(cat "$STAMP"))"
else
    if [[ ! -x "$PY" ]]; then
        echo "peers: creating $VENV"
        python3 -m venv "$VENV"
    fi
    echo "$TORCH_PIN" >"$VENV/constraints.txt"
    echo "peers: installing $TORCH_PIN (CPU wheel)"
    pip_install "$TORCH_PIN"
    echo "peers: installing ${PEERS[*]}"
    pip_install "${PEERS[@]}"
    echo "peers: installing $WLK_PIN $WL_PIN --no-deps"
    pip_install --no-deps "$WLK_PIN" "$WL_PIN"
    "$PY" -c "import torch, faster_whisper, silero_vad, whisperlivekit, librosa, fastapi, uvicorn"
    "$PY" -c "import whisper_live.server, whisper_live.backend.faster_whisper_backend"
    if "$PY" -m pip show -q torchaudio >/dev/null 2>&1 ||
        "$PY" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
        echo "peers: torchaudio or nvidia-* packages got into $VENV; remove it and retry" >&2
        exit 1
    fi
    "$PY" -m pip freeze >"$VENV/freeze.txt"
    echo "$WANT" >"$STAMP"
    echo "peers: installed; versions in $VENV/freeze.txt"
fi

# ufal/whisper_streaming: a manual step (see above)
if [[ -f "$UFAL_DIR/whisper_online.py" && "$(cat "$UFAL_DIR/.commit" 2>/dev/null)" == "$UFAL_COMMIT" ]]; then
    echo "peers: ufal/whisper_streaming $UFAL_COMMIT is in $UFAL_DIR"
else
    rm -rf "$UFAL_DIR" && mkdir -p "$UFAL_DIR"
    src="${UFAL_WHISPER_STREAMING_SRC:-}"
    if [[ -n "$src" && -d "$src" ]] && git --git-dir="$src" cat-file -e "$UFAL_COMMIT" 2>/dev/null; then
        git --git-dir="$src" archive "$UFAL_COMMIT" | tar -x -C "$UFAL_DIR"
    elif [[ -n "$src" && -d "$src/.git" ]] && git -C "$src" cat-file -e "$UFAL_COMMIT" 2>/dev/null; then
        git -C "$src" archive "$UFAL_COMMIT" | tar -x -C "$UFAL_DIR"
    elif [[ -n "$src" && -f "$src/whisper_online.py" ]]; then
        echo "peers: warning: $src is not a git checkout; using it as is (want $UFAL_COMMIT)" >&2
        cp -r "$src"/. "$UFAL_DIR"/
    elif GIT_TERMINAL_PROMPT=0 timeout 60 git clone -q https://github.com/ufal/whisper_streaming "$UFAL_DIR.clone" 2>/dev/null; then
        git -C "$UFAL_DIR.clone" archive "$UFAL_COMMIT" | tar -x -C "$UFAL_DIR"
        rm -rf "$UFAL_DIR.clone"
    else
        rm -rf "$UFAL_DIR" "$UFAL_DIR.clone"
        echo "peers: ufal/whisper_streaming is not on PyPI and could not be cloned. Manual step:" >&2
        echo "  git clone https://github.com/ufal/whisper_streaming /some/dir" >&2
        echo "  UFAL_WHISPER_STREAMING_SRC=/some/dir bash bench/peers/setup.sh" >&2
        echo "(whisperlivekit is installed; only the whisper_streaming peer is missing)" >&2
        exit 3
    fi
    echo "$UFAL_COMMIT" >"$UFAL_DIR/.commit"
    echo "peers: ufal/whisper_streaming $UFAL_COMMIT -> $UFAL_DIR"
fi
