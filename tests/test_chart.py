"""The Helm chart (helm/ftp-gateway): lint, schemas, the passive range, refused values, and the rendered
Deployment run as a real process.

helm comes from `make helm` / .ci/run (tools/install-helm.sh); the objects are checked offline against the
Kubernetes schemas kubernetes-validate bundles. Under CI=true a missing helm or kubernetes-validate fails.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_settings
from tests.helpers import free_passive_range, missing, random_bytes, require_binary, sha256, wait_until

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "ftp-gateway"
PRODUCTION = CHART / "ci" / "production-values.yaml"
VALUES = {"default": [], "production": ["-f", str(PRODUCTION)]}
# Every optional object at once, for the schema check: HPA, an external Redis, ServiceMonitor, the test pod with
# its own Secret, static S3 keys, NodePort.
EVERYTHING = [
    *("--set", "autoscaling.enabled=true", "--set", "redis.url=redis://redis.example:6379/0"),
    *("--set", "serviceMonitor.enabled=true", "--set", "testLogin.password=pw", "--set", "service.type=NodePort"),
    *("--set", "s3.accessKeyId=a", "--set", "s3.secretAccessKey=b", "--set", "service.nodePort=30021"),
    *("--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true", "--set", "tls.implicitPort=2990"),
    *("--set", "tls.certManager.issuerRef.name=letsencrypt", "--set", "tls.certManager.dnsNames={ftp.example.com}"),
]
KUBERNETES_VERSIONS = ("1.28.0", "1.31.0")
Objects = list[dict[str, Any]]


def helm_binary() -> str:
    found = shutil.which("helm") or shutil.which("helm", path=str(Path(sys.executable).parent))
    if found is None:
        missing("helm (make helm, or tools/install-helm.sh)")
    assert found is not None
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(*args: str, chart: Path = CHART) -> Objects:
    out = helm("template", "ftp", str(chart), "--namespace", "ftp", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def gateway(objects: Objects) -> dict[str, Any]:
    deployment = one(objects, "Deployment", "ftp-ftp-gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def config_of(objects: Objects, name: str = "ftp-ftp-gateway") -> dict[str, Any]:
    return tomllib.loads(one(objects, "ConfigMap", name)["data"]["config.toml"])


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint(values: str) -> None:
    result = helm("lint", "--strict", str(CHART), *VALUES[values])
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [*VALUES, "everything"])
def test_rendered_objects_match_the_kubernetes_schemas(values: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate (pip install -e '.[test]')")
    objects = render(*(EVERYTHING if values == "everything" else VALUES[values]))
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget", "Job"} <= kinds
    if values == "everything":
        assert {"HorizontalPodAutoscaler", "ServiceMonitor", "Pod", "Secret", "Certificate"} <= kinds
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            if obj["apiVersion"].startswith(("monitoring.coreos.com/", "cert-manager.io/")):
                continue  # a CRD: no bundled schema; its shape is asserted in its own test
            kubernetes_validate.validate(obj, version, strict=True)


def test_servicemonitor_scrapes_the_admin_service() -> None:
    objects = render(*VALUES["production"])
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "30s"}]
    admin = one(objects, "Service", "ftp-ftp-gateway-admin")
    labels = admin["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert admin["spec"]["type"] == "ClusterIP" and admin["spec"]["ports"][0]["name"] == "admin"
    # Only the admin Service carries /metrics: the public one has no admin port.
    public = one(objects, "Service", "ftp-ftp-gateway")
    assert "admin" not in {p["name"] for p in public["spec"]["ports"]}
    assert not all(
        public["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()
    )


@pytest.mark.parametrize("values", VALUES)
def test_passive_range_is_one_set_in_service_pod_and_config(values: str) -> None:
    objects = render(*VALUES[values])
    service = one(objects, "Service", "ftp-ftp-gateway")
    service_ports = {p["port"] for p in service["spec"]["ports"] if p["name"].startswith("pasv-")}
    assert all(p["port"] == p["targetPort"] for p in service["spec"]["ports"] if p["name"].startswith("pasv-"))
    container_ports = {p["containerPort"] for p in gateway(objects)["ports"] if p["name"].startswith("pasv-")}
    passive = config_of(objects)["passive"]
    configured = set(range(passive["port_min"], passive["port_max"] + 1))
    assert service_ports == container_ports == configured
    values_file = yaml.safe_load(PRODUCTION.read_text()) if values == "production" else {}
    expected = values_file.get("passivePorts", yaml.safe_load((CHART / "values.yaml").read_text())["passivePorts"])
    assert configured == set(range(expected["start"], expected["end"] + 1))
    # The control port is there too, and the service's port names fit Kubernetes' 15 characters.
    assert {"ftp"} <= {p["name"] for p in service["spec"]["ports"]}
    assert max(len(p["name"]) for p in service["spec"]["ports"]) <= 15


def test_production_values_reach_the_server_config(tmp_path: Path) -> None:
    objects = render(*VALUES["production"])
    config = config_of(objects)
    # The server reads the rendered file as it is (whole numbers of `config:` arrive as 5000.0).
    (tmp_path / "config.toml").write_text(one(objects, "ConfigMap", "ftp-ftp-gateway")["data"]["config.toml"])
    settings = load_settings(tmp_path / "config.toml")
    assert settings.limits.max_connections == 5000 and settings.timeouts.drain == 120
    assert settings.workers == 1 and settings.listen == "0.0.0.0:2121"
    assert config["passive"]["masquerade_address"] == "203.0.113.10"
    assert config["proxy_protocol"] == {"trusted": ["10.20.0.0/24"], "required": True}
    assert config["cluster"]["redis_url"] == "redis://ftp-ftp-gateway-redis:6379/0"
    assert config["storage"]["default_uri"] == "s3://acme-ftp-gateway/users/{username}"
    assert one(objects, "Service", "ftp-ftp-gateway-redis")["spec"]["ports"][0]["port"] == 6379
    deployment = one(objects, "Deployment", "ftp-ftp-gateway")
    assert deployment["spec"]["replicas"] == 3
    service = one(objects, "Service", "ftp-ftp-gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    assert len(service["spec"]["ports"]) <= 50, "an AWS NLB takes 50 listeners"
    env = {e["name"]: e for e in gateway(objects)["env"]}
    assert env["FTP_GATEWAY_DATABASE__URL"]["valueFrom"]["secretKeyRef"]["name"] == "ftp-gateway-db"
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/ftp-gateway")
    # No Secret of the chart's own: the database URL is in existingSecret, S3 goes through IRSA.
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == []


def test_pods_are_locked_down_and_drain_before_they_are_killed() -> None:
    objects = render("--set", "drainTimeout=45", "--set", "terminationGraceMargin=10", "--set", "preStopSleepSeconds=5")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = gateway(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]] and "emptyDir" in volumes[mounts["/data"]]
    assert config_of(objects)["timeouts"]["drain"] == 45
    assert pod["terminationGracePeriodSeconds"] == 60
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert {"name": "admin", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    config = config_of(objects)
    assert config["admin"]["listen"] == "0.0.0.0:9090" and config["log"]["format"] == "json"
    env = {e["name"]: e for e in container["env"]}
    assert env["FTP_GATEWAY_CLUSTER__NODE_ADDRESS"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_a_config_change_rolls_the_pods() -> None:
    def checksums(*args: str) -> dict[str, str]:
        annotations = one(render(*args), "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    before = checksums()
    assert checksums("--set", "log.level=debug")["checksum/config"] != before["checksum/config"]
    assert checksums("--set", "database.url=sqlite:////data/other.db")["checksum/secret"] != before["checksum/secret"]
    assert checksums() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["passivePorts.start=30010", "passivePorts.end=30000"],
            "passivePorts.start (30010) is above passivePorts.end",
        ),
        (["passivePorts.start=30000", "passivePorts.end=30100"], "passivePorts 30000-30100 is 101 ports, more than"),
        (["maxPassivePorts=10"], "passivePorts 30000-30019 is 20 ports, more than maxPassivePorts (10)"),
        (["controlPort=30005"], "controlPort 30005 lies inside passivePorts 30000-30019"),
        (["service.type=NodePort", "passivePorts.start=20000", "passivePorts.end=20009"], "node-port range"),
        (["replicaCount=3"], "replicaCount > 1 or autoscaling.enabled needs Redis"),
        (["autoscaling.enabled=true"], "needs Redis"),
        (["s3.accessKeyId=AKIA"], "give both s3.accessKeyId and s3.secretAccessKey"),
        (["tls.enabled=true"], "tls.enabled needs the certificate's Secret"),
        (["tls.enabled=true", "tls.certManager.enabled=true"], "needs tls.certManager.issuerRef.name and"),
        (["tls.implicitPort=2990"], "tls.required and tls.implicitPort need tls.enabled"),
        (["tls.required=true"], "tls.required and tls.implicitPort need tls.enabled"),
        (
            ["tls.enabled=true", "tls.existingSecret=certs", "tls.implicitPort=30005"],
            "tls.implicitPort 30005 is the control port, the admin port or inside passivePorts 30000-30019",
        ),
    ],
)
def test_refused_values_fail_with_a_message(args: list[str], message: str) -> None:
    result = helm("template", "ftp", str(CHART), *[a for arg in args for a in ("--set", arg)], check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_several_replicas_render_with_redis() -> None:
    objects = render("--set", "replicaCount=3", "--set", "redis.url=redis://:pw@redis.example:6379/2")
    env = {e["name"]: e for e in gateway(objects)["env"]}
    ref = env["FTP_GATEWAY_CLUSTER__REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert one(objects, "Secret", ref["name"])["stringData"][ref["key"]] == "redis://:pw@redis.example:6379/2"
    assert "redis_url" not in config_of(objects)["cluster"]  # a URL with a password stays out of the ConfigMap


def test_ftps_certificate_is_mounted_and_its_port_exposed(tmp_path: Path) -> None:
    objects = render(*EVERYTHING, "--set", "tls.required=true")
    certificate = one(objects, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["dnsNames"] == ["ftp.example.com"]
    assert certificate["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "letsencrypt"}
    secret_name = certificate["spec"]["secretName"]
    for pod in (
        one(objects, "Deployment")["spec"]["template"]["spec"],
        one(objects, "Job", "ftp-ftp-gateway-check")["spec"]["template"]["spec"],
    ):
        (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == secret_name
        assert volume["secret"]["defaultMode"] == 0o440  # the key: for the pod's fsGroup only
        (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "tls"]
        assert "subPath" not in mount  # a renewed certificate must reach the running pod
    config = config_of(objects)
    assert config["tls"]["cert_file"] == f"{mount['mountPath']}/tls.crt"
    assert config["tls"]["key_file"] == f"{mount['mountPath']}/tls.key"
    assert config["tls"]["implicit_listen"] == "0.0.0.0:2990" and config["tls"]["required"] is True
    assert {"name": "ftps", "containerPort": 2990, "protocol": "TCP"} in gateway(objects)["ports"]
    public = one(objects, "Service", "ftp-ftp-gateway")["spec"]["ports"]
    assert {"name": "ftps", "port": 990, "targetPort": "ftps", "protocol": "TCP"} in public
    # The server takes the rendered [tls] table (the files themselves exist only in the pod).
    (tmp_path / "config.toml").write_text(one(objects, "ConfigMap", "ftp-ftp-gateway")["data"]["config.toml"])
    settings = load_settings(tmp_path / "config.toml")
    assert settings.tls.required and settings.tls.session_reuse
    # The replicas share their bans through the Redis they share passive ports in: bans.redis_url is left unset,
    # which means cluster.redis_url (here an external Redis, from the Secret).
    assert "bans" not in config and settings.bans.redis_url is None
    assert "FTP_GATEWAY_CLUSTER__REDIS_URL" in {e["name"] for e in gateway(objects)["env"]}


def test_nodeport_passive_ports_are_their_own_node_ports() -> None:
    objects = render(
        "--set", "service.type=NodePort", "--set", "passivePorts.start=31000", "--set", "passivePorts.end=31004"
    )
    ports = one(objects, "Service", "ftp-ftp-gateway")["spec"]["ports"]
    assert [(p["port"], p["nodePort"]) for p in ports if p["name"].startswith("pasv-")] == [
        (p, p) for p in range(31000, 31005)
    ]


# -- the rendered Deployment as a process ---------------------------------------------------------------


def notes(*args: str, tmp_path: Path) -> str:
    """NOTES.txt as `helm install` would print it (helm template skips it): rendered through a copy of the
    chart where it is wrapped into a YAML document."""
    copy = tmp_path / "chart"
    shutil.copytree(CHART, copy)
    text = (CHART / "templates" / "NOTES.txt").read_text()
    wrapper = '{{- define "notes" }}' + text + '{{- end }}\nnotes: {{ include "notes" . | b64enc }}\n'
    (copy / "templates" / "notes.yaml").write_text(wrapper)
    out = helm("template", "ftp", str(copy), "--namespace", "ftp", "--show-only", "templates/notes.yaml", *args)
    return base64.b64decode(yaml.safe_load(out.stdout)["notes"]).decode()


class Pod:
    """A rendered container as a local process, with these substitutions and no others:

    - the pod's volumes are directories under ``root`` (a ConfigMap volume holds the ConfigMap's files, an
      emptyDir is empty), and a path under a mount point, in an env value or a mounted file, is rewritten to
      its directory: so FTP_GATEWAY_CONFIG names the rendered config.toml, and the default SQLite URL and
      storage URI (under /data) land in a temporary directory;
    - the pod IP (the downward API's status.podIP) is 127.0.0.1;
    - the image's WORKDIR /data is the working directory, and `ftp-gateway` is this venv's;
    - (in the test) the listen addresses, 0.0.0.0 with fixed ports in the pod, are 127.0.0.1 with free ports.

    Secrets and ConfigMaps are resolved from the rendered objects, as the kubelet would."""

    def __init__(self, objects: Objects, pod_spec: dict[str, Any], root: Path) -> None:
        (self.container,) = pod_spec["containers"]
        self.mounts: dict[str, Path] = {}
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        for mount in self.container["volumeMounts"]:
            self.mounts[mount["mountPath"]] = root / mount["name"]
            self.mounts[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
        for mount in self.container["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                for key, value in one(objects, "ConfigMap", volume["configMap"]["name"])["data"].items():
                    (self.mounts[mount["mountPath"]] / key).write_text(self.local(value))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FTP_GATEWAY_")}
        for entry in self.container["env"]:
            value = self.resolve(objects, entry)
            if value is not None:
                self.env[entry["name"]] = self.local(value)
        self.workdir = self.mounts["/data"]

    def local(self, text: str) -> str:
        """Mount paths rewritten in one pass (a rewritten path may itself start with /tmp/)."""
        if not self.mounts:
            return text
        pattern = "|".join(re.escape(path + "/") for path in sorted(self.mounts, key=len, reverse=True))
        return re.sub(pattern, lambda m: f"{self.mounts[m.group(0)[:-1]]}/", text)

    @staticmethod
    def resolve(objects: Objects, entry: dict[str, Any]) -> str | None:
        if "value" in entry:
            return str(entry["value"])
        source = entry["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP"
            return "127.0.0.1"
        ref = source["secretKeyRef"]
        secrets = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"]]
        value = secrets[0]["stringData"].get(ref["key"]) if secrets else None
        assert value is not None or ref.get("optional"), f"{ref} is not rendered"
        return value

    def argv(self, words: list[str]) -> list[str]:
        assert words[0] == "ftp-gateway"
        return [str(Path(sys.executable).with_name("ftp-gateway")), *words[1:]]

    def run(self, words: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(words), input=stdin, capture_output=True, text=True, env=self.env, cwd=self.workdir, timeout=60
        )


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[Objects, list[str], str]:
    low, high = free_passive_range(20)
    args = ["--set", f"passivePorts.start={low}", "--set", f"passivePorts.end={high}"]
    args += ["--set", "testLogin.username=alice", "--set", "testLogin.password=CHANGE-ME"]
    return render(*args), args, notes(*args, tmp_path=tmp_path)


def test_the_rendered_deployment_serves_a_login(rendered: tuple[Objects, list[str], str], tmp_path: Path) -> None:
    objects, _, notes_text = rendered
    curl = require_binary("curl")
    job = one(objects, "Job", "ftp-ftp-gateway-migrate")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    check_job = one(objects, "Job", "ftp-ftp-gateway-check")
    assert check_job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    migrate = Pod(objects, job["spec"]["template"]["spec"], tmp_path / "pod")
    pod = Pod(objects, one(objects, "Deployment")["spec"]["template"]["spec"], tmp_path / "pod")
    # The migration Job runs against the same database as the pods (here: the same mapped SQLite file).
    assert migrate.env["FTP_GATEWAY_DATABASE__URL"] == pod.env["FTP_GATEWAY_DATABASE__URL"]
    migrated = migrate.run(migrate.container["command"] + migrate.container["args"])
    assert migrated.returncode == 0 and "database schema at revision" in migrated.stdout, migrated.stderr

    # The user is added as NOTES.txt says, with `kubectl exec` into the pod: the pod's environment.
    lines = notes_text.splitlines()
    exec_line = next(i for i, line in enumerate(lines) if "exec -i deployment/ftp-ftp-gateway --" in line)
    added = pod.run(shlex.split(lines[exec_line + 1]), stdin="CHANGE-ME\n")
    assert added.returncode == 0 and "user alice added" in added.stdout, added.stderr

    # The post-install check Job: config, database and storage, one line each, all ok.
    check = Pod(objects, check_job["spec"]["template"]["spec"], tmp_path / "pod")
    assert check.env["FTP_GATEWAY_DATABASE__URL"] == pod.env["FTP_GATEWAY_DATABASE__URL"]
    checked = check.run(check.container["command"] + check.container["args"])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert [line.split()[:2] for line in checked.stdout.splitlines()] == [
        ["ok", "config"],
        ["ok", "database"],
        ["ok", "storage"],
    ], checked.stdout
    assert "schema at revision" in checked.stdout and "users: 1" in checked.stdout

    # What differs from the pod: the listen addresses (0.0.0.0 with fixed ports there), moved to 127.0.0.1 with
    # free ports by FTP_GATEWAY_* variables, which override config.toml.
    pod.env.update(FTP_GATEWAY_LISTEN="127.0.0.1:0", FTP_GATEWAY_ADMIN__LISTEN="127.0.0.1:0")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    command = pod.argv(pod.container["command"] + pod.container["args"])
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(command, env=pod.env, cwd=pod.workdir, stdout=stdout, stderr=stderr)
    try:

        def listening() -> str | None:
            if process.poll() is not None:
                raise AssertionError(f"exited {process.returncode}: {err.read_text()[-3000:]}")
            return next((line for line in out.read_text().splitlines() if line.startswith("listening on ")), None)

        url = wait_until(listening, timeout=60, what="the 'listening on' line").removeprefix("listening on ") + "/"
        data = random_bytes(2 * 1024 * 1024, seed=6)
        (tmp_path / "upload.bin").write_bytes(data)
        login = ["--silent", "--show-error", "--fail", "--max-time", "30", "--user", "alice:CHANGE-ME"]
        subprocess.run([curl, *login, "-T", str(tmp_path / "upload.bin"), url], check=True, timeout=60)
        downloaded = subprocess.run([curl, *login, url + "upload.bin"], check=True, capture_output=True, timeout=60)
        assert sha256(downloaded.stdout) == sha256(data)
        # The chart's default storage (file:///data/ftp-data/{username}) is the pod's /data emptyDir.
        assert sha256((pod.mounts["/data"] / "ftp-data" / "alice" / "upload.bin").read_bytes()) == sha256(data)
        # The `helm test` pod's own command, against this process instead of the Service's address.
        test_pod = one(objects, "Pod")["spec"]
        (test_container,) = test_pod["containers"]
        test_env = {e["name"]: Pod.resolve(objects, e) for e in test_container["env"]}
        service_url = f"ftp://ftp-ftp-gateway:{one(objects, 'Service', 'ftp-ftp-gateway')['spec']['ports'][0]['port']}/"
        script = test_container["args"][0]
        assert service_url in script
        helm_test = subprocess.run(
            [*test_container["command"], script.replace(service_url, url)],
            env={"PATH": os.environ["PATH"], **test_env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert helm_test.returncode == 0 and "upload.bin" in helm_test.stdout, helm_test.stderr
        assert "login and listing: ok" in helm_test.stdout
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, err.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_values_readme_table_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "chart_readme.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_value_is_documented() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import chart_readme
    finally:
        sys.path.remove(str(ROOT / "tools"))
    rows = chart_readme.rows((CHART / "values.yaml").read_text())
    undocumented = [key for key, _, _, description in rows if not description]
    assert rows and undocumented == []
    documented = {key for key, *_ in rows}
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
        for key, value in tree.items():
            if f"{prefix}{key}" in documented:
                yield f"{prefix}{key}"
            elif isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    assert set(leaves(values)) == documented


# -- compose.yaml speaks the same settings ----------------------------------------------------------------


def setting_of(variable: str) -> str:
    """``FTP_GATEWAY_S3__ENDPOINT_URL`` -> ``s3.endpoint_url``, checked against the Settings model."""
    from gateway.config import Settings

    path = variable.removeprefix("FTP_GATEWAY_").lower().split("__")
    fields: dict[str, Any] = Settings.model_fields
    for i, part in enumerate(path):
        assert part in fields, f"{variable}: no setting {'.'.join(path[: i + 1])}"
        annotation = fields[part].annotation
        fields = getattr(annotation, "model_fields", {})
    return ".".join(path)


def dotted(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def test_compose_names_the_settings_the_chart_uses() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway", "migrate", "postgres", "minio", "minio-init", "redis"} <= set(services)
    gateway_env = services["gateway"]["environment"]
    assert services["migrate"]["environment"] == gateway_env and services["migrate"]["command"] == ["db", "upgrade"]
    assert "mc mb" in " ".join(services["minio-init"]["command"])
    compose_settings = {setting_of(name) for name in gateway_env}

    objects = render(
        *("--set", "s3.endpointUrl=http://minio:9000", "--set", "s3.region=us-east-1", "--set", "redis.enabled=true"),
        *("--set", "s3.accessKeyId=a", "--set", "s3.secretAccessKey=b", "--set", "masqueradeAddress=192.0.2.1"),
    )
    chart_settings = dotted(config_of(objects)) | {
        setting_of(e["name"]) for e in gateway(objects)["env"] if e["name"] != "FTP_GATEWAY_CONFIG"
    }
    assert compose_settings <= chart_settings, compose_settings - chart_settings
    # The published passive range is the configured one.
    low, high = gateway_env["FTP_GATEWAY_PASSIVE__PORT_MIN"], gateway_env["FTP_GATEWAY_PASSIVE__PORT_MAX"]
    assert f"127.0.0.1:{low}-{high}:{low}-{high}" in services["gateway"]["ports"]
