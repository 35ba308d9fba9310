#!/usr/bin/env bash
# Carrying wheels to the GPU machine ("device").
#
# The lent GPU machine has Python 3.12 with torch 2.11.0, transformers 5.17.0, accelerate 1.15.0,
# huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0, numpy 2.5.2, triton 3.6.0, peft,
# pyarrow, pandas, pytest, ... (the list is DEVICE_PACKAGES below, copied from the device library's
# KINDS.md, "Python packages already there"), but no dagster, pydantic, trl, datasets, liger-kernel
# or deepspeed, and it reaches no package registry. This script fills .whl/ (git-ignored) here with
# exactly the wheels it lacks, one version of each:
#   - tunegraph's core dependencies (pyproject.toml [project].dependencies) without
#     dagster-webserver, dagster-graphql and dagster-dg-cli: `materialize`, the Dagster definitions
#     and training never import them (the UI, `tunegraph dev`, needs them; it is not run there);
#   - trl and datasets (core dependencies), liger-kernel (benchmark peer), deepspeed;
#   - everything those need that the device does not have.
# deepspeed is only on PyPI as an sdist: it is built here into a pure py3-none-any wheel with
# DS_BUILD_OPS=0 (no compiled ops; the device JIT-compiles them with its nvcc and ninja) and
# DS_ACCELERATOR=cuda (so its metadata says CUDA and lists the CUDA ops), using .venv's python.
#
# How it chooses: pip's resolver runs for CPython 3.12 on manylinux x86_64 (a Python 3.12 from
# pyenv when there is one, else with --python-version 3.12) against a fake site that holds the
# device's packages of known version as empty, dependency-less dists, and with those versions as
# constraints: so torch, transformers, numpy ... resolve to the device's own versions and are never
# downloaded. Of what pip would install, only the packages missing from DEVICE_PACKAGES are
# downloaded (--no-deps, the exact files the resolver chose). A check then reads every carried
# wheel's Requires-Dist (markers for Python 3.12 on Linux x86_64, extras only where asked for)
# and fails unless each is met by another carried wheel or by a device package; it drops wheels
# that nothing needs on 3.12, lists the device packages of unknown version that the wheels
# constrain, and says where the device's known versions fall outside pyproject.toml's ranges.
#
# Run here (needs PyPI and .venv from scripts/setup.sh; a few minutes, most of it building
# deepspeed):
#   nice -n 10 bash scripts/device_wheels.sh
# It ends with the wheel list and sizes; .whl/ must stay well under ~45 MiB, since everything that
# travels to the device (tracked files + untracked-not-ignored + carried paths) is capped at 64 MiB.
#
# On the device: name `.whl` in the run's `carry`, and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
# then e.g. `python3 -m tunegraph.cli materialize examples/quickstart.yaml`, `torchrun ...`.
# PYTHONPATH puts the carried packages first; $PWD makes `tunegraph` importable without installing
# it. Check the device's real versions once (it costs no extra call, it is quick) with
#   bash scripts/device_wheels.sh --check-installed
# after the install line: it checks every carried wheel's requirements and pyproject.toml's ranges
# against what is importable there, and prints the versions of the device packages that the
# wheels constrain; it exits 1 on a mismatch.
#
# Options (environment): DEEPSPEED_VERSION, LIGER_KERNEL_VERSION, EXTRA_PINS ("name==version ..."
# as extra constraints, e.g. EXTRA_PINS="datasets==5.0.1" if the device's pyarrow is older than
# 24, which datasets 5.1+ needs), MAX_WHL_MIB (default 45),
# PY312 (a Python 3.12 for the resolver), VENV_PY (default .venv/bin/python), DEEPSPEED_WHEEL
# (a deepspeed wheel this script built before, e.g. a copy of the one in .whl/: skips the build).
set -euo pipefail
cd "$(dirname "$0")/.."

DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}      # newest on PyPI; needs torch>=2.0
LIGER_KERNEL_VERSION=${LIGER_KERNEL_VERSION:-0.8.5} # newest; needs torch>=2.1.2, triton>=2.3.1
MAX_WHL_MIB=${MAX_WHL_MIB:-45}
VENV_PY=${VENV_PY:-.venv/bin/python}
WHL=.whl

tmp=$(mktemp -d "${TMPDIR:-/tmp}/device-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------------------------------------
# The helper: device package list, requirement lists, selection from pip's report, checks.
# ---------------------------------------------------------------------------------------------
cat > "$tmp/dw.py" <<'PY'
"""device_wheels helper: python3 dw.py COMMAND ... (see scripts/device_wheels.sh)."""
from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from pathlib import Path

# From /work/.library/device/KINDS.md, "Python packages already there" (image 'cuda', read
# 2026-11-17): every name; and the "pip list" row's versions (2026-11) where it gives one.
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split()
DEVICE_VERSIONS = {
    "accelerate": "1.15.0", "botorch": "0.18.1", "cupy-cuda13x": "14.2.0", "gpytorch": "1.15.2",
    "huggingface-hub": "1.33.0", "jax": "0.11.2", "jax-cuda13-pjrt": "0.11.2",
    "jax-cuda13-plugin": "0.11.2", "jaxlib": "0.11.2", "jaxtyping": "0.3.11", "numpy": "2.5.2",
    "numpyro": "0.21.0", "onnx": "1.23.1", "onnx-ir": "1.0.0", "onnxruntime": "1.30.0",
    "onnxscript": "0.7.2", "pytorch-lightning": "2.6.6", "safetensors": "0.8.0",
    "sentence-transformers": "6.0.1", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torch-geometric": "2.8.0.post1",
    "torchaudio": "2.11.0", "torchdiffeq": "0.2.5", "torchmetrics": "1.9.0",
    "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
}
# pyproject dependencies that nothing run on the device imports (the Dagster UI and `dg`).
DROP = {"dagster-webserver", "dagster-graphql", "dagster-dg-cli"}
# Pins for carried packages, so that they ask less of the device's packages of unknown version.
# grpcio-health-checking (dagster needs it; only Dagster's gRPC code server imports it, never
# `materialize`): the newest wants grpcio>=1.85.1 and protobuf>=7.35.1; 1.62.3 wants
# grpcio>=1.62.3 and protobuf>=4.21.6, and its protobuf 4.25 gencode (that of dagster's own
# protos) has no runtime version check (it imports with protobuf 6.33 and grpcio 1.85 here).
PINS = {"grpcio-health-checking": "1.62.3"}
# On the device too, but carried anyway (they shadow the device's copy): small, pure Python,
# backward compatible, and the carried wheels need a recent one (pydantic 2.14 and pydantic-core
# need typing-extensions>=4.16.0, the newest release; the device's version is not known).
ALWAYS_CARRY = {"typing-extensions"}
# Marker environment of the device's python3 (3.12.3, Linux x86_64).
MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython",
    "platform_release": "", "platform_system": "Linux", "platform_version": "",
    "python_full_version": "3.12.3", "python_version": "3.12", "sys_platform": "linux",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


DEVICE = {norm(n) for n in DEVICE_PACKAGES}
DEVICE_V = {norm(k): v for k, v in DEVICE_VERSIONS.items()}


def pyproject_deps(path="pyproject.toml"):
    import tomllib
    from packaging.requirements import Requirement
    with open(path, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [Requirement(d) for d in deps]


def cmd_fake(site):
    """Empty dists of the device's known versions, so pip counts them as installed."""
    for name, ver in DEVICE_VERSIONS.items():
        d = Path(site) / f"{name.replace('-', '_')}-{ver}.dist-info"
        d.mkdir(parents=True, exist_ok=True)
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        (d / "INSTALLER").write_text("device_wheels\n")


def cmd_inputs(req_out, cons_out, *extra):
    """requirements.txt: pyproject's core deps less DROP, plus extra; constraints: device pins."""
    reqs = [str(r) for r in pyproject_deps() if norm(r.name) not in DROP]
    Path(req_out).write_text("\n".join(reqs + list(extra)) + "\n")
    pins = {**DEVICE_VERSIONS, **PINS}
    pins.update(p.split("==", 1) for p in os.environ.get("EXTRA_PINS", "").split())
    Path(cons_out).write_text("\n".join(f"{k}=={v}" for k, v in pins.items()) + "\n")


def cmd_select(report, out):
    """From pip's --report: the packages the device lacks, as 'name==version url' lines."""
    items = json.load(open(report))["install"]
    lines, assumed = [], []
    for it in items:
        m = it["metadata"]
        n, v, url = norm(m["name"]), m["version"], it["download_info"]["url"]
        if n in DEVICE and n not in ALWAYS_CARRY:
            if n in DEVICE_V and DEVICE_V[n] != v:
                sys.exit(f"resolver wants {n}=={v} but the device has {DEVICE_V[n]}")
            assumed.append(f"{n} {v}")
        else:
            lines.append(f"{n}=={v} {url}")
    Path(out).write_text("".join(line + "\n" for line in sorted(lines)))
    if assumed:
        print("on the device already, version there unknown (the resolver would have taken): "
              + ", ".join(sorted(assumed)))


def read_wheels(whl_dir):
    """{normalized name: (version, [Requires-Dist], file)} of the wheels in whl_dir."""
    from email.parser import Parser
    out = {}
    for f in sorted(Path(whl_dir).glob("*.whl")):
        with zipfile.ZipFile(f) as z:
            meta = [p for p in z.namelist()
                    if p.endswith(".dist-info/METADATA") and p.count("/") == 1]
            msg = Parser().parsestr(z.read(meta[0]).decode())
        n = norm(msg["Name"])
        if n in out:
            sys.exit(f"two wheels of {n}: {out[n][2].name} and {f.name} (keep one)")
        out[n] = (msg["Version"], msg.get_all("Requires-Dist") or [], f)
    return out


def applies(req, extras):
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**MARKER_ENV, "extra": e}) for e in (extras or {""}))


def cmd_check(whl_dir, *flags):
    """Every carried wheel's requirements met by the carried wheels or the device's packages.

    --roots FILE: prune wheels not reachable from those requirements (Python 3.12 markers).
    --installed: compare with what is importable here (run on the device after the install).
    """
    from packaging.requirements import Requirement
    from packaging.version import Version
    installed = "--installed" in flags
    wheels = read_wheels(whl_dir)
    if installed:
        import importlib.metadata as md

        def have(n):
            try:
                return md.version(n)
            except md.PackageNotFoundError:
                return None

    def version_of(n):
        """(version or None, where) for a requirement's name."""
        if installed:
            v = have(n)
            return v, ("carried" if n in wheels else "device") if v else "MISSING"
        if n in wheels:
            return wheels[n][0], "carried"
        if n in DEVICE_V:
            return DEVICE_V[n], "device"
        if n in DEVICE:
            return None, "device, version unknown"
        return None, "MISSING"

    bad, unknown = [], {}
    # Walk from the roots (or from every wheel) with the device's markers.
    if "--roots" in flags:
        roots = [Requirement(r) for r in
                 Path(flags[flags.index("--roots") + 1]).read_text().split("\n") if r.strip()]
    else:
        roots = [Requirement(n) for n in wheels]
    reached, todo = {}, [(r, "root") for r in roots if applies(r, {""})]
    while todo:
        req, who = todo.pop()
        n = norm(req.name)
        v, where = version_of(n)
        if where == "MISSING":
            bad.append(f"{who} needs {req}: " + ("not installed here" if installed else
                                                 "neither carried nor on the device"))
            continue
        if v is not None and not req.specifier.contains(Version(v), prereleases=True):
            bad.append(f"{who} needs {req}: {where} has {v}")
        if (v is None or (installed and n not in wheels)) and str(req.specifier):
            unknown.setdefault(n, set()).add(f"{req.specifier} ({who})")
        if n not in wheels:
            continue
        extras = set(req.extras)
        if n in reached and extras <= reached[n]:
            continue
        reached[n] = reached.get(n, set()) | extras
        for rd in wheels[n][1]:
            r = Requirement(rd)
            if applies(r, extras | {""}):   # extra == "" matches no `extra == ...` marker
                todo.append((r, f"{n} {wheels[n][0]}"))
    unused = sorted(set(wheels) - set(reached))
    if installed:
        for n in sorted(set(wheels)):
            v = have(n)
            if v != wheels[n][0]:
                bad.append(f"{n}: carried {wheels[n][0]} but {v} is the one imported")
    elif unused and "--roots" in flags:
        for n in unused:
            print(f"dropping {wheels[n][2].name}: nothing needs it on Python 3.12")
            wheels[n][2].unlink()
    # pyproject's ranges against the device's versions (tunegraph itself is not installed there).
    print("pyproject.toml core dependencies on the device:")
    for r in pyproject_deps():
        n = norm(r.name)
        if n in DROP:
            continue
        v, where = version_of(n)
        ok = "ok" if v is None or r.specifier.contains(Version(v), prereleases=True) else "OUTSIDE"
        if v is not None and ok == "OUTSIDE":
            bad.append(f"pyproject needs {r}: {where} has {v}")
        if where == "MISSING":
            ok = "MISSING"
            bad.append(f"pyproject needs {r}: " + ("not installed here" if installed else
                                                   "neither carried nor on the device"))
        print(f"  {r.name:18} {str(r.specifier):14} {where:26} {v or '?':14} "
              f"{ok if v or ok == 'MISSING' else 'check there'}")
    if unknown:
        if installed:
            print("device packages that the carried wheels constrain, as installed here:")
        else:
            print("device packages of unknown version that the carried wheels constrain "
                  "(--check-installed on the device checks them):")
        for n in sorted(unknown):
            print(f"  {n:22} {(have(n) or '-') + '  ' if installed else ''}"
                  + "; ".join(sorted(unknown[n])))
    bad = list(dict.fromkeys(bad))
    for b in bad:
        print("FAIL:", b)
    if not bad:
        print(f"OK: {len(wheels) - (0 if installed else len(unused))} wheels; every requirement "
              "is carried or on the device" + (" (versions as installed here)" if installed else ""))
    sys.exit(1 if bad else 0)


def cmd_sizes(whl_dir, max_mib):
    """The wheels' sizes, and what travels: tracked + untracked-not-ignored files + whl_dir."""
    import subprocess
    files = sorted(Path(whl_dir).glob("*.whl"))
    for f in files:
        print(f"  {f.stat().st_size / 1024:9.1f} KiB  {f.name}")
    whl = sum(f.stat().st_size for f in files)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum(os.path.getsize(p) for p in listed if p and os.path.isfile(p))
    mib = 1 << 20
    print(f"{whl_dir}: {len(files)} wheels, {whl / mib:.1f} MiB; tracked + untracked-not-ignored "
          f"files: {tree / mib:.1f} MiB; together {(whl + tree) / mib:.1f} MiB of the 64 MiB that "
          "may travel")
    if whl > float(max_mib) * mib:
        sys.exit(f"{whl_dir} is over {max_mib} MiB")


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
PY

if [ "${1:-}" = "--check-installed" ]; then   # on the device, after the install line
  python3 "$tmp/dw.py" check "$WHL" --installed
  exit
fi

[ -x "$VENV_PY" ] || { echo "device_wheels.sh: $VENV_PY missing: run scripts/setup.sh first" >&2; exit 1; }

# A Python 3.12 for the resolver, so that environment markers are the device's (pip evaluates
# them with the interpreter it runs on, whatever --python-version says).
PY312=${PY312:-}
if [ -z "$PY312" ]; then
  for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$c; break
    fi
  done
fi
if [ -z "$PY312" ]; then
  echo "device_wheels.sh: no Python 3.12 here; resolving with $VENV_PY (the check prunes extras)" >&2
  PY312=$VENV_PY
fi

# pip (the project venv's, which is recent) in an empty venv: nothing installed but the fake site.
"$PY312" -m venv --without-pip "$tmp/env"
pipdir=$("$VENV_PY" -c 'import os, pip; print(os.path.dirname(pip.__file__))')
mkdir -p "$tmp/pipmod" "$tmp/fake"
cp -r "$pipdir" "$tmp/pipmod/"
"$VENV_PY" "$tmp/dw.py" fake "$tmp/fake"
pip_() { PYTHONPATH="$tmp/pipmod:$tmp/fake" nice -n 10 "$tmp/env/bin/python" -m pip "$@"; }
# run WHAT CMD...: CMD's output goes to a log, shown (less pip's notes on this machine's local
# indexes) only when CMD fails.
run() {
  local what=$1; shift
  if ! "$@" > "$tmp/log" 2>&1; then
    grep -v "is ignored: it is neither" "$tmp/log" >&2
    echo "device_wheels.sh: $what failed" >&2
    exit 1
  fi
}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312)
for t in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLAT+=(--platform "${t}_x86_64")
done

# 1. deepspeed: a pure wheel from the sdist, no ops compiled.
mkdir -p "$tmp/ds"
if [ -n "${DEEPSPEED_WHEEL:-}" ]; then   # one built earlier by this script
  cp "$DEEPSPEED_WHEEL" "$tmp/ds/"
else
  echo "== building deepspeed $DEEPSPEED_VERSION (pure wheel, DS_BUILD_OPS=0)"
  DS_BUILD_OPS=0 DS_ACCELERATOR=cuda run "building deepspeed" nice -n 10 "$VENV_PY" -m pip wheel \
    --no-cache-dir --no-deps --no-build-isolation -w "$tmp/ds" "deepspeed==$DEEPSPEED_VERSION"
fi
ds_whl=$(ls "$tmp"/ds/deepspeed-*-py3-none-any.whl 2>/dev/null || true)
[ -n "$ds_whl" ] || { echo "device_wheels.sh: no py3-none-any deepspeed wheel was built" >&2; exit 1; }
if ! "$VENV_PY" -c 'import sys, zipfile
sys.exit(any(n.endswith((".so", ".pyd")) for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$ds_whl"; then
  echo "device_wheels.sh: the deepspeed wheel holds compiled files" >&2; exit 1
fi

# 2. Resolve for the device.
echo "== resolving for CPython 3.12, manylinux x86_64, against the device's packages"
"$VENV_PY" "$tmp/dw.py" inputs "$tmp/req.txt" "$tmp/cons.txt" \
  "liger-kernel==$LIGER_KERNEL_VERSION" "deepspeed @ file://$ds_whl"
run "resolving" pip_ install --dry-run --report "$tmp/report.json" "${PLAT[@]}" \
  -c "$tmp/cons.txt" -r "$tmp/req.txt"
"$VENV_PY" "$tmp/dw.py" select "$tmp/report.json" "$tmp/selected.txt"

# 3. Download exactly the chosen files, fresh (one version of each).
echo "== downloading $(wc -l < "$tmp/selected.txt") wheels into $WHL/"
mkdir -p "$WHL"
rm -f "$WHL"/*.whl
dl=()
while read -r nv url; do
  case "$url" in
    "file://$ds_whl") cp "$ds_whl" "$WHL/" ;;
    file://*) cp "${url#file://}" "$WHL/" ;;
    *) dl+=("${nv%%==*} @ $url") ;;
  esac
done < "$tmp/selected.txt"
[ ${#dl[@]} -eq 0 ] || run "downloading" pip_ download --no-deps "${PLAT[@]}" -d "$WHL" "${dl[@]}"
if ls "$WHL"/*.tar.gz "$WHL"/*.zip >/dev/null 2>&1; then
  echo "device_wheels.sh: a source archive was downloaded" >&2; exit 1
fi

# 4. Check: every requirement met on the device, nothing unused, one version of each.
echo "== checking Requires-Dist of every carried wheel (Python 3.12, Linux x86_64)"
"$VENV_PY" "$tmp/dw.py" check "$WHL" --roots "$tmp/req.txt"

# 5. Sizes.
echo "== $WHL/"
"$VENV_PY" "$tmp/dw.py" sizes "$WHL" "$MAX_WHL_MIB"
cat <<'EOF'
On the device (carry: [".whl"]), start the command with:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; bash scripts/device_wheels.sh --check-installed;
EOF
