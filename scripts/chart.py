#!/usr/bin/env python3
"""Lint, render and validate the Helm chart without a helm binary or a cluster.

  chart.py check            lint (strict), render several value sets, validate every
                            manifest (kubernetes-validate --strict; custom resources
                            against their CRDs' required fields), and check that values
                            that make no sense fail with a message naming them
  chart.py render JSON      print the manifests rendered with these values, as JSON
  chart.py upgrade          (also part of check) render the previous chart version (the
                            chart as it was before Chart.yaml took this version) and this
                            one as an upgrade, check that nothing immutable changes, and
                            print the values added and removed

Uses the Helm SDK from PyPI (helm-python-sdk, Helm's own library), kubernetes-validate
and PyYAML (scripts/test.sh installs them in target/chart-venv). Where a helm binary
exists, `helm lint --strict` and `helm template` do the same renders.
"""

import json
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml
from helm_python import Chart

CHART = str(Path(__file__).resolve().parent.parent / "helm" / "kongflow-events")
KUBE = "1.33"
URLS = {
    "database": {"url": "postgres://kongflow:secret@postgres:5432/kongflow"},
    "amqp": {"url": "amqp://kongflow:secret@rabbitmq:5672/kongflow"},
}

# The value sets every check renders, by name.
VALUE_SETS = {
    "default": URLS,
    "keda": {**URLS, "worker": {"keda": {"enabled": True}}},
    "keda-shard-groups": {
        **URLS,
        "config": {"SHARD_COUNT": "4"},
        "worker": {"keda": {"enabled": True}, "shardGroups": [[0, 1], [2, 3]]},
    },
    "keda-quorum": {
        **URLS,
        "config": {"SHARD_COUNT": "2", "AMQP_QUEUE_TYPE": "quorum"},
        "worker": {"keda": {"enabled": True}},
    },
    "existing-secret": {"existingSecret": "kongflow-stores"},
    "monitoring-on": {
        **URLS,
        "monitoring": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True},
        },
    },
    "tls-verify-full": {
        "database": {**URLS["database"], "sslMode": "verify-full", "caCert": {"secret": "pg-ca"}},
        "amqp": {"url": "amqps://kongflow:secret@rabbitmq:5671/kongflow",
                 "caCert": {"configMap": "rabbitmq-ca", "key": "ca.pem"}},
    },
    "hooks-no-autoscaling": {
        "existingSecret": "kongflow-stores",
        "migrations": {"hook": True},
        "api": {"autoscaling": {"enabled": False}, "pdb": {"enabled": False}},
        "worker": {"pdb": {"enabled": False}},
    },
}

# The example production values the docs point to.
VALUE_SETS["examples/values-production"] = yaml.safe_load(
    Path(CHART, "examples", "values-production.yaml").read_text())

# Values that make no sense, and what the error must name.
BAD_VALUES = [
    ({**URLS, "api": {"replicas": -1}}, "replicas"),
    ({**URLS, "worker": {"keda": {"enabled": True, "hostFromSecretKey": ""}}}, "hostFromSecretKey"),
    ({}, "database.url"),
    ({**URLS, "ports": {"http": 70000}}, "http"),
    ({**URLS, "worker": {"keda": {"enabled": True, "queueLength": 0}}}, "queueLength"),
    ({**URLS, "terminationGracePeriodSeconds": 10}, "terminationGracePeriodSeconds"),
    ({**URLS, "config": {"SHARD_COUNT": "0"}}, "SHARD_COUNT"),
    ({**URLS, "config": {"AMQP_QUEUE_TYPE": "stream"}}, "AMQP_QUEUE_TYPE"),
    ({**URLS, "config": {"SHARD_COUNT": "2"}, "worker": {"shardGroups": [[0, 2]]}}, "shard 2"),
    ({**URLS, "config": {"SHARD_COUNT": "3"}, "worker": {"shardGroups": [[0], [2]]}}, "shard 1 without"),
    ({"existingSecret": "", "database": {"url": "mysql://x"}, "amqp": URLS["amqp"]}, "url"),
    ({**URLS, "database": {**URLS["database"], "sslMode": "verify"}}, "sslMode"),
    ({**URLS, "amqp": {**URLS["amqp"], "caCert": {"secret": "a", "configMap": "b"}}}, "amqp.caCert"),
]

# Custom resources: the fields their CRDs require.
CRD_REQUIRED = {
    ("keda.sh/v1alpha1", "ScaledObject"): [("spec", "scaleTargetRef", "name"), ("spec", "triggers")],
    ("keda.sh/v1alpha1", "TriggerAuthentication"): [("spec",)],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): [("spec", "selector"), ("spec", "endpoints")],
    ("monitoring.coreos.com/v1", "PrometheusRule"): [("spec", "groups")],
}


def render(values, chart_dir=CHART, revision=1):
    chart = Chart.load(chart_dir)
    out = chart.render(values, name="kf", namespace="kongflow", revision=revision,
                       is_install=revision == 1, is_upgrade=revision > 1)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def validate(doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_REQUIRED:
        for path in CRD_REQUIRED[key]:
            node = doc
            for part in path:
                assert isinstance(node, dict) and part in node, f"{key[1]} lacks {'.'.join(path)}"
                node = node[part]
        return
    kubernetes_validate.validate(doc, KUBE, strict=True)


def check():
    lint = helm_python.chart.lint(CHART, URLS, strict=True)
    assert not lint["errors"], lint["errors"]
    bad = [m for m in lint["messages"] if m["severity"] > 1]
    assert not bad, bad
    for name, values in VALUE_SETS.items():
        docs = render(values)
        kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
        for doc in docs:
            validate(doc)
        print(f"{name}: {len(docs)} manifests valid: {', '.join(kinds)}")
    for values, needle in BAD_VALUES:
        try:
            render(values)
        except Exception as e:  # the SDK raises its own error types
            assert needle in str(e), f"{values}: error does not name {needle!r}: {e}"
            print(f"refused as it should be: {needle}")
            continue
        raise AssertionError(f"{values} rendered; it should have been refused")
    upgrade()
    print("chart ok")


def git(*args):
    return subprocess.run(["git", "-C", str(Path(CHART).parent.parent), *args],
                          check=True, capture_output=True).stdout


# Each earlier chart version and the commit it was last at: the upgrade check renders the
# newest as the release being upgraded from. Raising Chart.yaml's version adds a line here.
RELEASES = {"0.1.0": "9e8a165"}


def previous_chart():
    """The newest earlier chart version: (version, commit, directory), or None."""
    current = yaml.safe_load(Path(CHART, "Chart.yaml").read_text())["version"]
    earlier = [v for v in RELEASES if v != current]
    if not earlier:
        return None
    version = max(earlier, key=lambda v: tuple(int(p) for p in v.split(".")))
    at = RELEASES[version]
    tmp = tempfile.mkdtemp(prefix="kf-chart-")
    tarfile.open(fileobj=BytesIO(git("archive", at, "helm/kongflow-events"))).extractall(tmp)
    chart = Path(tmp, "helm", "kongflow-events")
    assert yaml.safe_load(Path(chart, "Chart.yaml").read_text())["version"] == version, at
    return version, at, str(chart)


# What Kubernetes refuses to change in place, by kind: a path into the manifest.
IMMUTABLE = {
    "Deployment": [("spec", "selector")],
    "PodDisruptionBudget": [("spec", "selector")],
    "Service": [("spec", "selector"), ("spec", "ports"), ("spec", "clusterIP")],
    "StatefulSet": [("spec", "selector")],
}


def dig(node, path):
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def keys(values, prefix=""):
    out = set()
    for k, v in values.items():
        out.add(prefix + k)
        if isinstance(v, dict) and v:
            out |= keys(v, prefix + k + ".")
    return out


def upgrade():
    previous = previous_chart()
    if previous is None:
        print("upgrade: no earlier chart version")
        return
    version, at, old_dir = previous
    for name, values in VALUE_SETS.items():
        old = {(d["kind"], d["metadata"]["name"]): d for d in render(values, old_dir, 1)}
        new = {(d["kind"], d["metadata"]["name"]): d for d in render(values, CHART, 2)}
        for key, doc in new.items():
            for path in IMMUTABLE.get(key[0], []):
                if key in old:
                    before, after = dig(old[key], path), dig(doc, path)
                    assert before == after, f"{name}: {key} {'.'.join(path)} changes: {before} -> {after}"
        jobs = [k for k in new if k[0] == "Job"]
        assert all(k not in old for k in jobs), f"{name}: the upgrade's Job keeps an old name: {jobs}"
    old_values = yaml.safe_load(Path(old_dir, "values.yaml").read_text())
    new_values = yaml.safe_load(Path(CHART, "values.yaml").read_text())
    added = sorted(keys(new_values) - keys(old_values))
    removed = sorted(keys(old_values) - keys(new_values))
    print(f"upgrade from {version} ({at}): nothing immutable changes; values added: "
          f"{', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        check()
    elif sys.argv[1:2] == ["upgrade"]:
        upgrade()
    elif sys.argv[1:2] == ["render"]:
        print(json.dumps(render(json.loads(sys.argv[2]))))
    else:
        sys.exit(__doc__)
