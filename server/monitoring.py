"""Prometheus exporter of the ServerApp: per-client and pooled calibration, rounds, traffic.

The ServerApp process serves ``/metrics`` (prometheus-client, its own registry) on
``monitoring.host:monitoring.port`` for as long as the run lasts. Gauges keep their last value, so
Prometheus scrapes the latest round until the process exits; ``monitoring.linger`` keeps the
endpoint up that many seconds after the last round (to let a final scrape happen), and
``monitoring.pushgateway`` additionally pushes the final values to a Pushgateway, where they
outlive the process. We chose serving over pushing by default because a ServerApp runs for the
whole run (hours) and pull is Prometheus' native model; a push is only needed for what must
survive the process.

The bind address is ``monitoring.host``/``monitoring.port``, overridden by the environment
variables ``FEDCAL_MONITORING_HOST``/``FEDCAL_MONITORING_PORT`` (the compose files set 0.0.0.0).

Labels: ``run``; per client ``client`` (partition id), ``domain``, ``role`` (seen/unseen),
``split`` (val/test) and ``ts`` (none, or the temperature-scaling mode of post-TS figures).
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server

from common.config import ConfigError

log = logging.getLogger("flwr.fedcal")

CLIENT_LABELS = ("run", "client", "domain", "role", "split", "ts")
POOLED_LABELS = ("run", "group", "split", "ts")
CLIENT_METRICS = ("accuracy", "ece", "ece10", "adaptive_ece", "mce", "classwise_ece", "nll", "brier")


class Monitor:
    """No-op unless ``monitoring.enabled``; every method is safe to call either way."""

    def __init__(self, cfg, run_name: str):
        # where the exporter binds belongs to the host or container, not to the experiment:
        # FEDCAL_MONITORING_HOST / FEDCAL_MONITORING_PORT override the run configuration
        overrides = {}
        if os.environ.get("FEDCAL_MONITORING_HOST"):
            overrides["host"] = os.environ["FEDCAL_MONITORING_HOST"]
        if os.environ.get("FEDCAL_MONITORING_PORT"):
            port = os.environ["FEDCAL_MONITORING_PORT"]
            if not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"FEDCAL_MONITORING_PORT must be a port number 0-65535 (got {port!r}); fix or unset the variable")
            overrides["port"] = int(port)
        self.cfg = cfg.monitoring.model_copy(update=overrides)
        self.run = run_name
        self.enabled = bool(self.cfg.enabled)
        self.port: int | None = None
        self._server = None
        if not self.enabled:
            return
        r = self.registry = CollectorRegistry()
        self.client = {m: Gauge(f"fedcal_client_{m}", f"Per-client {m} of the last evaluated round", CLIENT_LABELS, registry=r) for m in CLIENT_METRICS}
        self.client_temperature = Gauge("fedcal_client_temperature", "Temperature used for the client's post-TS figures", CLIENT_LABELS, registry=r)
        self.client_examples = Gauge("fedcal_client_examples", "Evaluated examples per client and split", CLIENT_LABELS, registry=r)
        self.pooled = {m: Gauge(f"fedcal_pooled_{m}", f"{m} from the summed statistics of a group of clients (all, seen, unseen, domain:<d>)", POOLED_LABELS, registry=r)
                       for m in ("accuracy", "ece", "ece10", "mce", "classwise_ece", "nll", "brier")}
        train_labels = ("run", "client", "domain", "role")
        self.train_loss = Gauge("fedcal_client_train_loss", "Mean local training loss of the client's last round", train_labels, registry=r)
        self.update_bytes = Gauge("fedcal_client_update_bytes", "Bytes of the client's last update", train_labels, registry=r)
        self.update_norm = Gauge("fedcal_client_update_norm", "L2 norm of the client's last update", train_labels, registry=r)
        self.last_seen = Gauge("fedcal_client_last_seen_round", "Last round in which the client replied", train_labels, registry=r)
        self.round = Gauge("fedcal_round", "Last completed round", ("run",), registry=r)
        self.rounds_total = Gauge("fedcal_rounds_total", "Configured number of rounds", ("run",), registry=r)
        self.round_seconds = Gauge("fedcal_round_duration_seconds", "Wall time of the last round", ("run",), registry=r)
        self.rejected = Counter("fedcal_rejected_updates", "Client updates rejected before aggregation", ("run", "reason"), registry=r)
        self.missing = Counter("fedcal_missing_replies", "Sampled clients that did not reply in time", ("run", "phase"), registry=r)
        self.failed = Counter("fedcal_failed_replies", "Replies that came back as errors", ("run", "phase"), registry=r)
        self.replies = Counter("fedcal_replies", "Reply outcomes (the ledger): outcome joined/trained/evaluated/rejected/missing/failed; label = reason or phase",
                               ("run", "outcome", "label"), registry=r)
        self.bytes = Counter("fedcal_bytes", "Trainable-state bytes moved between server and clients", ("run", "direction"), registry=r)
        self.round_bytes = Gauge("fedcal_round_bytes", "Trainable-state bytes moved in the last round", ("run", "direction"), registry=r)
        self.temperature = Gauge("fedcal_global_temperature", "Federated (global) temperature; 1 until fitted", ("run",), registry=r)
        self.rounds_total.labels(self.run).set(cfg.fl.rounds)
        self.temperature.labels(self.run).set(1.0)  # the model is unscaled (T = 1) until a temperature is fitted
        for reason in ("keys", "shape", "dtype", "non-finite", "norm", "format", "size", "metrics", "weight", "round",
                       "calibration", "bins", "classes", "nll-grid", "identity", "unsampled", "duplicate", "aggregate"):
            self.rejected.labels(self.run, reason)
        for phase in ("train", "evaluate"):  # zero series exist from the start, so dashboards show 0, not "no data"
            self.missing.labels(self.run, phase)
            self.failed.labels(self.run, phase)
        self.failed.labels(self.run, "join")
        try:
            self._server, _ = start_http_server(self.cfg.port, addr=self.cfg.host, registry=r)
            self.port = self._server.server_address[1]
            log.info("Prometheus metrics on http://%s:%d/metrics", self.cfg.host, self.port)
        except OSError as err:
            log.warning("cannot serve Prometheus metrics on %s:%d (%s); set monitoring.port to a free port or 0", self.cfg.host, self.cfg.port, err)

    def client_eval(self, evals) -> None:
        if not self.enabled:
            return
        from .records import summarize

        for e in evals:
            labels = (self.run, str(e.partition), e.domain, e.role, e.split, e.ts)
            for m, v in summarize(e.stats, e.stats10, e.adaptive_ece).items():
                if m in self.client and v is not None:
                    self.client[m].labels(*labels).set(v)
            self.client_temperature.labels(*labels).set(e.temperature)
            self.client_examples.labels(*labels).set(e.stats.total)

    def pooled_rows(self, rows) -> None:
        if not self.enabled:
            return
        for row in rows:
            group = row["group"] if row["kind"] != "domain" else f"domain:{row['group']}"
            for m, gauge in self.pooled.items():
                if row.get(m) is not None:
                    gauge.labels(self.run, group, row["split"], row["ts"]).set(row[m])

    def client_train(self, server_round: int, info, metrics: dict, nbytes: int) -> None:
        if not self.enabled:
            return
        labels = (self.run, str(info.partition_id), info.domain, info.role)
        self.train_loss.labels(*labels).set(float(metrics.get("train-loss", float("nan"))))
        self.update_norm.labels(*labels).set(float(metrics.get("update-norm", float("nan"))))
        self.update_bytes.labels(*labels).set(nbytes)
        self.last_seen.labels(*labels).set(server_round)

    def count(self, outcome: str, phase: str, label: str, n: int = 1) -> None:
        """Called by the ledger only (server/ledger.py)."""
        if not self.enabled or not n:
            return
        self.replies.labels(self.run, outcome, label).inc(n)
        legacy = {"rejected": self.rejected, "missing": self.missing, "failed": self.failed}.get(outcome)
        if legacy is not None:
            legacy.labels(self.run, label).inc(n)

    def round_done(self, server_round: int, seconds: float, sent: int, received: int) -> None:
        if not self.enabled:
            return
        self.round.labels(self.run).set(server_round)
        self.round_seconds.labels(self.run).set(seconds)
        for direction, n in (("sent", sent), ("received", received)):
            self.bytes.labels(self.run, direction).inc(n)
            self.round_bytes.labels(self.run, direction).set(n)

    def global_temperature(self, t: float) -> None:
        if self.enabled:
            self.temperature.labels(self.run).set(t)

    def finish(self) -> None:
        if not self.enabled:
            return
        if self.cfg.pushgateway:
            try:
                push_to_gateway(self.cfg.pushgateway, job="fedcal", grouping_key={"run": self.run}, registry=self.registry)
                log.info("pushed final metrics to %s", self.cfg.pushgateway)
            except Exception as err:  # network problems must not fail a finished run
                log.warning("could not push to the Pushgateway %s: %s", self.cfg.pushgateway, err)
        if self.cfg.linger > 0 and self._server is not None:
            log.info("serving final metrics for %.0fs more (monitoring.linger)", self.cfg.linger)
            time.sleep(self.cfg.linger)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
