//go:build tools

// Package tools pins the upstream Kubernetes control-plane binaries that the
// yukumo tests and `make up` run. Nothing here is yukumo code: this module
// exists only so `go build` can produce kube-apiserver,
// kube-controller-manager and etcd at the versions in go.mod.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
