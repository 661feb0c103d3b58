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


# ----------------------------------------------------------------------------- paper conventions
def _client_run(tmp_path, rounds=7):
    """A run with 4 clients over 2 seen domains and 1 held-out domain, val and test splits, known logits."""
    from server.records import ClientEval, pool

    cfg = config.load(None, output__dir=str(tmp_path), output__run_name="p", method__name="lora")
    run = RunDirectory.create(cfg)
    g = torch.Generator().manual_seed(7)
    clients = [(0, "art", "seen"), (1, "art", "seen"), (2, "photo", "seen"), (3, "sketch", "unseen")]
    truth = {}
    for rnd in range(1, rounds + 1):
        evals = []
        for part, dom, role in clients:
            for split in ("val", "test"):
                n = 30 + 10 * part
                x, y = torch.randn(n, 4, generator=g) * (1 + rnd / 3), torch.randint(0, 4, (n,), generator=g)
                truth[(rnd, part, split)] = (torch.softmax(x.double(), 1), y)
                evals.append(ClientEval(100 + part, part, dom, role, split, "none", 1.0, CalibrationStats.from_logits(x, y),
                                        CalibrationStats.from_logits(x, y, n_bins=10), None))
        run.write([e.row(rnd) for e in evals] + pool(evals, rnd) + [{"kind": "round", "round": rnd, "seconds": 1.0, "bytes_sent": 1, "bytes_received": 1}])
    run.close()
    return run.path, truth


def _ref_figures(probs, y):
    """Independent: torchmetrics' 10-bin ECE and the count-weighted MCE written out by hand."""
    from torchmetrics.classification import MulticlassCalibrationError

    ece = MulticlassCalibrationError(num_classes=4, n_bins=10, norm="l1")(probs, y).item()
    conf, pred = probs.max(1)
    bins = torch.clamp(torch.ceil(conf * 10) - 1, 0, 9).long()
    mce_w = max(abs((pred[bins == b] == y[bins == b]).double().mean() - conf[bins == b].mean()).item() * int((bins == b).sum()) / len(y)
                for b in range(10) if (bins == b).any())
    return 100 * (pred == y).double().mean().item(), 100 * ece, 100 * mce_w


def test_paper_conventions_are_unweighted_client_means_over_the_last_k_rounds(tmp_path):
    import numpy as np
    import pytest

    from server.paper import conventions
    from server.records import read_records

    path, truth = _client_run(tmp_path)
    conv = {(c["split"], c["ts"], c["scope"]): c for c in conventions(read_records(path), last_k=5)}
    ref = {key: _ref_figures(*value) for key, value in truth.items()}
    final = [ref[(7, p, "test")] for p in range(4)]
    c = conv[("test", "none", "all")]
    assert c["clients"] == 4 and c["last_k_rounds"] == [3, 4, 5, 6, 7]
    for i, key in enumerate(("accuracy_x100", "ece10_x100", "mce10_weighted_x100")):
        assert c["final"][key]["mean"] == pytest.approx(np.mean([f[i] for f in final]), abs=1e-4)
        assert c["final"][key]["std"] == pytest.approx(np.std([f[i] for f in final]), abs=1e-4)
        per_round = [np.mean([ref[(r, p, "test")][i] for p in range(4)]) for r in range(3, 8)]
        assert c["over_last_k"][key]["mean"] == pytest.approx(np.mean(per_round), abs=1e-4)
        assert c["over_last_k"][key]["std"] == pytest.approx(np.std(per_round), abs=1e-4)
    art = conv[("test", "none", "domain:art")]
    assert art["clients"] == 2 and art["final"]["accuracy_x100"]["mean"] == pytest.approx(np.mean([final[0][0], final[1][0]]), abs=1e-6)
    # the per-round table carries the same unweighted means
    write_round_outputs(path)
    rows = [r for r in csv.DictReader(open(path / "rounds.csv")) if r["kind"] == "client-mean" and r["round"] == "7" and r["split"] == "test"]
    assert len(rows) == 1 and float(rows[0]["accuracy"]) == pytest.approx(np.mean([f[0] for f in final]) / 100, abs=1e-9)
    assert float(rows[0]["accuracy_std"]) == pytest.approx(np.std([f[0] for f in final]) / 100, abs=1e-9)


def test_report_paper_prints_each_papers_layout(tmp_path):
    import numpy as np

    path, truth = _client_run(tmp_path)
    outputs = {}
    for paper in ("fl2ora", "fedclip", "carot"):
        res = subprocess.run([str(BIN / "fedcal"), "report", str(path), "--paper", paper], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outputs[paper] = res.stdout
    assert "| all | none | 4 |" in outputs["fl2ora"] and "| domain:art |" in outputs["fl2ora"] and " ± " in outputs["fl2ora"]
    # FedCLIP: the round with the best mean validation accuracy of the participating (seen) clients
    val = {r: np.mean([(truth[(r, p, "val")][0].argmax(1) == truth[(r, p, "val")][1]).double().mean().item() for p in range(3)]) for r in range(1, 8)}
    best = max(val, key=lambda r: (val[r], -r))
    assert f"round {best}, best mean validation accuracy" in outputs["fedclip"] and "| sketch | unseen |" in outputs["fedclip"]
    assert "ID (seen clients' test) | sketch | OOD avg" in outputs["carot"]
    summary = json.loads((path / "summary.json").read_text())
    assert summary["paper_last_k"] == 5 and any(c["scope"] == "domain:photo" for c in summary["paper"])
    assert "## Paper conventions" in (path / "summary.md").read_text()
    bad = subprocess.run([str(BIN / "fedcal"), "report", str(path), "--paper", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "fl2ora, fedclip, carot" in bad.stderr
