"""The FineTuneJob spec: one typed, frozen, torch-free model of `kubedream.io/v1alpha1`.

Every consumer reads this model: the operator validates and renders from it, the trainer
trains from it, and the CRD's OpenAPI schema is generated from it (`kubedream_operator.crd`).
Field docstrings become the CRD's descriptions, so they are written for users.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

GROUP = "kubedream.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
API_VERSION = f"{GROUP}/{VERSION}"

TINY_MODEL = "tiny"
"""`spec.model.base` value that selects a tiny SD-architecture model built in code."""
LENGTH_MISSING = "set epochs or maxSteps (or both)"
"""The problem reported for a `spec.training` that says neither how many epochs nor steps."""
TINY_SDXL_MODEL = "tiny-sdxl"
"""`spec.model.base` value that selects a tiny SDXL-architecture model built in code."""

_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )


def check_uri(value: str) -> str:
    """Accept a local path or `s3://bucket/prefix`; reject other schemes with a hint."""
    if "://" in value:
        if not value.startswith("s3://"):
            raise PydanticCustomError(
                "kd_uri",
                "must be a local path or s3://bucket/prefix, got {value}",
                {"value": repr(value)},
            )
        if not _S3_URI.match(value):
            raise PydanticCustomError(
                "kd_uri",
                "not a valid S3 URI: expected s3://bucket/prefix with a 3-63 character lowercase bucket name, got {value}",
                {"value": repr(value)},
            )
    if not value.strip():
        raise PydanticCustomError("kd_uri", "must not be empty", {})
    return value


class ModelSpec(_Model):
    """Which base model to fine-tune."""

    base: str
    """Diffusers model folder (local path or s3://bucket/prefix), or `tiny` / `tiny-sdxl` for a tiny model built in code (demos and tests)."""
    family: Literal["auto", "sd1", "sd2", "sdxl"] = "auto"
    """Model family. `auto` reads it from the model folder (SDXL has two text encoders; SD2 uses OpenCLIP-H)."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """What the UNet predicts. `auto` takes the scheduler config's `prediction_type`."""

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        return check_uri(v)


class DataRoot(_Model):
    """One folder tree of images and captions."""

    uri: str
    """Local path or s3://bucket/prefix of the root folder."""
    multiplier: float = Field(default=1.0, gt=0)
    """Scales how often this root's images appear per epoch, on top of any multiply.txt inside."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class DataSpec(_Model):
    """Training data, EveryDream style: every image trains the same."""

    roots: list[DataRoot] = Field(min_length=1)
    """Data roots. Preservation data is simply another root (or folder) with a multiplier below 1."""
    resolution: int = Field(default=512, ge=64, le=4096, multiple_of=64)
    """Training resolution: every aspect-ratio bucket has at most resolution² pixels."""
    flip_p: float = Field(default=0.0, ge=0, le=1)
    """Probability of a horizontal flip; a folder's flip_p.txt overrides it."""
    cond_dropout: float = Field(default=0.04, ge=0, le=1)
    """Probability of training an image with an empty caption (for classifier-free guidance)."""
    shuffle_tags: bool = False
    """Shuffle comma-separated caption tags each time an image is drawn."""
    keep_tags: int = Field(default=0, ge=0)
    """With shuffleTags: how many leading tags stay in place."""
    loader_workers: int = Field(default=4, ge=0, le=64)
    """Threads that fetch and decode images ahead of the GPU."""


class EmaSpec(_Model):
    """Exponential moving average of the UNet weights."""

    decay: float = Field(default=0.9999, gt=0, lt=1)
    """EMA decay per optimizer step."""


class TrainingSpec(_Model):
    """How to train."""

    epochs: int | None = Field(default=None, ge=1)
    """Number of epochs. At least one of epochs and maxSteps is required; training stops at whichever comes first."""
    max_steps: int | None = Field(default=None, ge=1)
    """Number of optimizer steps."""
    batch_size: int = Field(default=1, ge=1, le=4096)
    """Images per GPU per micro-batch. A batch holds images of one aspect-ratio bucket only."""
    gradient_accumulation: int = Field(default=1, ge=1, le=1024)
    """Micro-batches per optimizer step; gradients are averaged."""
    unet_learning_rate: float = Field(default=1e-6, gt=0, le=1)
    """Peak learning rate of the UNet."""
    text_encoder_learning_rate: float | None = Field(default=None, ge=0, le=1)
    """Peak learning rate of the text encoder(s); absent or 0 freezes them."""
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warmup."""
    lr_warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps."""
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = "adamw"
    """AdamW (fused on CUDA), 8-bit AdamW (needs bitsandbytes), or Adafactor."""
    weight_decay: float = Field(default=0.01, ge=0)
    """Decoupled weight decay."""
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    """Gradient clipping norm; null disables clipping."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """Autocast precision. `auto`: bf16 on GPUs that support it, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    ema: EmaSpec | None = None
    """Keep an EMA copy of the UNet; checkpoints then export the EMA weights."""
    min_snr_gamma: float | None = Field(default=None, gt=0)
    """Min-SNR loss weighting gamma (Hang et al. 2023; 5.0 is typical); absent disables it."""
    offset_noise: float = Field(default=0.0, ge=0, le=1)
    """Offset-noise strength (per-channel constant added to the noise); 0 disables it."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero terminal SNR (Lin et al. 2023); best with v-prediction."""
    seed: int = Field(default=555, ge=0, le=2**32 - 1)
    """Seed for weights init (tiny models), noise, flips, multiplier draws and batch order."""
    cache_latents: bool = False
    """Encode each image with the VAE once and reuse the latents (disables random flips per epoch: both flips are cached)."""
    compile: bool = False
    """torch.compile the UNet (static shapes per bucket)."""
    data_parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """With several processes: `ddp` keeps a full copy of the weights, gradients and optimizer state on every GPU (fastest when it fits); `fsdp` shards them across GPUs (PyTorch FSDP2), for models whose training state does not fit one GPU. `auto`: fsdp for SDXL with its text encoders trained, else ddp."""

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.epochs is None and self.max_steps is None:
            raise PydanticCustomError("kd_missing", LENGTH_MISSING, {})
        return self

    @model_validator(mode="after")
    def _fsdp_precision(self) -> TrainingSpec:
        if self.data_parallel == "fsdp" and self.mixed_precision == "fp16":
            raise PydanticCustomError(
                "kd_fsdp_fp16",
                "dataParallel fsdp trains in bf16 or fp32: set mixedPrecision to bf16, no or auto",
                {},
            )
        return self


OutputFormat = Literal["diffusers", "safetensors"]


def _all_formats() -> list[OutputFormat]:
    return ["diffusers", "safetensors"]


class OutputSpec(_Model):
    """Where checkpoints, samples and progress go."""

    uri: str
    """Local path or s3://bucket/prefix for checkpoints/, samples/ and progress.json."""
    save_every_epochs: int | None = Field(default=None, ge=1)
    """Save a checkpoint every N epochs (a final one is always saved)."""
    save_every_steps: int | None = Field(default=None, ge=1)
    """Save a checkpoint every N optimizer steps."""
    keep_last: int | None = Field(default=3, ge=1)
    """Keep this many newest committed checkpoints; null keeps all."""
    formats: list[OutputFormat] = Field(default_factory=_all_formats, min_length=1)
    """Checkpoint formats: a diffusers folder and/or one single-file safetensors."""
    progress_every_steps: int = Field(default=10, ge=1)
    """Rewrite progress.json (and log a JSON line off-terminal) every N steps."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)

    @field_validator("formats")
    @classmethod
    def _unique(cls, v: list[OutputFormat]) -> list[OutputFormat]:
        if len(set(v)) != len(v):
            raise PydanticCustomError(
                "kd_unique", "must not repeat a format, got {v}", {"v": repr(v)}
            )
        return v


class SamplesSpec(_Model):
    """Sample images rendered during training."""

    prompts: list[str] = Field(default_factory=list)
    """Prompts to render; none disables sampling."""
    every_epochs: int | None = Field(default=None, ge=1)
    """Render samples every N epochs."""
    every_steps: int | None = Field(default=None, ge=1)
    """Render samples every N optimizer steps."""
    steps: int = Field(default=20, ge=1, le=1000)
    """Denoising steps per sample."""
    guidance_scale: float = Field(default=7.0, ge=0, le=50)
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    """Negative prompt for every sample."""
    seed: int = Field(default=555, ge=0)
    """Seed of the sample noise, so rounds are comparable."""


class StorageSpec(_Model):
    """S3-compatible object storage settings (AWS S3, MinIO, R2, Ceph)."""

    endpoint: str | None = None
    """Endpoint URL, e.g. http://minio.minio:9000. Absent: the AWS default (or AWS_ENDPOINT_URL)."""
    region: str | None = None
    """Region name. Absent: AWS_DEFAULT_REGION or us-east-1."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """Bucket addressing style; MinIO and Ceph usually need `path`."""
    credentials_secret: str | None = None
    """Name of a Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise PydanticCustomError(
                "kd_url", "must be an http:// or https:// URL, got {v}", {"v": repr(v)}
            )
        return v


class Toleration(_Model):
    """A Kubernetes toleration, passed to the trainer pods."""

    key: str | None = None
    """Taint key."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal."""
    value: str | None = None
    """Taint value (with Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; absent tolerates all."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class ResourcesSpec(_Model):
    """Where and on what the trainer runs."""

    image: str | None = None
    """Trainer image; absent uses the operator's default."""
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    """GPUs per pod (nvidia.com/gpu); one training process runs per GPU."""
    nodes: int = Field(default=1, ge=1, le=1024)
    """Pods (nodes) in the job; more than one trains data-parallel through torch.distributed."""
    cpu: str | None = None
    """CPU request and limit per pod, e.g. `8`."""
    memory: str | None = None
    """Memory request and limit per pod, e.g. `64Gi`."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the trainer pods must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations of the trainer pods (GPU nodes are often tainted)."""
    priority_class_name: str | None = None
    """PriorityClass of the trainer pods."""

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not _QUANTITY.match(v):
            raise PydanticCustomError(
                "kd_quantity",
                "must be a Kubernetes quantity such as 8, 500m or 64Gi, got {v}",
                {"v": repr(v)},
            )
        return v


class RunPolicySpec(_Model):
    """How the Kubernetes Job behaves."""

    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Restarts of the whole trainer group after a failure (disruptions such as preemption do not count) before the job fails."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Wall-clock limit for the whole job."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the finished Job (not the FineTuneJob) after this many seconds."""
    suspend: bool = False
    """Suspend the job: pods stop after a final checkpoint; unsuspending resumes from it."""


class FineTuneJobSpec(_Model):
    """The `spec` of a FineTuneJob."""

    model: ModelSpec
    """Base model."""
    data: DataSpec
    """Data roots and data settings."""
    training: TrainingSpec
    """Training settings."""
    output: OutputSpec
    """Output location and checkpointing."""
    samples: SamplesSpec = Field(default_factory=SamplesSpec)
    """Sample images."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """S3 settings."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Pod resources and placement (operator only)."""
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    """Job run policy (operator only)."""
