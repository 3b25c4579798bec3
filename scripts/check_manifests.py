#!/usr/bin/env python3
"""Checks rendered Kubernetes manifests offline, so they cannot drift from the code:

  1. every object validates: core kinds against Kubernetes' own schemas (kubernetes-validate,
     strict: unknown fields fail), the custom resources against deploy/schemas/, and the pod
     templates inside a LeaderWorkerSet as Pods;
  2. every flag a container passes to one of our binaries is a flag that binary accepts (the
     flag lists come from the binaries themselves, --helpfull), with a value where it needs one;
  3. every port a probe or a Service names is a port its container declares, and every port a
     container declares is one its binary listens on (a --listen / --http-listen flag);
  4. every $(VAR) in a container's args is an environment variable it defines (or one the
     LeaderWorkerSet controller injects);
  5. every Service, NetworkPolicy and PodDisruptionBudget selects some pod template, and a
     ScaledObject's query reads its own namespace's metrics.

  check_manifests.py --flags FLAGS.json RENDERED.yaml...

FLAGS.json: {"gemma-worker": ["coordinator", "model", ...], ...} (flag names with underscores).
Exits 1 listing every problem.
"""
import argparse
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S_VERSION = "1.30.0"
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}
# Injected into every pod of a LeaderWorkerSet by its controller.
LWS_ENV = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"}
LISTEN_FLAGS = {"listen", "http_listen", "internal_listen", "health_listen"}


def validate_core(obj, where, problems):
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"{where}: {e.message} at {'/'.join(str(p) for p in e.path)}")
    except Exception as e:  # an unknown kind or version
        problems.append(f"{where}: cannot validate: {e}")


def pod_templates(obj):
    """(name, pod template) of every pod an object makes."""
    kind = obj.get("kind")
    spec = obj.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield "template", spec.get("template", {})
    elif kind == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate", {})
        for key in ("leaderTemplate", "workerTemplate"):
            if key in lwt:
                yield key, lwt[key]


def parse_flag(arg):
    """'--some-flag=value' -> ('some_flag', 'value'); None for a positional argument."""
    if not arg.startswith("--") or arg == "--":
        return None
    name, eq, value = arg[2:].partition("=")
    return name.replace("-", "_"), (value if eq else None)


def check_container(container, where, flags, is_lws, problems):
    command = container.get("command") or []
    binary = os.path.basename(command[0]) if command else None
    args = list(command[1:]) + list(container.get("args") or [])
    env = {e["name"] for e in container.get("env", [])} | (LWS_ENV if is_lws else set())
    for arg in args:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            if var not in env:
                problems.append(f"{where}: {arg!r} uses $({var}), which the container does not "
                                f"define")
    listened = set()
    if binary in flags:
        known = set(flags[binary])
        i = 0
        while i < len(args):
            parsed = parse_flag(args[i])
            if parsed is not None:
                name, value = parsed
                if name not in known:
                    problems.append(f"{where}: {binary} has no flag --{name.replace('_', '-')}")
                if value is None and i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value = args[i + 1]
                    i += 1
                if name in LISTEN_FLAGS and value:
                    port = value.rsplit(":", 1)[-1]
                    if port.isdigit():
                        listened.add(int(port))
            i += 1
    elif binary is not None:
        problems.append(f"{where}: {binary} is not one of our binaries ({', '.join(flags)})")
    declared = {}
    for port in container.get("ports", []):
        declared[port.get("name")] = port["containerPort"]
        if binary in flags and port["containerPort"] not in listened:
            problems.append(f"{where}: port {port['containerPort']} is declared but {binary} "
                            f"listens on {sorted(listened) or 'nothing'}")
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        if not probe:
            continue
        for kind in ("grpc", "httpGet", "tcpSocket"):
            if kind in probe:
                port = probe[kind].get("port")
                if port not in declared.values() and port not in declared:
                    problems.append(f"{where}: {probe_name} uses port {port}, which the "
                                    f"container does not declare")
    return declared


def check(docs, flags, problems):
    declared_by_label = []  # (labels, {port name: number})
    services = []
    for obj in docs:
        kind, api = obj.get("kind"), obj.get("apiVersion")
        where = f"{kind}/{obj.get('metadata', {}).get('name')}"
        schema_file = CRD_SCHEMAS.get((api, kind))
        if schema_file:
            with open(os.path.join(REPO, "deploy", "schemas", schema_file)) as f:
                schema = json.load(f)
            for error in jsonschema.Draft202012Validator(schema).iter_errors(obj):
                problems.append(f"{where}: {error.message} at "
                                f"{'/'.join(str(p) for p in error.absolute_path)}")
        else:
            validate_core(obj, where, problems)
        if kind == "Service":
            services.append((where, obj))
        for name, template in pod_templates(obj):
            spec = template.get("spec", {})
            if kind == "LeaderWorkerSet":
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": f"{obj['metadata']['name']}-{name.lower()}",
                                    **{k: v for k, v in template.get("metadata", {}).items()
                                       if k in ("labels", "annotations")}},
                       "spec": spec}
                validate_core(pod, f"{where} {name} (as a Pod)", problems)
            declared = {}
            for container in spec.get("containers", []):
                declared.update(check_container(container, f"{where} {name} container "
                                                f"{container.get('name')}", flags,
                                                kind == "LeaderWorkerSet", problems))
            declared_by_label.append((template.get("metadata", {}).get("labels", {}), declared))
    # A NetworkPolicy or PodDisruptionBudget whose pod selector matches no pod template
    # protects nothing (kustomize's commonLabels reach the selectors but not the pod template
    # inside a LeaderWorkerSet, a kind it does not know).
    all_labels = [labels for labels, _ in declared_by_label]

    def selects_some_pod(match_labels):
        return any(all(labels.get(k) == v for k, v in match_labels.items())
                   for labels in all_labels)

    for obj in docs:
        kind = obj.get("kind")
        where = f"{kind}/{obj.get('metadata', {}).get('name')}"
        selectors = []
        if kind == "NetworkPolicy":
            selectors.append(("podSelector", obj["spec"].get("podSelector", {})))
            for rule in obj["spec"].get("ingress", []) + obj["spec"].get("egress", []):
                for peer in rule.get("from", []) + rule.get("to", []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        selectors.append(("a peer's podSelector", peer["podSelector"]))
        elif kind == "PodDisruptionBudget":
            selectors.append(("selector", obj["spec"].get("selector", {})))
        elif kind == "ScaledObject":
            # Its Prometheus query must read this namespace's coordinator, not every one.
            namespace = obj.get("metadata", {}).get("namespace")
            for trigger in obj["spec"].get("triggers", []):
                query = trigger.get("metadata", {}).get("query", "")
                for series in re.findall(r"gemma:\w+(?:\{[^}]*\})?", query):
                    if f'namespace="{namespace}"' not in series:
                        problems.append(f"{where}: query term {series!r} is not limited to its "
                                        f'namespace (namespace="{namespace}")')
        for what, selector in selectors:
            match = selector.get("matchLabels", {})
            if match and not selects_some_pod(match):
                problems.append(f"{where}: {what} {match} matches no pod template")

    for where, service in services:
        selector = service["spec"].get("selector", {})
        targets = [d for labels, d in declared_by_label
                   if selector and all(labels.get(k) == v for k, v in selector.items())]
        if not targets:
            problems.append(f"{where}: its selector {selector} matches no pod template")
            continue
        for port in service["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if not any(target in d or target in d.values() for d in targets):
                problems.append(f"{where}: targetPort {target} is no port of the pods it selects")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flags", required=True)
    ap.add_argument("rendered", nargs="+")
    args = ap.parse_args()
    with open(args.flags) as f:
        flags = json.load(f)
    failed = False
    for path in args.rendered:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        problems = []
        check(docs, flags, problems)
        kinds = sorted({d["kind"] for d in docs})
        if problems:
            failed = True
            print(f"{path}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
        else:
            print(f"{path}: {len(docs)} objects valid ({', '.join(kinds)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
