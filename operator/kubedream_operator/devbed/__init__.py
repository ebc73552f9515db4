"""The local test bed: real etcd, kube-apiserver, kube-controller-manager and MinIO built from Go
modules, plus a node agent that stands in for a kubelet (sandbox and tests only).

Used by `kubedream dev up|down|status` (cli) and by the `bed` pytest fixture
(tests/plugins/bed.py). Modules: build (binaries), certs (PKI and kubeconfig), procs (process
groups and pidfiles), bed (start, stop, health), node_agent and pod_runner (the kubelet
stand-in), podspec (env and volume resolution).
"""
