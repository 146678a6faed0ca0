"""deploy/kuberay/*.yaml against KubeRay's own CRD schemas, and against the repo they launch.

No Kubernetes cluster runs here, so each manifest is validated the way the API server would
check it: against the `openAPIV3Schema` of its CustomResourceDefinition (../shared/k8s/crds),
with unknown fields rejected as the server's structural-schema pruning would surface them
(`kubectl apply --validate=strict` reports them as errors). KubeRay's own samples must pass
too, so a validator that is merely strict would fail here.

Then the content: the RayService's serveConfigV2 must be the repo's serve_config.yaml (but for
the documented differences), and the RayJob entrypoints must name files that exist and options
that `cxrray train` / `cxrray score` accept. Pure: no cluster, no Ray, no network.
"""
from __future__ import annotations

import copy
import importlib.metadata
import re
import shlex
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO.parent / "shared" / "k8s"
DEPLOY = REPO / "deploy" / "kuberay"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")

if not (K8S / "crds").is_dir():
    pytest.skip(f"KubeRay CRDs are absent ({K8S / 'crds'}): the schemas ship in ../shared/k8s beside the checkout",
                allow_module_level=True)

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 60k lines; libyaml reads them in ~1 s


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]


# --------------------------------------------------------------------------- the validator


def structural(schema: Any, *, root: bool = True) -> Any:
    """An OpenAPI v3 (Kubernetes structural) schema -> a JSON Schema that jsonschema can check.

    * Objects with `properties` reject undeclared fields (`additionalProperties: false`), unless
      they say `x-kubernetes-preserve-unknown-fields: true` or give their own
      `additionalProperties` (maps such as resources.limits or rayStartParams).
    * `x-kubernetes-int-or-string: true` accepts an integer or a string.
    * `nullable: true` accepts null as well.
    * `format: int32` / `int64` bound the integer, as the API server's decoding does.
    Other `x-kubernetes-*` keys (list types, CEL `x-kubernetes-validations`) are not checked.
    """
    if isinstance(schema, list):
        return [structural(s, root=False) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: structural(sub, root=False) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural(value, root=False)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = structural(value, root=False)
        else:
            out[key] = value
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in schema and not preserve and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") is True and "anyOf" not in schema and "type" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") is True and "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        out["type"] = [*kinds, "null"]
    if schema.get("type") == "integer" and schema.get("format") in ("int32", "int64"):
        bits = 31 if schema["format"] == "int32" else 63
        out.setdefault("minimum", -(2 ** bits))
        out.setdefault("maximum", 2 ** bits - 1)
    return out


@lru_cache(maxsize=None)
def crds() -> dict[str, dict]:
    """kind -> CRD document, for the three KubeRay CRDs."""
    out = {}
    for path in sorted((K8S / "crds").glob("*.yaml")):
        for doc in load_all(path):
            if doc.get("kind") == "CustomResourceDefinition":
                out[doc["spec"]["names"]["kind"]] = doc
    return out


@lru_cache(maxsize=None)
def validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    crd = crds()[kind]
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in served:
        raise AssertionError(f"{kind} has no version {version!r} (the CRD serves {sorted(served)})")
    schema = structural(served[version]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(obj: dict) -> list[str]:
    """Every reason the API server (with strict field validation) would refuse `obj`; [] if none."""
    kind = obj.get("kind")
    if kind not in crds():
        return [f"kind {kind!r} is none of the KubeRay CRDs {sorted(crds())}"]
    group = crds()[kind]["spec"]["group"]
    api = str(obj.get("apiVersion", ""))
    if not api.startswith(f"{group}/"):
        return [f"apiVersion {api!r} is not in group {group}"]
    errors = validator(kind, api.split("/", 1)[1]).iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def ray_docs(path: Path) -> list[dict]:
    return [d for d in load_all(path) if isinstance(d, dict) and d.get("kind") in RAY_KINDS]


# --------------------------------------------------------------------------- inputs

DEPLOY_FILES = sorted(DEPLOY.glob("*.yaml"))
SAMPLES = [(p, i) for p in sorted((K8S / "samples").glob("*.yaml")) for i, _ in enumerate(ray_docs(p))]


def manifest(name: str) -> dict:
    (doc,) = ray_docs(DEPLOY / name)
    return doc


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec" if obj["kind"] == "RayJob" else "rayClusterConfig"]


def groups(obj: dict) -> Iterator[tuple[str, dict]]:
    spec = cluster_spec(obj)
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


def containers(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(group name, pod spec, container) for every Ray container of the manifest."""
    for name, g in groups(obj):
        pod = g["template"]["spec"]
        for c in pod["containers"]:
            yield name, pod, c


def quantity(v: Any) -> float:
    """A Kubernetes CPU/GPU quantity ("8", 8, "500m") as a number."""
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def entrypoint_argv(obj: dict) -> list[str]:
    return shlex.split(obj["spec"]["entrypoint"])


# --------------------------------------------------------------------------- schema validity


def test_deploy_folder_holds_the_three_manifests():
    assert {p.name for p in DEPLOY_FILES} >= {"train-rayjob.yaml", "score-rayjob.yaml", "serve-rayservice.yaml"}
    kinds = {p.name: [d["kind"] for d in ray_docs(p)] for p in DEPLOY_FILES}
    assert kinds["train-rayjob.yaml"] == ["RayJob"]
    assert kinds["score-rayjob.yaml"] == ["RayJob"]
    assert kinds["serve-rayservice.yaml"] == ["RayService"]
    assert SAMPLES, f"no KubeRay samples in {K8S / 'samples'}"


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_deploy_manifest_matches_kuberay_schema(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert doc.get("kind") in RAY_KINDS, f"{path}: unexpected {doc.get('kind')}"
        assert doc["apiVersion"] == "ray.io/v1"
        assert schema_errors(doc) == [], f"{path.name} would be refused by the API server"


@pytest.mark.parametrize("path,index", SAMPLES, ids=lambda x: x.name if isinstance(x, Path) else str(x))
def test_kuberay_samples_pass_the_validator(path, index):
    """Known-good inputs: a validator that rejects the operator's own samples is wrong."""
    assert schema_errors(ray_docs(path)[index]) == []


def test_validator_rejects_a_misspelled_field():
    job = copy.deepcopy(manifest("train-rayjob.yaml"))
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    errors = schema_errors(job)
    assert len(errors) == 1 and "shutdownAfterJobFinish" in errors[0] and errors[0].startswith("spec:"), errors

    # ...also deep inside the embedded pod template (core/v1 PodSpec, inlined in the CRD).
    job = copy.deepcopy(manifest("train-rayjob.yaml"))
    worker = cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resource"] = worker.pop("resources")
    errors = schema_errors(job)
    assert len(errors) == 1 and "'resource' was unexpected" in errors[0], errors
    assert errors[0].startswith("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0:"), errors


def test_validator_rejects_wrong_types():
    job = copy.deepcopy(manifest("train-rayjob.yaml"))
    cluster_spec(job)["workerGroupSpecs"][0]["replicas"] = "two"
    errors = schema_errors(job)
    assert len(errors) == 1 and "'two' is not of type 'integer'" in errors[0], errors

    # rayStartParams is a map of strings: `num-cpus: 0` (an int) is a classic mistake.
    job = copy.deepcopy(manifest("train-rayjob.yaml"))
    cluster_spec(job)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert any("0 is not of type 'string'" in e for e in schema_errors(job))

    job = copy.deepcopy(manifest("train-rayjob.yaml"))
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert schema_errors(job)

    job = copy.deepcopy(manifest("serve-rayservice.yaml"))
    job["spec"]["serveConfigV2"] = {"applications": []}  # must be a YAML *string*
    assert schema_errors(job)


def test_validator_int_or_string_quantities():
    """Resource quantities are int-or-string: 8 and "8" pass; a list or a malformed unit does not."""
    job = copy.deepcopy(manifest("train-rayjob.yaml"))
    limits = cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 8
    assert schema_errors(job) == []
    limits["cpu"] = [8]
    assert schema_errors(job)
    limits["cpu"] = "8 cores"
    assert schema_errors(job)


def test_validator_rejects_wrong_kind_or_version():
    job = copy.deepcopy(manifest("train-rayjob.yaml"))
    job["apiVersion"] = "ray.io/v2"
    with pytest.raises(AssertionError, match="no version 'v2'"):
        schema_errors(job)
    job["apiVersion"] = "batch/v1"
    assert schema_errors(job)
    job["kind"] = "Job"
    assert schema_errors(job)


def test_structural_translation_of_kubernetes_extensions():
    """The CRDs here use no preserve-unknown-fields, so check the translation on a small schema."""
    schema = structural({
        "type": "object",
        "properties": {
            "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "string"}}},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "port": {"x-kubernetes-int-or-string": True},
            "when": {"type": "string", "nullable": True},
            "n": {"type": "integer", "format": "int32"},
        },
    })
    v = jsonschema.Draft7Validator(schema)
    assert v.is_valid({"strict": {"a": "x"}, "free": {"a": "x", "b": 1}, "map": {"k": "v"},
                       "port": 8000, "when": None, "n": 3})
    assert v.is_valid({"port": "http"})
    assert not v.is_valid({"strict": {"b": "x"}})
    assert not v.is_valid({"free": {"a": 1}})      # declared fields keep their types
    assert not v.is_valid({"map": {"k": 1}})
    assert not v.is_valid({"port": 1.5})
    assert not v.is_valid({"n": 2 ** 31})
    assert not v.is_valid({"other": 1})


# --------------------------------------------------------------------------- serveConfigV2 vs serve_config.yaml

# The differences deploy/kuberay/serve-rayservice.yaml documents; everything else must be equal.
SERVE_DIFFERENCES = {("http_options", "host"): ("127.0.0.1", "0.0.0.0")}


def _normalise(config: dict) -> dict:
    config = copy.deepcopy(config)
    for app in config.get("applications", []):
        app.get("args", {}).pop("artifact", None)
    for (section, key), _ in SERVE_DIFFERENCES.items():
        config.get(section, {}).pop(key, None)
    return config


def test_serve_config_v2_is_the_repo_serve_config():
    repo = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    k8s = yaml.safe_load(manifest("serve-rayservice.yaml")["spec"]["serveConfigV2"])
    assert isinstance(k8s, dict) and k8s.get("applications"), "serveConfigV2 must be a YAML mapping with applications"

    for (section, key), (repo_value, k8s_value) in SERVE_DIFFERENCES.items():
        assert repo[section][key] == repo_value, f"serve_config.yaml {section}.{key} changed: update this test"
        assert k8s[section][key] == k8s_value, f"serveConfigV2 {section}.{key} must be {k8s_value} inside a pod"

    assert [a["name"] for a in k8s["applications"]] == [a["name"] for a in repo["applications"]]
    for app in k8s["applications"]:
        artifact = app["args"]["artifact"]
        # The builder runs on the cluster, in a directory of Ray's choosing: no relative paths.
        assert "://" in artifact or artifact.startswith("/"), f"artifact {artifact!r} must be a URI or absolute"

    # Every other key and value exactly, application by application, for a readable diff.
    norm_repo, norm_k8s = _normalise(repo), _normalise(k8s)
    for mine, theirs in zip(norm_k8s.pop("applications"), norm_repo.pop("applications")):
        assert mine == theirs
    assert norm_k8s == norm_repo


def test_serve_config_v2_passes_ray_serve_schema():
    """What KubeRay PUTs to the dashboard's Serve API: it must parse as Ray Serve's deploy schema."""
    from ray.serve.schema import ServeDeploySchema

    k8s = yaml.safe_load(manifest("serve-rayservice.yaml")["spec"]["serveConfigV2"])
    parsed = ServeDeploySchema.parse_obj(k8s)
    assert parsed.http_options.host == "0.0.0.0" and parsed.http_options.port == 8000


def test_serve_drift_is_caught():
    """The comparison above bites: a changed setting or an extra key is a difference."""
    repo = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    k8s = yaml.safe_load(manifest("serve-rayservice.yaml")["spec"]["serveConfigV2"])
    assert _normalise(k8s) == _normalise(repo)
    changed = copy.deepcopy(k8s)
    changed["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"] = 3
    assert _normalise(changed) != _normalise(repo)
    changed = copy.deepcopy(k8s)
    changed["applications"][0]["args"]["max_batch_sizes"] = 16
    assert _normalise(changed) != _normalise(repo)
    changed = copy.deepcopy(k8s)
    changed["http_options"]["port"] = 8080
    assert _normalise(changed) != _normalise(repo)


def test_serve_service_exposes_the_proxy_port():
    svc = manifest("serve-rayservice.yaml")
    port = yaml.safe_load(svc["spec"]["serveConfigV2"])["http_options"]["port"]
    head = cluster_spec(svc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": port, "name": "serve"} in head["ports"]


# --------------------------------------------------------------------------- entrypoints vs the repo


def _train_args():
    from cxrray.cli import build_parser

    argv = entrypoint_argv(manifest("train-rayjob.yaml"))
    assert argv[:2] == ["python", "jobs/train.py"], argv
    assert (REPO / argv[1]).is_file()
    # jobs/train.py hands its arguments to `cxrray train`: parse them with that parser.
    return build_parser().parse_args(["train", *argv[2:]])


def test_train_entrypoint_is_a_valid_train_config():
    from cxrray.config import TrainConfig, load_config

    args = _train_args()
    assert args.config and (REPO / args.config).is_file(), f"config {args.config} is not in the repo"
    cfg = load_config(TrainConfig, REPO / args.config, args.overrides)  # unknown keys raise
    assert cfg.use_gpu is True
    assert cfg.storage_path.startswith("s3://"), "run storage must outlive the cluster and be shared by every pod"
    assert cfg.run_name

    job = manifest("train-rayjob.yaml")
    gpu_groups = [g for name, g in groups(job) if name != "head"]
    gpus = 0
    for g in gpu_groups:
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"], "DDP wants a fixed-size group"
        (c,) = g["template"]["spec"]["containers"]
        res = c["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        gpus += g["replicas"] * quantity(res["limits"]["nvidia.com/gpu"])
        assert quantity(res["limits"]["cpu"]) >= cfg.cpus_per_worker
    assert cfg.num_workers == gpus, f"num_workers={cfg.num_workers} but the cluster has {gpus:g} GPUs"

    # The dataset root is on a volume every pod mounts.
    for _, _, c in containers(job):
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert any(PurePosixPath(cfg.root).is_relative_to(m) for m in mounts), f"{cfg.root} is not mounted in {c['name']}"


def test_score_entrypoint_parses_and_scores_the_trained_artifact():
    from cxrray.config import TrainConfig, load_config
    from cxrray.score import build_parser

    job = manifest("score-rayjob.yaml")
    argv = entrypoint_argv(job)
    assert argv[:2] == ["python", "jobs/score.py"], argv
    assert (REPO / argv[1]).is_file()
    args = build_parser().parse_args(argv[2:])
    for value in (args.artifact, args.input, args.out):
        assert value.startswith("s3://"), f"{value}: pods share no disk; use object storage"

    # The artifact the training job publishes (<storage_path>/<run_name>/artifacts/best) is the
    # one scored and served.
    targs = _train_args()
    tcfg = load_config(TrainConfig, REPO / targs.config, targs.overrides)
    published = f"{tcfg.storage_path.rstrip('/')}/{tcfg.run_name}/artifacts/best"
    assert args.artifact == published
    served = yaml.safe_load(manifest("serve-rayservice.yaml")["spec"]["serveConfigV2"])
    assert served["applications"][0]["args"]["artifact"] == published

    # An explicit pool must fit the CPU group at its largest, or actors would wait forever.
    if args.actors:
        cpu_max = sum(g["maxReplicas"] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                      for name, g in groups(job) if name == "cpu")
        assert args.actors * args.cpus_per_actor <= cpu_max
    assert cluster_spec(job).get("enableInTreeAutoscaling") is True
    cpu = dict(groups(job))["cpu"]
    assert cpu["minReplicas"] <= cpu["replicas"] <= cpu["maxReplicas"] and cpu["minReplicas"] < cpu["maxReplicas"]


@pytest.mark.parametrize("name", ["train-rayjob.yaml", "score-rayjob.yaml"])
def test_rayjob_lifecycle_and_shell_safety(name):
    job = manifest(name)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    # Ray runs the entrypoint through a shell: a placeholder like s3://<bucket>/ would be a redirect.
    assert not re.search(r"[<>|;&$`]", spec["entrypoint"]), spec["entrypoint"]


# --------------------------------------------------------------------------- pods


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_every_pod_gets_s3_credentials_from_the_secret(path):
    (obj,) = ray_docs(path)
    for group, _, c in containers(obj):
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in env, f"{path.name} {group}: no {key}"
            assert "value" not in env[key], f"{path.name} {group}: {key} must come from the Secret"
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "cxrray-s3", "key": key}
        assert env["AWS_DEFAULT_REGION"]["value"]
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"].get("optional") is True


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_pods_are_consistent(path):
    """What the schema cannot see: mounts name declared volumes, one image, one Ray version."""
    (obj,) = ray_docs(path)
    ray_version = cluster_spec(obj)["rayVersion"]
    installed = importlib.metadata.version("ray")
    assert ray_version.split(".")[:2] == installed.split(".")[:2], f"rayVersion {ray_version} vs ray {installed}"
    images = set()
    for group, pod, c in containers(obj):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{path.name} {group}: mount {m['name']} has no volume"
        images.add(c["image"])
        limits = c["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            assert c["resources"]["requests"].get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
    assert len(images) == 1, f"{path.name}: one image for every pod, got {images}"
    # The top-level metadata is not in the CRD schema; the API server checks the name itself
    # (a DNS-1123 label, since KubeRay derives Service and Job names from it).
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    assert len(obj["metadata"]["name"]) <= 40
    assert cluster_spec(obj)["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def test_dockerfile_base_matches_ray_version():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE=(\S+)$", dockerfile, re.M)
    assert base, "deploy/kuberay/Dockerfile declares ARG BASE=<ray image>"
    for path in DEPLOY_FILES:
        (obj,) = ray_docs(path)
        assert f":{cluster_spec(obj)['rayVersion']}-" in base.group(1), f"{path.name} rayVersion vs {base.group(1)}"
    # What the image copies must exist, or the build fails.
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
    assert {"cxrray", "jobs"} <= {src for line in copies for src in line.split()}
    for line in copies:
        for src in line.split():
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
