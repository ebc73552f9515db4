"""Data-parallel training on CPU (gloo), launched by `kubedream train --nproc-per-node 2`.

Two processes with batch 1 and one process with batch 1 × 2 micro-batches train the same step
batches with the same noise, so their loss curves and weights agree up to float rounding;
every image is trained exactly once per epoch across ranks; a checkpoint of either resumes
on the other and ends where an uninterrupted run ends; a killed rank fails the group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import pytest

from .conftest import (
    STEPS,
    Run,
    assert_close_weights,
    command,
    free_port,
    read_records,
    run_train,
    write_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory, dist_env: dict[str, str], data: Path) -> Run:
    tmp = tmp_path_factory.mktemp("one")
    return run_train(
        tmp, dist_env, data, tmp / "out", processes=1, epochs=2, gradientAccumulation=2
    )


def test_two_ranks_train_every_image_once_per_epoch(two_ranks: Run) -> None:
    assert two_ranks.code == 0, two_ranks.log
    assert sorted(two_ranks.records) == [0, 1]
    for rank in (0, 1):
        assert [r["step"] for r in two_ranks.records[rank]] == list(range(STEPS))
    for epoch in (0, 1):
        seen: Counter[int] = Counter()
        for rank in (0, 1):
            for record in two_ranks.records[rank]:
                if record["epoch"] == epoch:
                    (batch,) = record["indices"]  # one micro-batch per step
                    seen.update(batch)
        assert seen == Counter(range(8)), f"epoch {epoch}: {seen}"
    # Ranks train different images at every step.
    for r0, r1 in zip(two_ranks.records[0], two_ranks.records[1], strict=True):
        assert r0["indices"] != r1["indices"]
    progress = (two_ranks.output / "progress.json").read_text()
    assert '"worldSize": 2' in progress


def test_same_step_batch_on_one_rank_gives_the_same_run(
    two_ranks: Run, one_rank: Run, dist_env: dict[str, str]
) -> None:
    assert one_rank.code == 0, one_rank.log
    assert two_ranks.code == 0, two_ranks.log
    # Step by step, the one rank's two micro-batches are the two ranks' batches.
    for mine, r0, r1 in zip(
        one_rank.records[0], two_ranks.records[0], two_ranks.records[1], strict=True
    ):
        assert mine["indices"] == [r0["indices"][0], r1["indices"][0]]
    assert one_rank.losses() == pytest.approx(two_ranks.losses(), rel=1e-4)
    assert len(set(one_rank.losses())) > 1  # the curve is a curve
    assert_close_weights(one_rank.unet(STEPS), two_ranks.unet(STEPS), dist_env)


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(
    first: int,
    second: int,
    tmp_path: Path,
    dist_env: dict[str, str],
    data: Path,
    one_rank: Run,
) -> None:
    """Stop mid-epoch (step 3 of 4 in epoch 1, or step 5 = 1 of epoch 2) on `first` processes
    and finish on `second`; the step batch stays 2 (batch 1 × processes × accumulation)."""
    output = tmp_path / "out"
    stop_at = 3 if first == 2 else 5
    accumulation = {1: 2, 2: 1}
    part = run_train(
        tmp_path / "a",
        dist_env,
        data,
        output,
        processes=first,
        maxSteps=stop_at,
        gradientAccumulation=accumulation[first],
    )
    assert part.code == 0, part.log
    rest = run_train(
        tmp_path / "b",
        dist_env,
        data,
        output,
        processes=second,
        maxSteps=STEPS,
        gradientAccumulation=accumulation[second],
    )
    assert rest.code == 0, rest.log
    assert f"resuming from {output}/checkpoints/step-{stop_at}" in rest.log
    assert [r["step"] for r in rest.records[0]] == list(range(stop_at, STEPS))
    # The resumed steps train what the uninterrupted run trained at those steps.
    for resumed, reference in zip(rest.records[0], one_rank.records[0][stop_at:], strict=True):
        step = resumed["step"] - stop_at
        got = chain.from_iterable(
            batch for rank in sorted(rest.records) for batch in rest.records[rank][step]["indices"]
        )
        assert sorted(got) == sorted(chain.from_iterable(reference["indices"]))
        assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert_close_weights(rest.unet(STEPS), one_rank.unet(STEPS), dist_env)


def test_resume_with_another_step_batch_continues_the_epoch(
    tmp_path: Path, dist_env: dict[str, str], data: Path
) -> None:
    """2 processes × batch 1 stop after 3 of epoch 1's 4 step batches; 1 process × batch 1
    (step batch 1) finishes the job: the 2 images epoch 1 had left are its next 2 steps,
    so every image is trained exactly once in each epoch across the two runs."""
    output = tmp_path / "out"
    part = run_train(tmp_path / "a", dist_env, data, output, processes=2, epochs=2, maxSteps=3)
    assert part.code == 0, part.log
    rest = run_train(tmp_path / "b", dist_env, data, output, processes=1, epochs=2)
    assert rest.code == 0, rest.log
    assert "re-cut to this step batch" in rest.log
    assert [r["step"] for r in rest.records[0]] == list(range(3, 3 + 2 + 8))
    for epoch in (0, 1):
        seen: Counter[int] = Counter()
        for run in (part, rest):
            for rank_records in run.records.values():
                for record in rank_records:
                    if record["epoch"] == epoch:
                        seen.update(chain.from_iterable(record["indices"]))
        assert seen == Counter(range(8)), f"epoch {epoch}: {seen}"
    final = json.loads((output / "checkpoints/step-13/checkpoint.json").read_text())
    assert final["final"] is True
    assert final["position"]["epochIndex"] == 2


def test_accumulation_under_ddp_matches_one_process(
    tmp_path: Path, dist_env: dict[str, str], data: Path
) -> None:
    """2 processes × 2 micro-batches (no_sync on the first) and 1 process × 4 micro-batches
    train the same step batches of 4: the same losses and weights."""
    runs = {
        processes: run_train(
            tmp_path / str(processes),
            dist_env,
            data,
            tmp_path / str(processes) / "out",
            processes=processes,
            epochs=2,
            gradientAccumulation=4 // processes,
        )
        for processes in (2, 1)
    }
    for run in runs.values():
        assert run.code == 0, run.log
        assert [r["step"] for r in run.records[0]] == [0, 1, 2, 3]
    two, one = runs[2], runs[1]
    for mine, r0, r1 in zip(one.records[0], two.records[0], two.records[1], strict=True):
        assert len(mine["indices"]) == 4
        assert len(r0["indices"]) == 2
        assert sorted(chain.from_iterable(mine["indices"])) == sorted(
            chain.from_iterable(r0["indices"] + r1["indices"])
        )
    assert one.losses() == pytest.approx(two.losses(), rel=1e-4)
    assert_close_weights(one.unet(4), two.unet(4), dist_env)


@contextmanager
def training(
    tmp_path: Path, dist_env: dict[str, str], data: Path, nodes: int, **env: str
) -> Iterator[list[subprocess.Popen[str]]]:
    """A long job on 2 processes: one launcher with both (`nodes` 1), or one launcher per
    process, each with its own model cache, as two pods (`nodes` 2), over loopback. Yields
    the launchers once rank 1 has trained two steps; kills what is left on the way out."""
    job = write_job(
        tmp_path / "job.yaml",
        data,
        tmp_path / "out",
        name="long",
        training={"batchSize": 1, "maxSteps": 10_000, "lrScheduler": "constant"},
        output={"saveEverySteps": 1000},
    )
    debug = tmp_path / "records"
    base_env = {**dist_env, "KUBEDREAM_DEBUG_BATCHES": str(debug), **env}
    if nodes == 1:
        runs = [(command(job, 2), base_env)]
    else:
        port = str(free_port())
        runs = [
            (
                [
                    *command(job, 1),
                    *("--nnodes", "2", "--node-rank", str(node)),
                    *("--master-addr", "127.0.0.1", "--master-port", port),
                ],
                {**base_env, "KUBEDREAM_CACHE_DIR": str(tmp_path / f"cache-{node}")},
            )
            for node in range(nodes)
        ]
    launchers = [
        subprocess.Popen(
            cmd,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for cmd, run_env in runs
    ]
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and all(p.poll() is None for p in launchers):
            if len(read_records(debug).get(1, [])) >= 2 if debug.is_dir() else False:
                break
            time.sleep(0.5)
        assert all(p.poll() is None for p in launchers), "a launcher ended before training"
        assert len(read_records(debug).get(1, [])) >= 2, "rank 1 never trained two steps"
        yield launchers
    finally:
        for p in launchers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_a_killed_rank_fails_the_group(
    tmp_path: Path, dist_env: dict[str, str], data: Path
) -> None:
    """SIGKILL one worker mid-training: the launcher exits 1 (retryable) well within the
    timeout, saying a training process was killed."""
    with training(tmp_path, dist_env, data, 1, KUBEDREAM_DIST_TIMEOUT="30") as (launcher,):
        victim = read_records(tmp_path / "records")[1][0]["pid"]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        log, _ = launcher.communicate(timeout=90)
        assert time.monotonic() - killed_at < 90
    assert launcher.returncode == 1, log
    assert "training process 1 was killed by SIGKILL" in log, log


def test_a_stopped_node_stops_the_group_and_the_other_node_exits_peer_stopped(
    tmp_path: Path, dist_env: dict[str, str], data: Path
) -> None:
    """SIGTERM to node 0's launcher (what the kubelet does on eviction): both ranks stop at
    the same step after one committed checkpoint; node 0 exits 143, node 1 exits 76 (peer
    stopped), the code the Job's podFailurePolicy ignores."""
    with training(tmp_path, dist_env, data, 2) as launchers:
        launchers[0].send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=120)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [143, 76], logs
    records = read_records(tmp_path / "records")
    last = records[0][-1]["step"]
    assert records[1][-1]["step"] == last  # both ranks stopped after the same step
    output = tmp_path / "out"
    checkpoint = json.loads((output / f"checkpoints/step-{last + 1}/checkpoint.json").read_text())
    assert checkpoint["step"] == last + 1
    assert "stopped by signal 15" in logs[0], logs[0]
    assert "rank 1 stopped with another training process that got a stop signal" in logs[1]


def test_a_rank_killed_on_another_node_fails_both_nodes_within_the_timeout(
    tmp_path: Path, dist_env: dict[str, str], data: Path
) -> None:
    """SIGKILL to node 1's training process (a node lost, OOM): node 1's launcher exits 1
    saying so; node 0's rank sees its collective fail and exits 1 with the lost-group
    message, well within KUBEDREAM_DIST_TIMEOUT (both retryable: the Job restarts the group
    from the last checkpoint)."""
    with training(tmp_path, dist_env, data, 2, KUBEDREAM_DIST_TIMEOUT="60") as launchers:
        victim = read_records(tmp_path / "records")[1][0]["pid"]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        logs = [p.communicate(timeout=120)[0] for p in launchers]
        waited = time.monotonic() - killed_at
    assert [p.returncode for p in launchers] == [1, 1], logs
    assert waited < 60 + 30
    assert "training process 1 was killed by SIGKILL" in logs[1], logs[1]
    assert "rank 0 lost the process group" in logs[0], logs[0]
    assert "Starting the job again resumes from the last checkpoint" in logs[0]


def test_a_permanent_worker_code_is_the_launchers(tmp_path: Path, dist_env: dict[str, str]) -> None:
    """torchrun alone would exit 1; a job that cannot run (code 2) must stay 2 for the pod."""
    job = write_job(
        tmp_path / "job.yaml", tmp_path / "missing", tmp_path / "out", name="bad", training={}
    )
    result = subprocess.run(
        command(job, 2), env=dist_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "spec.data.roots" in result.stderr
