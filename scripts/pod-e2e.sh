#!/usr/bin/env bash
# Runs one Kubernetes manifest with a pod engine, as the kubelet would, and checks real traffic
# through it: tests/it/pods.rs with POD_E2E_MANIFEST set (see that file for what it checks and
# what it changes in the manifest).
#
#   scripts/pod-e2e.sh POD.yaml
#
# POD.yaml: a Pod, or a workload with a pod template (Deployment, ...), as Istio's sidecar
# injector renders it (`istioctl kube-inject -f app.yaml`, or `kubectl get pod NAME -o yaml`),
# with an `istio-init` or `istio-validation` init container. Its images are swapped for locally
# built ones (nothing is pulled); the init container's args, env and securityContext are kept.
# Needs root, iproute2, iptables, buildah, podman and runc. Prints one `pods:` line per run
# (connections checked, time); a mismatch fails with the connection, where it should have landed
# and where it did.
set -euo pipefail
[ $# -eq 1 ] && [ -f "$1" ] || { echo "usage: scripts/pod-e2e.sh POD.yaml" >&2; exit 2; }
manifest=$(realpath "$1")
cd "$(dirname "$0")/.."
POD_E2E_MANIFEST=$manifest exec cargo test --locked --test it pods:: -- --nocapture
