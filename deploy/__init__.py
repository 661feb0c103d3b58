"""Running fedcal for real: certificates and keys, a local cluster, preflight checks, monitoring files.

The Python modules here back ``fedcal certs``, ``fedcal cluster`` and ``fedcal node``; the
folders ``prometheus/`` and ``grafana/`` hold the scrape configuration and the provisioned dashboard
used by ``docker/compose.yml`` and by the tests.
"""
