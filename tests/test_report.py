"""Research outputs from the records alone: rounds.csv, curves, `fedcal compare`."""

from __future__ import annotations

import csv
import json
import subprocess

import torch

from common import config
from common.calibration import CalibrationStats
from server.records import RunDirectory, summarize
from server.report import compare, write_round_outputs
from tests.processes import BIN


def fake_run(tmp_path, name, method, seed, rounds=3):
    cfg = config.load(None, output__dir=str(tmp_path), output__run_name=name, method__name=method)
    run = RunDirectory.create(cfg)
    g = torch.Generator().manual_seed(seed)
    for rnd in range(1, rounds + 1):
        x, y = torch.randn(40, 3, generator=g) * rnd, torch.randint(0, 3, (40,), generator=g)
        raw, ts = CalibrationStats.from_logits(x, y), CalibrationStats.from_logits(x, y, temperature=2.0)
        rows = [{"kind": "pooled", "round": rnd, "group": "all", "split": "test", "ts": t, "clients": 2, **summarize(s), "stats": s.to_metrics()}
                for t, s in (("none", raw), ("global", ts))]
        rows += [{"kind": "temperature", "round": rnd, "temperature": 2.0}, {"kind": "round", "round": rnd, "seconds": 1.5, "bytes_sent": 100, "bytes_received": 60}]
        run.write(rows)
    run.close()
    return run.path, raw, ts


def test_rounds_csv_and_curves_come_from_the_records(tmp_path):
    path, raw, _ = fake_run(tmp_path, "a", "lora", 0)
    write_round_outputs(path)
    rows = list(csv.DictReader(open(path / "rounds.csv")))
    last = [r for r in rows if r["round"] == "3" and r["ts"] == "none"]
    assert len(last) == 1 and float(last[0]["ece"]) == raw.ece() and last[0]["temperature"] == "1.0"
    assert {r["temperature"] for r in rows if r["ts"] == "global"} == {"2.0"}
    assert (path / "curves.png").stat().st_size > 1000 and (path / "curves.pdf").read_bytes().startswith(b"%PDF")


def test_compare_prints_a_table_and_writes_an_overlay(tmp_path):
    a, raw_a, ts_a = fake_run(tmp_path, "a", "lora", 0)
    b, raw_b, _ = fake_run(tmp_path, "b", "adapter", 1)
    rows = compare([a, b], tmp_path / "overlay")
    assert [(r["run"], r["method"], r["rounds"]) for r in rows] == [("a", "lora", 3), ("b", "adapter", 3)]
    assert rows[0]["ece"] == raw_a.ece() and rows[0]["ece_ts"] == ts_a.ece() and rows[1]["accuracy"] == raw_b.accuracy()
    assert rows[0]["bytes_per_round"] == 160 and rows[0]["wall_seconds"] == 4.5
    assert (tmp_path / "overlay.pdf").exists()
    res = subprocess.run([str(BIN / "fedcal"), "compare", str(a), str(b), "--out", str(tmp_path / "cli")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 4 and "| a | lora |" in res.stdout and f"{100 * raw_a.ece():.2f}" in res.stdout
    json.dumps(rows)
