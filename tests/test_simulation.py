"""End to end: `flwr run .` on Flower's simulation engine with the offline smoke preset.

A real `flower-superlink --simulation` (started here, stopped after) runs fedcal's ServerApp and
4 ClientApps (4 PACS domains, sketch held out) on real pacs-mini images; the test then checks the
run folder: records, exact pooled figures, summary, diagrams, checkpoints, and that a run stopped
after round 2 and resumed finishes with exactly the state of an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.calibration import CalibrationStats
from server.records import read_records
from tests.processes import (
    ROOT,
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

        def run(name: str, **overrides) -> tuple[Path, str]:
            cfg = preset(ROOT / "configs" / "offline-smoke.toml", home / f"{name}.toml", **{"output.dir": str(home / "runs"), "output.run_name": name, **overrides})
            res = flwr(["run", ".", "sim", "--stream", "--run-config", str(cfg), "--federation-config", FEDERATION], env, timeout=600)
            return home / "runs" / name, res.stdout + res.stderr

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
    pngs = {p.name for p in (run_dir / "diagrams").glob("*.png")}
    assert {"pooled-test.png", "pooled-test-ts.png", "client-003-test.png", "client-000-val-ts.png"} <= pngs
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "round-00002"
    final = load_file(str(run_dir / "final" / "global.safetensors"))
    assert len(final) == 2 * 2 * 3 * 2  # 2 towers x 2 blocks x q/k/v x (A, B)
    assert json.loads((run_dir / "final" / "state.json").read_text())["temperature"]["value"] == temps[0]["temperature"]
    assert "round 2/2" in out and "pooled test acc" in out


def test_resumed_run_equals_uninterrupted(simulation):
    full_dir, out = simulation("full", **{"fl.rounds": 3, "eval.temperature_scaling": "none"})
    assert (full_dir / "final" / "global.safetensors").exists(), out[-5000:]
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
