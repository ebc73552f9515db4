"""The training loop, top to bottom: data, resume point, model, then steps until done.

Each optimizer step trains `gradientAccumulation` micro-batches of the epoch's plan. After
every step the loop reports progress, then checkpoints and samples when due. A stop signal
ends the run after the current step with a committed checkpoint. Starting the same job
again resumes from the newest committed checkpoint: weights, optimizer, LR schedule, EMA,
random streams and the position inside the epoch, so an interrupted run ends bit-identical
to an uninterrupted one (on the same hardware). Why accelerate is used only partly: see
`session`. Called by `train_cli`.
"""

from __future__ import annotations

from enum import Enum

from . import trainee as trainees
from .checkpoint import Checkpoint
from .data.plan import cut_batches, epoch_order
from .distributed import record_step, shared_choice
from .epochs import (
    accumulation_groups,
    batch_ids,
    build_schedule,
    data_changed,
    dataset_fingerprint,
    epoch_loader,
    load_dataset,
    order_fingerprint,
    rank_batches,
    step_batch_size,
)
from .errors import JobError, OutputLockedError
from .latent_store import LatentStore
from .metrics import StepLog
from .models import load_components, resolve_model_dir
from .preflight import check_inputs
from .progress import Phase
from .samples import sample_round
from .session import Session
from .sharding import wants_fsdp
from .signals import StopRequest
from .state import STATE_DIR, Position, fetch_state
from .step import optimizer_step
from .writer import save_checkpoint


class Outcome(Enum):
    """How `train` ended (errors raise instead)."""

    FINISHED = "finished"
    ALREADY_FINISHED = "already finished"
    INTERRUPTED = "interrupted"


def train(session: Session, stop: StopRequest) -> Outcome:
    spec, progress, store = session.job.spec, session.progress, session.store
    training = spec.training

    progress.phase(Phase.STARTING, "checking the data roots and the base model")
    check_inputs(spec)
    progress.phase(Phase.STARTING, "scanning the data roots")
    dataset = load_dataset(spec, cache=session.output, write_cache=session.is_main)
    world_size, rank = session.world_size, session.rank
    if session.is_main:
        store.remove_uncommitted()
    # Rank 0 picks the checkpoint and every rank resumes from that one.
    latest = shared_choice(
        lambda: store.latest_resumable(STATE_DIR + "/") if session.is_main else None
    )
    progress.set_checkpoints([c.uri for c in store.committed()])
    step_batch = step_batch_size(spec, world_size)
    start = None
    if latest is not None:
        start = Position.from_manifest(latest.manifest.get("position", {})).on_ranks(
            step_batch, training.gradient_accumulation
        )
    schedule = build_schedule(dataset, spec, world_size, start)
    progress.update(totalSteps=schedule.total_steps, totalEpochs=schedule.total_epochs)
    if latest is not None and latest.step >= schedule.total_steps:
        progress.phase(
            Phase.SUCCEEDED,
            f"already finished at step {latest.step}: {latest.uri}",
            step=latest.step,
            epoch=latest.manifest.get("epoch"),
        )
        return Outcome.ALREADY_FINISHED

    progress.phase(Phase.STARTING, f"loading the model {spec.model.base}")
    # One process per node fills the model cache (tiny build, s3:// download); then the others.
    with session.accelerator.local_main_process_first():
        model_dir = resolve_model_dir(spec.model.base, spec.storage, spec.model.family)
    components = load_components(model_dir, spec.model, training.zero_terminal_snr)
    sharded = wants_fsdp(
        training.data_parallel,
        components.family,
        bool(training.text_encoder_learning_rate),
        world_size,
    )
    if sharded and session.precision == "fp16":
        raise JobError(
            "spec.training.dataParallel: FSDP trains in bf16 or fp32 and this GPU has no bf16; "
            "set dataParallel to ddp or mixedPrecision to no"
        )
    trainee = trainees.build(
        components,
        training,
        session.device,
        schedule.total_steps,
        rank,
        world_size,
        channels_last=session.env.channels_last_on(session.device),
        sharded=sharded,
    )
    if trainee.latent_cache is not None:  # cached latents survive restarts, in the output
        trainee.latent_cache.attach(LatentStore.open(session.output, dataset, components.vae))
    position = Position()
    fingerprints = {"datasetFingerprint": dataset_fingerprint(dataset)}
    if latest is not None:
        loaded = fetch_state(store, latest, session.env.staging_dir)
        position = trainees.restore(trainee, loaded, session.accelerator, rank).on_ranks(
            step_batch, training.gradient_accumulation
        )
        changed = data_changed(
            latest.manifest,
            fingerprints["datasetFingerprint"],
            order_fingerprint(epoch_order(dataset, position.epoch, training.seed)),
        )
        resized = any(size != step_batch for size, _ in position.epoch_cuts)
        progress.say(
            f"resuming from {latest.uri} (step {position.step}, epoch {position.epoch + 1}, "
            f"{world_size} process{'es' if world_size > 1 else ''}"
            + (", the epoch's remaining images re-cut to this step batch" if resized else "")
            + ")"
        )
        if changed:
            progress.say(
                "warning: the data (or the seed) changed since the checkpoint; "
                "resuming at the same step and position in the epoch"
            )
    else:
        trainees.seed_everything(training.seed, rank)
    trainees.wrap(
        trainee, session.accelerator, session.env.compile_backend if training.compile else None
    )
    saved_at = latest.step if latest is not None else None
    sampled_at = None

    progress.phase(
        Phase.TRAINING,
        f"training {components.family} ({components.prediction_type}), "
        f"{schedule.total_steps} steps"
        + (
            f", {'FSDP' if sharded else 'DDP'} over {world_size} processes"
            if world_size > 1
            else ""
        ),
        step=position.step,
        epoch=position.epoch + 1,
    )
    step_log = StepLog(session.env.metrics_file if session.is_main else None, session.device)
    while position.step < schedule.total_steps:
        # A resumed epoch's plan starts with the step batches its checkpoint trained.
        order = epoch_order(dataset, position.epoch, training.seed)
        plan = cut_batches(order, step_batch, position.epoch_cuts)
        batches = rank_batches(plan, spec, world_size, rank)
        ids = batch_ids(len(batches), spec, world_size, rank)
        fingerprints["planFingerprint"] = order_fingerprint(order)
        start_at = position.batch_in_epoch
        if start_at >= len(batches):  # the data shrank under a resumed epoch: it is over
            position = Position(position.step, position.epoch + 1, 0, position.images_seen, 0)
            continue
        loader = epoch_loader(dataset, spec, position.epoch, batches[start_at:], 0, ids[start_at:])
        for group in accumulation_groups(loader, training.gradient_accumulation):
            if stop.agreed(session.accelerator, session.lease_lost):
                if stop.lease_lost:  # every rank stops; nothing more is written
                    raise OutputLockedError(
                        f"another trainer took over the lease on {session.output.uri}; "
                        "stopping without writing anything more"
                    )
                if saved_at != position.step and position.step > 0:
                    _save(session, trainee, position, schedule.total_steps, fingerprints)
                progress.phase(
                    Phase.INTERRUPTED,
                    f"{stop.describe()} at step {position.step}; "
                    "starting the job again resumes from the newest checkpoint",
                )
                return Outcome.INTERRUPTED
            result = optimizer_step(trainee, group, training, session.accelerator, position.step)
            record_step(
                rank, position.step, position.epoch, [b.indices for b in group], result.loss
            )
            position = position.advanced(len(group), result.images * world_size, len(batches))
            step_log.record(position.step, result)
            progress.step(
                position.step,
                position.epoch_label,
                result.loss,
                result.images * world_size,
                float(trainee.lr_scheduler.get_last_lr()[0]),
            )
            if _due(position, spec.output.save_every_steps, spec.output.save_every_epochs):
                _save(session, trainee, position, schedule.total_steps, fingerprints)
                saved_at = position.step
            if spec.samples.prompts and _due(
                position, spec.samples.every_steps, spec.samples.every_epochs
            ):
                sample_round(session, trainee, position.step)
                sampled_at = position.step
            if position.step >= schedule.total_steps:
                break
            progress.back_to_training()

    if saved_at != position.step:
        _save(session, trainee, position, schedule.total_steps, fingerprints)
    if spec.samples.prompts and sampled_at != position.step:
        sample_round(session, trainee, position.step)
    progress.phase(
        Phase.SUCCEEDED,
        f"finished {position.step} steps; final checkpoint: {progress.record['lastCheckpoint']}",
        step=position.step,
        epoch=position.epoch_label,
    )
    return Outcome.FINISHED


def _due(position: Position, every_steps: int | None, every_epochs: int | None) -> bool:
    """Whether a save (or a sample round) every N steps / N epochs falls on this step."""
    return bool(every_steps and position.step % every_steps == 0) or bool(
        every_epochs and position.at_epoch_start and position.epoch_label % every_epochs == 0
    )


def _save(
    session: Session,
    trainee: trainees.Trainee,
    position: Position,
    total_steps: int,
    fingerprints: dict[str, str],
) -> Checkpoint | None:
    """Checkpoint now; the plan fingerprint only matters when resuming mid-epoch. Cached
    latents are flushed first, so a resume from this checkpoint finds them all."""
    if trainee.latent_cache is not None:
        trainee.latent_cache.flush()
    recorded = dict(fingerprints)
    if position.at_epoch_start:
        recorded.pop("planFingerprint", None)
    return save_checkpoint(
        session,
        trainee,
        position,
        epoch=position.epoch_label,
        total_steps=total_steps,
        fingerprints=recorded,
    )
