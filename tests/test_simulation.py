"""End to end: `flwr run .` on Flower's simulation engine with the offline smoke preset.

A real `flower-superlink --simulation` (started here, stopped after) runs fedcal's ServerApp and
4 ClientApps (4 PACS domains, sketch held out) on real pacs-mini images; the test then checks the
run folder: records, exact pooled figures, summary, diagrams, checkpoints, and that a run stopped
after round 2 and resumed finishes with exactly the state of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.calibration import CalibrationStats
from server.records import read_records
from tests.processes import (
    BIN,
    ROOT,
    Proc,
    base_env,
    flwr,
    free_port,
    preset,
    processes,
    wait_healthy,
    write_connection,
)

pytestmark = pytest.mark.slow
FEDERATION = "num-supernodes=4 client-resources-num-cpus=1"


@pytest.fixture(scope="module")
def simulation(tmp_path_factory, pacs_dir):
    home = tmp_path_factory.mktemp("sim")
    port = free_port()
    env = base_env(home, FEDCAL_DATA=str(pacs_dir), HOME=str(home))
    with processes() as start:
        link = start(["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:"],
                     env, home / "superlink.log")
        wait_healthy(f"http://127.0.0.1:{port}/health", link)
        write_connection(home, "sim", f"127.0.0.1:{port}")

        def command(name: str, overrides: dict) -> list[str]:
            cfg = preset(ROOT / "configs" / "offline-smoke.toml", home / f"{name}.toml", **{"output.dir": str(home / "runs"), "output.run_name": name, **overrides})
            return ["run", ".", "sim", "--stream", "--run-config", str(cfg), "--federation-config", FEDERATION]

        def run(name: str, **overrides) -> tuple[Path, str]:
            res = flwr(command(name, overrides), env, timeout=600)
            return home / "runs" / name, res.stdout + res.stderr

        run.env, run.home = env, home
        run.submit = lambda name, **overrides: Proc([str(BIN / "flwr"), *command(name, overrides)], env, home / f"{name}.log")
        yield run


def test_smoke_run_records_everything(simulation):
    run_dir, out = simulation("smoke")
    assert (run_dir / "summary.json").exists(), out[-5000:]
    rows = read_records(run_dir)
    clients = [r for r in rows if r["kind"] == "client"]
    # 4 clients x 2 rounds: 3 seen clients evaluate val+test, the held-out sketch client test only
    assert {r["round"] for r in clients} == {1, 2}
    sketch = [r for r in clients if r["domain"] == "sketch"]
    assert sketch and all(r["role"] == "unseen" and r["split"] == "test" for r in sketch)
    assert not [r for r in rows if r["kind"] == "train" and r["domain"] == "sketch"], "a held-out client trained"
    assert len([r for r in rows if r["kind"] == "train"]) == 6
    for r in clients:
        for key in ("accuracy", "ece", "ece10", "adaptive_ece", "mce", "classwise_ece", "nll", "brier", "n", "temperature", "node_id", "partition"):
            assert key in r
    # the pooled line of every (round, split, ts) is exactly the sum of the client statistics
    pooled = [r for r in rows if r["kind"] == "pooled"]
    assert pooled
    for p in pooled:
        members = [r for r in clients if (r["round"], r["split"], r["ts"]) == (p["round"], p["split"], p["ts"])]
        summed = sum(CalibrationStats.from_metrics(r["stats"]) for r in members)
        assert summed.ece() == pytest.approx(p["ece"], abs=1e-12)
        assert summed.accuracy() == pytest.approx(p["accuracy"], abs=1e-12)
        assert p["n"] == sum(r["n"] for r in members)
    # federated temperature scaling after the last round: recorded, applied, NLL on val not worse
    temps = [r for r in rows if r["kind"] == "temperature"]
    assert len(temps) == 1 and temps[0]["round"] == 2 and temps[0]["clients"] == 3
    after = next(p for p in pooled if p["round"] == 2 and p["split"] == "val" and p["ts"] == "global")
    before = next(p for p in pooled if p["round"] == 2 and p["split"] == "val" and p["ts"] == "none")
    assert after["nll"] <= before["nll"] + 1e-9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_round"] == 2 and summary["completed_rounds"] == 2
    assert "| client |" in (run_dir / "summary.md").read_text()
    figures = {p.name for p in (run_dir / "diagrams").iterdir()}
    assert {"pooled-test.png", "pooled-test.pdf", "client-003-test.png", "client-000-val.pdf"} <= figures  # before | after TS
    assert (run_dir / "curves.png").exists() and (run_dir / "curves.pdf").read_bytes().startswith(b"%PDF")
    import csv

    table = list(csv.DictReader(open(run_dir / "rounds.csv")))
    pooled_csv = {(r["round"], r["split"], r["ts"]): r for r in table if r["kind"] == "pooled"}
    for p in pooled:
        assert float(pooled_csv[(str(p["round"]), p["split"], p["ts"])]["ece"]) == pytest.approx(p["ece"], rel=1e-12)
    assert {r["group"] for r in table if r["kind"] == "client"} == {"client-0", "client-1", "client-2", "client-3"}
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["best"]["metric"] == "pooled val accuracy"
    train = [r for r in rows if r["kind"] == "train"]
    assert all("train_loss" in r and "fednova_a" not in r and "train-loss" not in r for r in train)
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "round-00002"
    final = load_file(str(run_dir / "final" / "global.safetensors"))
    assert len(final) == 2 * 2 * 3 * 2  # 2 towers x 2 blocks x q/k/v x (A, B)
    assert json.loads((run_dir / "final" / "state.json").read_text())["temperature"]["value"] == temps[0]["temperature"]
    assert "round 2/2" in out and "pooled test acc" in out


THREE_ROUNDS = {"fl.rounds": 3, "eval.temperature_scaling": "none"}


def uninterrupted(simulation) -> Path:
    """One uninterrupted 3-round run per module: the reference of both resumption tests."""
    full_dir = simulation.home / "runs" / "full"
    if not (full_dir / "final").exists():
        _, out = simulation("full", **THREE_ROUNDS)
        assert (full_dir / "final" / "global.safetensors").exists(), out[-5000:]
    return full_dir


def test_resumed_run_equals_uninterrupted(simulation):
    full_dir = uninterrupted(simulation)
    cut_dir, out = simulation("cut", **{"fl.rounds": 3, "eval.temperature_scaling": "none", "fault.stop_after_round": 2})
    assert not (cut_dir / "final").exists(), out[-3000:]
    assert (cut_dir / "checkpoints" / "LATEST").read_text() == "round-00002"
    _, out = simulation("resumed", **{"fl.rounds": 3, "eval.temperature_scaling": "none", "output.resume": str(cut_dir)})
    a = load_file(str(full_dir / "final" / "global.safetensors"))
    assert (cut_dir / "final" / "global.safetensors").exists(), out[-5000:]
    b = load_file(str(cut_dir / "final" / "global.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    rows = read_records(cut_dir)
    assert sorted({r["round"] for r in rows if r["kind"] == "round"}) == [1, 2, 3]


IN_RANGE = ("accuracy", "ece", "ece10", "mce", "classwise_ece", "adaptive_ece")


def test_misbehaving_clients_are_rejected_and_the_run_completes(simulation):
    """Forged weights, a stale round, forged calibration sums and a forged identity (run A), against
    the same partitions simply crashing in training plus forged NLL sums (run B): both finish, every
    bad reply is rejected with its reason, and both final states are the aggregate of the honest
    client alone."""
    common = {"fl.min_train_nodes": 1}
    a_dir, out_a = simulation("forged", **common, **{"fault.plan": "0:forged-calibration,1:weight,2:stale-round,3:relabel"})
    b_dir, out_b = simulation("crashing", **common, **{"fault.plan": "0:negative-nll,1:crash,2:crash"})
    for run_dir, out in ((a_dir, out_a), (b_dir, out_b)):
        assert (run_dir / "summary.json").exists(), out[-5000:]
        rows = read_records(run_dir)
        assert sorted(r["round"] for r in rows if r["kind"] == "round") == [1, 2]
        for r in rows:
            if r["kind"] in ("client", "pooled", "group", "domain"):
                assert all(r[k] is None or 0 <= r[k] <= 1 for k in IN_RANGE), r
                assert r["n"] >= 0 and r["nll"] >= 0 and r["brier"] >= 0
        state = json.loads((run_dir / "checkpoints" / "round-00002" / "state.json").read_text())
        from server.ledger import totals_from_rows

        assert state["totals"] == totals_from_rows(rows)
    rows = read_records(a_dir)
    rejected = sorted((r["round"], r["phase"], r["partition"], r["reason"]) for r in rows if r["kind"] == "rejected")
    assert rejected == [(rnd, phase, p, reason) for rnd in (1, 2) for phase, p, reason in
                        (("evaluate", 0, "calibration"), ("train", 1, "weight"), ("train", 2, "round"))]
    assert sorted(r["partition"] for r in rows if r["kind"] == "train") == [0, 0]
    sketch = {(r["partition"], r["domain"], r["role"]) for r in rows if r["kind"] == "client" and r["partition"] == 3}
    assert sketch == {(3, "sketch", "unseen")}, "the relabelled reply must carry the registry's identity"
    rows_b = read_records(b_dir)
    assert sorted((r["round"], r["partition"]) for r in rows_b if r["kind"] == "failed") == [(1, 1), (1, 2), (2, 1), (2, 2)]
    nll = [r for r in rows_b if r["kind"] == "rejected"]
    assert [(r["phase"], r["partition"], r["reason"]) for r in nll] == [("nll-grid", 0, "nll-grid")]
    temp = next(r for r in rows_b if r["kind"] == "temperature")
    assert temp["clients"] == 2 and 0.25 <= temp["temperature"] <= 4.0
    a = load_file(str(a_dir / "final" / "global.safetensors"))
    b = load_file(str(b_dir / "final" / "global.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_more_forged_replies_with_real_processes(simulation):
    """A metric named like a record field, a missing metric, a negative weight, negative counts: every
    training reply is rejected, so the global state never moves, and the run still completes."""
    run_dir, out = simulation("forged-more", **{"fl.min_train_nodes": 1, "eval.temperature_scaling": "none",
                                                "fault.plan": "0:extra-metric,1:negative-weight,2:missing-metric,3:negative-counts"})
    assert (run_dir / "summary.json").exists(), out[-5000:]
    rows = read_records(run_dir)
    rejected = sorted((r["round"], r["phase"], r["partition"], r["reason"]) for r in rows if r["kind"] == "rejected")
    assert rejected == [(rnd, phase, p, reason) for rnd in (1, 2) for phase, p, reason in
                        (("evaluate", 3, "calibration"), ("train", 0, "metrics"), ("train", 1, "weight"), ("train", 2, "metrics"))]
    assert [r["aggregated"] for r in rows if r["kind"] == "round"] == [False, False]
    assert not [r for r in rows if r["kind"] == "train"] and all(r.get("partition", 0) != 99 for r in rows)
    from common import config
    from server.app import initial_trainable_state
    from tests.conftest import CLASSES

    initial, _ = initial_trainable_state(config.load(str(simulation.home / "forged-more.toml")), CLASSES)
    final = load_file(str(run_dir / "final" / "global.safetensors"))
    assert final.keys() == initial.keys() and all(np.array_equal(initial[k].numpy(), final[k]) for k in final)


VOLATILE = {"time", "seconds", "train_seconds", "node_id", "wall_seconds"}


def comparable(rows: list[dict]) -> list[str]:
    return sorted(json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True) for r in rows)


def test_kill_9_mid_round_then_resume_gives_the_uninterrupted_records(simulation, tmp_path):
    import os
    import signal
    import time

    cfg = THREE_ROUNDS
    full_dir = uninterrupted(simulation)
    started = simulation.submit("killed", **cfg)
    killed = full_dir.parent / "killed"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for round 2's first training rows, then kill -9 the ServerApp
        rows = read_records(killed) if (killed / "metrics.jsonl").exists() else []
        if any(r["kind"] == "train" and r["round"] == 2 for r in rows):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(started.output()[-3000:])
    holder = (killed / ".lock").read_text().split()
    os.kill(int(holder[1]), signal.SIGKILL)
    started.kill()
    with open(killed / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "client", "round": 2, "acc')  # as if the kill cut a write
    _, out = simulation("killed-resume", **cfg, **{"output.resume": str(killed)})
    assert (killed / "final").exists(), out[-5000:]
    assert comparable(read_records(killed)) == comparable(read_records(full_dir))
    a, b = load_file(str(full_dir / "final" / "global.safetensors")), load_file(str(killed / "final" / "global.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def fedcal_run(simulation, *overrides: str) -> subprocess.CompletedProcess:
    args = [str(BIN / "fedcal"), "run", "configs/offline-smoke.toml", f'output.dir="{simulation.home / "runs"}"', *overrides,
            "--connection", "sim", "--federation-config", FEDERATION]
    return subprocess.run(args, env=simulation.env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_fedcal_run_exits_non_zero_when_the_run_fails_and_refuses_a_busy_folder(simulation):
    from common import runlock

    res = fedcal_run(simulation, 'output.run_name="fails"', "fl.min_train_nodes=9")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fl.min_train_nodes=9" in errors[0], res.stderr[-3000:]
    folder = simulation.home / "runs" / "fails"
    assert json.loads((folder / "status.json").read_text())["status"] == "failed"
    held = runlock.acquire(folder, "a test")  # another writer holds the folder
    try:
        res = fedcal_run(simulation, f'output.resume="{folder}"')
    finally:
        held.close()
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and f"pid {os.getpid()}" in errors[0], res.stderr[-3000:]


def test_ctrl_c_on_fedcal_run_stops_the_run(simulation):
    import signal
    import time

    folder = simulation.home / "runs" / "interrupted"
    args = [str(BIN / "fedcal"), "run", "configs/offline-smoke.toml", f'output.dir="{simulation.home / "runs"}"', 'output.run_name="interrupted"',
            "fl.rounds=8", "eval.temperature_scaling=\"none\"", "--connection", "sim", "--federation-config", FEDERATION]
    proc = subprocess.Popen(args, env=simulation.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (folder / "metrics.jsonl").exists() or not any(r["kind"] == "round" for r in read_records(folder)):
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not reach round 1"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped run" in out, out[-3000:]
    done = {r["round"] for r in read_records(folder) if r["kind"] == "round"}
    time.sleep(10)
    assert {r["round"] for r in read_records(folder) if r["kind"] == "round"} == done and max(done) < 8
    assert json.loads((folder / "status.json").read_text())["status"] != "completed"
