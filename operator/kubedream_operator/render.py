"""Render a FineTuneJob into the Kubernetes objects that run it. Pure functions, no API calls.

Called by the operator's handlers (which apply the objects) and by `kubedream render` (which
prints them). For a job named N in namespace S:

- ConfigMap `N-spec` with `job.yaml`: the whole FineTuneJob, defaults filled in. The trainer
  reads it from /etc/kubedream/job.yaml (`kubedream train /etc/kubedream/job.yaml`).
- Service `N` (only when the job runs more than one pod): headless, so that pod 0 of the
  Indexed Job is reachable as `N-0.N.S.svc`, the torch.distributed rendezvous address.
- Job `N`: Indexed, one pod per node, `restartPolicy: Never`, a podFailurePolicy that ignores
  disruptions and pods stopped with their group (exit 76), and fails the Job at once on the
  trainer's permanent exit codes (see `contract`), and pods without
  Kubernetes API access (progress flows through storage, not the API).

Every object carries the kubedream labels and a controller owner reference to the
FineTuneJob, so deleting the FineTuneJob garbage-collects them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import yaml
from pydantic import ValidationError

from . import contract
from .spec import (
    API_VERSION,
    KIND,
    FineTuneJob,
    FineTuneJobSpec,
    ResourcesSpec,
    SpecError,
    StorageSpec,
    to_manifest,
)
from .spec.load import problems_from


def _default_image() -> str:
    try:
        tag = version("kubedream")
    except PackageNotFoundError:
        tag = "latest"
    return f"ghcr.io/kubedream/trainer:{tag}"


DEFAULT_TRAINER_IMAGE = _default_image()
UID_PLACEHOLDER = "00000000-0000-0000-0000-000000000000"
"""Owner uid in `kubedream render` output, where no API server has assigned one."""


@dataclass(frozen=True)
class OperatorDefaults:
    """Settings of the operator (not of one job) that shape the trainer pods."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """Image for jobs whose spec.resources.image is absent (`kubedream operator --trainer-image`)."""
    service_account: str = "default"
    """ServiceAccount of the trainer pods; its token is never mounted."""
    termination_grace_seconds: int = 600
    """Time a stopping pod (suspend, preemption) gets to write its final checkpoint."""
    run_as_user: int = 1000
    """Non-root uid of the trainer process (the trainer image's user)."""
    storage: StorageSpec = field(default_factory=StorageSpec)
    """S3 settings for jobs whose `spec.storage` leaves them unset (only the fields set here count)."""


def with_storage_defaults(spec: FineTuneJobSpec, defaults: OperatorDefaults) -> FineTuneJobSpec:
    """The spec with the operator's S3 defaults filled into the `spec.storage` fields it leaves unset.

    A field the job sets, even to its default value (`addressingStyle: auto`), is kept. The
    handlers apply this before rendering, so the trainer's job.yaml, its environment and the
    operator's progress reads all see the same storage settings.
    """
    given = spec.storage.model_fields_set
    fill = {
        name: getattr(defaults.storage, name)
        for name in defaults.storage.model_fields_set
        if name not in given
    }
    if not fill:
        return spec
    return spec.model_copy(update={"storage": spec.storage.model_copy(update=fill)})


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob the rendered objects belong to."""

    name: str
    namespace: str
    uid: str = UID_PLACEHOLDER


def labels(name: str, component: str) -> dict[str, str]:
    """Labels of every object (and pod) of the job named `name`."""
    return {
        contract.LABEL_NAME: contract.APP_NAME,
        contract.LABEL_COMPONENT: component,
        contract.LABEL_MANAGED_BY: contract.FIELD_MANAGER,
        contract.LABEL_JOB: name,
    }


def selector(name: str) -> str:
    """Label selector of the job's pods (and its other children)."""
    return f"{contract.LABEL_JOB}={name}"


def _metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner.name, component),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def is_distributed(spec: FineTuneJobSpec) -> bool:
    """Whether the job runs more than one training process (torchrun instead of a plain process)."""
    return spec.resources.nodes > 1 or spec.resources.gpus_per_node > 1


def needs_service(spec: FineTuneJobSpec) -> bool:
    """Only a multi-pod job needs the headless Service for its rendezvous address."""
    return spec.resources.nodes > 1


def world_size(spec: FineTuneJobSpec) -> int:
    """Training processes: one per GPU, or one per pod on CPU-only pods."""
    return spec.resources.nodes * max(spec.resources.gpus_per_node, 1)


def master_address(owner: Owner) -> str:
    """DNS name of pod 0: `<job>-<index>` hostname under the headless Service `<job>`."""
    return f"{owner.name}-0.{owner.name}.{owner.namespace}.svc"


def trainer_command(owner: Owner, spec: FineTuneJobSpec) -> list[str]:
    """The container command.

    One process: `kubedream train /etc/kubedream/job.yaml`. Several: the same command with
    torchrun's topology flags; `kubedream train` then starts its processes through torchrun's
    launcher (static rendezvous) and, unlike bare torchrun, exits with a failed worker's own
    code where it means something (2 bad input, 3 diverged, 143 interrupted), so the pod
    failure policy still tells them apart. The node rank is the pod's completion index, which
    the Job controller puts in JOB_COMPLETION_INDEX and the kubelet expands in `$(...)`.
    Static rendezvous means a lost pod stops the world; the replacement pods restart it from
    the last checkpoint.
    """
    train = ["kubedream", "train", contract.JOB_PATH]
    if not is_distributed(spec):
        return train
    nproc = max(spec.resources.gpus_per_node, 1)
    if spec.resources.nodes == 1:
        return [*train, f"--nproc-per-node={nproc}"]
    return [
        *train,
        f"--nproc-per-node={nproc}",
        f"--nnodes={spec.resources.nodes}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master_address(owner)}",
        f"--master-port={contract.MASTER_PORT}",
    ]


def trainer_env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    """Environment of the trainer container. Credentials come by Secret reference, never inline."""
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The root filesystem is read-only: caches and HOME live on emptyDirs.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": contract.CACHE_DIR},
        {"name": "HF_HOME", "value": f"{contract.CACHE_DIR}/huggingface"},
        {"name": "KUBEDREAM_CACHE_DIR", "value": contract.CACHE_DIR},
    ]
    storage = spec.storage
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if storage.credentials_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}},
                }
            )
    return env


S3_ENV = {
    "endpoint": "KUBEDREAM_S3_ENDPOINT",
    "region": "KUBEDREAM_S3_REGION",
    "addressingStyle": "KUBEDREAM_S3_ADDRESSING_STYLE",
    "credentialsSecret": "KUBEDREAM_S3_CREDENTIALS_SECRET",
}
"""`spec.storage` field -> environment variable holding the operator's default for it."""


def storage_defaults(env: dict[str, str]) -> StorageSpec:
    """The S3 defaults from KUBEDREAM_S3_*; raises SpecError naming each bad variable."""
    given = {field: env[var] for field, var in S3_ENV.items() if env.get(var)}
    try:
        return StorageSpec.model_validate(given)
    except ValidationError as exc:
        problems = [
            S3_ENV.get(line.split(":", 1)[0], "") + ":" + line.split(":", 1)[1]
            for line in problems_from(exc, prefix=())
        ]
        raise SpecError(problems, "environment") from None


def defaults_from(trainer_image: str | None, env: dict[str, str] | None = None) -> OperatorDefaults:
    """Operator defaults from the command line (`--trainer-image`, `--image`) and the
    environment: the same for `kubedream operator` and `kubedream render`."""
    env = dict(os.environ) if env is None else env
    return OperatorDefaults(
        trainer_image=trainer_image or env.get("KUBEDREAM_TRAINER_IMAGE") or DEFAULT_TRAINER_IMAGE,
        service_account=env.get("KUBEDREAM_TRAINER_SERVICE_ACCOUNT", "default"),
        termination_grace_seconds=int(env.get("KUBEDREAM_TERMINATION_GRACE_SECONDS", "600")),
        storage=storage_defaults(env),
    )


def trainer_resources(spec: FineTuneJobSpec) -> dict[str, Any]:
    """Requests equal limits for cpu and memory (Guaranteed QoS when both are set); GPUs are limits."""
    quantities: dict[str, Any] = {}
    if spec.resources.cpu:
        quantities["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        quantities["memory"] = spec.resources.memory
    limits = dict(quantities)
    if spec.resources.gpus_per_node > 0:
        limits["nvidia.com/gpu"] = spec.resources.gpus_per_node
    out: dict[str, Any] = {}
    if quantities:
        out["requests"] = quantities
    if limits:
        out["limits"] = limits
    return out


def pod_failure_policy() -> dict[str, Any]:
    """Disruptions (preemption, eviction, node drain) and a pod stopped because another pod of
    its group was are not failures; bad input fails the Job at once (see `contract`)."""
    return {
        "rules": [
            {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": contract.CONTAINER_NAME,
                    "operator": "In",
                    "values": list(contract.PERMANENT_EXIT_CODES),
                },
            },
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": contract.CONTAINER_NAME,
                    "operator": "In",
                    "values": list(contract.IGNORED_EXIT_CODES),
                },
            },
        ]
    }


def render_config_map(owner: Owner, spec: FineTuneJobSpec) -> dict[str, Any]:
    """ConfigMap `<name>-spec` with the FineTuneJob manifest the trainer reads."""
    manifest = to_manifest(FineTuneJob(name=owner.name, spec=spec, namespace=owner.namespace))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, contract.config_map_name(owner.name), "spec"),
        "data": {contract.JOB_FILE: yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)},
    }


def render_service(owner: Owner) -> dict[str, Any]:
    """Headless Service `<name>`: DNS records for the pods, ready or not (rendezvous precedes readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "selector": {contract.LABEL_JOB: owner.name},
            "publishNotReadyAddresses": True,
            "ports": [
                {
                    "name": "rendezvous",
                    "port": contract.MASTER_PORT,
                    "targetPort": contract.MASTER_PORT,
                }
            ],
        },
    }


def _pod_spec(owner: Owner, spec: FineTuneJobSpec, defaults: OperatorDefaults) -> dict[str, Any]:
    resources = spec.resources
    container: dict[str, Any] = {
        "name": contract.CONTAINER_NAME,
        "image": resources.image or defaults.trainer_image,
        "command": trainer_command(owner, spec),
        "env": trainer_env(spec),
        "resources": trainer_resources(spec),
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": contract.CACHE_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # The last log lines become the pod's termination message, which status shows on failure.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if needs_service(spec):
        container["ports"] = [{"name": "rendezvous", "containerPort": contract.MASTER_PORT}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": defaults.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": defaults.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": defaults.run_as_user,
            "runAsGroup": defaults.run_as_user,
            "fsGroup": defaults.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": contract.config_map_name(owner.name)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            # PyTorch's DataLoader workers and NCCL share memory through /dev/shm; the default 64Mi is too small.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if needs_service(spec):
        pod["subdomain"] = owner.name
    if resources.node_selector:
        pod["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in resources.tolerations
        ]
    if resources.priority_class_name:
        pod["priorityClassName"] = resources.priority_class_name
    return pod


def render_job(owner: Owner, spec: FineTuneJobSpec, defaults: OperatorDefaults) -> dict[str, Any]:
    """The batch/v1 Job running the trainer.

    backoffLimit scales with the pod count: with static rendezvous one lost pod makes every
    other pod of the world fail too, so `runPolicy.backoffLimit` counts world restarts.
    """
    nodes = spec.resources.nodes
    mutable = job_mutable_fields(spec)
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": mutable["backoffLimit"],
        "podFailurePolicy": pod_failure_policy(),
        # A replacement pod starts only once the old one is gone: never two ranks with one index.
        "podReplacementPolicy": "Failed",
        "suspend": mutable["suspend"],
        "template": {
            "metadata": {"labels": labels(owner.name, "trainer")},
            "spec": _pod_spec(owner, spec, defaults),
        },
    }
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if mutable[key] is not None:
            job_spec[key] = mutable[key]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(owner, owner.name, "trainer"),
        "spec": job_spec,
    }


def render_children(
    owner: Owner, spec: FineTuneJobSpec, defaults: OperatorDefaults | None = None
) -> list[dict[str, Any]]:
    """Every object of the job, in the order to create them: ConfigMap, Service (multi-pod), Job."""
    defaults = defaults or OperatorDefaults()
    objects = [render_config_map(owner, spec)]
    if needs_service(spec):
        objects.append(render_service(owner))
    objects.append(render_job(owner, spec, defaults))
    return objects


def job_mutable_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The Job spec fields the API server lets change on an existing Job, as the spec wants them.

    None means "absent" (a merge patch removes the field).
    """
    policy = spec.run_policy
    return {
        "suspend": policy.suspend,
        "backoffLimit": policy.backoff_limit * spec.resources.nodes,
        "activeDeadlineSeconds": policy.active_deadline_seconds,
        "ttlSecondsAfterFinished": policy.ttl_seconds_after_finished,
    }


def frozen_changes(old: FineTuneJobSpec, new: FineTuneJobSpec) -> list[str]:
    """Spec fields that changed but cannot reach an existing Job (its pod template is immutable).

    runPolicy reaches the Job (those fields are mutable); training, data and output settings
    reach the trainer through the ConfigMap at its next start.
    """
    return [
        f"spec.resources.{info.alias or name}"
        for name, info in ResourcesSpec.model_fields.items()
        if getattr(old.resources, name) != getattr(new.resources, name)
    ]
