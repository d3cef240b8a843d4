// Command controlplane runs one upstream Kubernetes component per process:
//
//	controlplane etcd ...
//	controlplane kube-apiserver ...
//	controlplane kube-controller-manager ...
//	controlplane version
//
// It is a busybox: the components are linked from the upstream Go modules at
// the versions pinned in go.mod, so the tests run against the real thing on a
// machine where release binaries cannot be downloaded. Only the selected
// component is constructed: the API server and the controller manager keep
// process-wide singletons (signal handlers, feature gates) that must not meet.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/component-base/version"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

const usage = "usage: controlplane etcd|kube-apiserver|kube-controller-manager|version [flags]"

func main() {
	applet := filepath.Base(os.Args[0])
	rest := os.Args[1:]
	if !known(applet) {
		if len(rest) == 0 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		applet, rest = rest[0], rest[1:]
	}
	switch applet {
	case "etcd":
		// etcdmain parses args[1:] with its own FlagSet.
		etcdmain.Main(append([]string{"etcd"}, rest...))
	case "kube-apiserver":
		cmd := apiserverapp.NewAPIServerCommand()
		cmd.SetArgs(rest) // otherwise cobra reads os.Args and sees the applet name
		os.Exit(cli.Run(cmd))
	case "kube-controller-manager":
		cmd := kcmapp.NewControllerManagerCommand()
		cmd.SetArgs(rest)
		os.Exit(cli.Run(cmd))
	case "version":
		fmt.Println(version.Get().GitVersion)
	default:
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
}

func known(name string) bool {
	switch name {
	case "etcd", "kube-apiserver", "kube-controller-manager", "version":
		return true
	}
	return false
}
