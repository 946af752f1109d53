//go:build tools

// Package tools pins the krew CLI that tests the plugin's krew manifest.
package tools

import _ "sigs.k8s.io/krew/cmd/krew"
