//go:build tools

// Package tools pins the kubelet and kube-scheduler that run the local
// environment's nodes (the chart's pods), at the same Kubernetes version as
// e2e/tools/k8s. A module of its own so that adding them did not move any
// version the control plane is built from.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
