"""The ServiceMonitor scrapes /metrics the way the server serves it: plain HTTP unless the server would
put the page on TLS (--tls-cert with --metrics-tls, its default)."""

from __future__ import annotations

import argparse

import pytest

from nvfp4_prep.server.config import ENV_PREFIX, ServeConfig, add_arguments

from .test_deploy import manifests, rendered, settings  # noqa: F401 (fixtures)


@pytest.mark.parametrize("variant", ["blackwell-monitoring", "blackwell-monitoring-tls"])
def test_servicemonitor_scheme_matches_the_metrics_tls_setting(manifests, variant):  # noqa: F811
    objects = manifests[variant]
    environ = settings(objects)
    tls = ENV_PREFIX + "TLS_CERT" in environ
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    metrics_tls = ServeConfig.from_args(parser.parse_args([]), {
        name: value for name, value in environ.items() if name == ENV_PREFIX + "METRICS_TLS"}).metrics_tls
    expected = "https" if tls and metrics_tls else "http"
    for endpoint in objects["ServiceMonitor", "nvfp4-prep"]["spec"]["endpoints"]:
        assert endpoint.get("scheme", "http") == expected, (variant, endpoint)
    assert variant != "blackwell-monitoring-tls" or tls, "the TLS variant sets the certificate"
