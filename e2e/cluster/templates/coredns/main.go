// Command coredns is CoreDNS with only the plugins a test cluster's DNS needs: the
// `kubernetes` plugin answering cluster.local from the API, and errors, log, health, ready,
// cache, loadbalance and bind. The full build links every plugin (about 3x the size and
// build time).
package main

import (
	"fmt"
	"os"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	// Upstream's order (core/dnsserver/zdirectives.go), restricted to the plugins above.
	if err := dnsserver.SetDirectives([]string{
		"bind", "ready", "health", "errors", "log", "loadbalance", "cache", "kubernetes",
	}); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	coremain.Run()
}
