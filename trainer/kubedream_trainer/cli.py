"""The `kubedream` command line. Each subcommand imports its implementation lazily, so
`kubedream validate` or `kubedream operator` never pays for importing torch.

Subcommands register here with their arguments; their code lives next to what they drive:
validate (spec), dataset inspect (data), train (loop), render/crd/operator (operator),
dev (the local test bed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """Resolve "package.module:function" only when the subcommand runs."""

    def run(args: argparse.Namespace) -> int:
        module_name, func_name = target.split(":")
        func: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module_name), func_name
        )
        return func(args)

    return run


def _validate(args: argparse.Namespace) -> int:
    from kubedream_operator.spec import SpecError, load_job

    status = 0
    for path in args.jobs:
        try:
            job = load_job(path)
        except SpecError as exc:
            print(exc.report(path), file=sys.stderr)
            status = 1
        else:
            print(f"{path}: FineTuneJob {job.name!r} is valid")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubedream", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check FineTuneJob manifests; exit 1 on any problem")
    p.add_argument("jobs", nargs="+", metavar="JOB.yaml")
    p.set_defaults(func=_validate)

    p = sub.add_parser(
        "train", help="run a FineTuneJob's training (locally or inside a trainer pod)"
    )
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    # torchrun's topology flags: more than one process in all launches them (distributed.launch)
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes on this node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (pods) in the group")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index, 0-based")
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address")
    p.add_argument("--master-port", type=int, default=29500, help="node 0's rendezvous port")
    p.set_defaults(func=_lazy("kubedream_trainer.train_cli:run"))

    dataset = sub.add_parser("dataset", help="data root tools").add_subparsers(
        dest="dataset_command", required=True
    )
    p = dataset.add_parser(
        "inspect", help="show what an epoch will contain, before any GPU is spent"
    )
    p.add_argument("roots", nargs="+", metavar="ROOT", help="local folder or s3://bucket/prefix")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3, help="epochs to draw (default 3)")
    p.add_argument("--seed", type=int, default=555)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=_lazy("kubedream_trainer.data.inspect:run"))

    p = sub.add_parser(
        "render", help="print the Kubernetes objects the operator creates for a FineTuneJob"
    )
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument(
        "--image", default=None, help="default trainer image (as the operator's --trainer-image)"
    )
    p.set_defaults(func=_lazy("kubedream_operator.render_cli:run"))

    p = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    p.set_defaults(func=_lazy("kubedream_operator.crd:run"))

    p = sub.add_parser("operator", help="run the FineTuneJob operator (kopf)")
    p.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)"
    )
    p.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument(
        "--trainer-image", default=None, help="default trainer image for jobs that name none"
    )
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--health-port", type=int, default=8081)
    p.add_argument("--peering", default=None, help="kopf peering name (for several replicas)")
    p.set_defaults(func=_lazy("kubedream_operator.main:run"))

    dev = sub.add_parser(
        "dev", help="the local test bed: etcd, kube-apiserver, controller-manager, MinIO"
    )
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    for name, text in (
        ("up", "start the bed"),
        ("down", "stop the bed"),
        ("status", "say what runs"),
    ):
        p = dev_sub.add_parser(name, help=text)
        p.add_argument(
            "--dir", default=None, help="state folder (default ~/.local/state/kubedream/dev)"
        )
        p.set_defaults(func=_lazy(f"kubedream_operator.devbed.cli:{name}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
