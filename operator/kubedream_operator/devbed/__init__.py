"""The local test bed: real etcd, kube-apiserver, kube-controller-manager and MinIO built from Go
modules, plus a node agent that stands in for a kubelet (sandbox and tests only).

Used by `kubedream dev up|down|status` (cli) and by the `bed` pytest fixture
(tests/plugins/bed.py). Modules: build (the Go binaries), certs (PKI and kubeconfig), layout
(the bed's folder), components (command lines and health probes), procs (process groups and
pidfiles), bed (start, stop, status), rest (plain-JSON API calls), and the kubelet stand-in:
node_agent (main loop), node (Node and Lease), pod_runner (one pod's processes), pod_status
(what it reports), podspec (env, volumes and mount-path rewriting).
"""
