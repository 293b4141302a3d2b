//! The Kubernetes manifests of deploy/k8s: each kustomization renders (`kubectl kustomize`)
//! with every container's image from its `images:` setting and every object in its namespace;
//! the kustomizations agree on the image; every object, rendered or standalone (the Secret
//! examples), validates against the API schemas (kubernetes-validate, strict: unknown fields
//! are errors) of pinned Kubernetes versions; the agents' gRPC probes reach a health port the
//! agent serves and the NetworkPolicies open.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::tools::{kubectl, kubernetes_validate, read, repo_root, yaml_documents, yaml_file};

/// The directory of the manifests.
const K8S_DIR: &str = "deploy/k8s";
/// The kustomizations, applied with `kubectl apply -k`: the agents, and the migration Job.
const KUSTOMIZATIONS: [&str; 2] = ["deploy/k8s", "deploy/k8s/migrate"];
/// The image name the manifests use, which the kustomizations' `images:` replace.
const IMAGE: &str = "pgzm";
/// Manifests applied on their own (not through a kustomization).
const STANDALONE: [&str; 1] = ["deploy/k8s/secrets.example.yaml"];
/// The Kubernetes versions (bundled by kubernetes-validate) the objects must be valid for:
/// an older one still in use and the newest.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// A kustomization's settings the checks use.
struct Kustomization {
    dir: &'static str,
    namespace: String,
    /// Resource files, relative to the repository root.
    resources: Vec<String>,
    /// `newName:newTag` (or `newName@digest`) of [`IMAGE`].
    image: String,
}

impl Kustomization {
    fn read(dir: &'static str) -> Kustomization {
        let path = format!("{dir}/kustomization.yaml");
        let doc = yaml_file(&path).into_iter().next().unwrap_or_default();
        let namespace = doc["namespace"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: no namespace"))
            .to_string();
        let resources = doc["resources"]
            .as_array()
            .unwrap_or_else(|| panic!("{path}: no resources"))
            .iter()
            .map(|r| {
                let r = r
                    .as_str()
                    .unwrap_or_else(|| panic!("{path}: a resource is not a path"));
                format!("{dir}/{r}")
            })
            .collect();
        let setting = doc["images"]
            .as_array()
            .and_then(|images| images.iter().find(|i| i["name"] == IMAGE))
            .unwrap_or_else(|| panic!("{path}: no `images:` entry for {IMAGE}"));
        let name = setting["newName"].as_str().unwrap_or(IMAGE);
        let image = match (setting["newTag"].as_str(), setting["digest"].as_str()) {
            (_, Some(digest)) => format!("{name}@{digest}"),
            (Some(tag), None) => format!("{name}:{tag}"),
            (None, None) => panic!("{path}: the {IMAGE} image has neither newTag nor digest"),
        };
        Kustomization {
            dir,
            namespace,
            resources,
            image,
        }
    }

    /// `kubectl kustomize` of this directory: the YAML and its objects.
    fn render(&self) -> (String, Vec<Value>) {
        let output = Command::new(kubectl())
            .arg("kustomize")
            .arg(repo_root().join(self.dir))
            .output()
            .unwrap_or_else(|e| panic!("run kubectl kustomize {}: {e}", self.dir));
        assert!(
            output.status.success(),
            "kubectl kustomize {} failed: {}",
            self.dir,
            String::from_utf8_lossy(&output.stderr)
        );
        let yaml = String::from_utf8(output.stdout).expect("kustomize prints UTF-8");
        let objects = yaml_documents(&yaml, &format!("kubectl kustomize {}", self.dir));
        (yaml, objects)
    }
}

/// `kind/name` of an object.
fn kind_name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Every container (init and ephemeral ones too) anywhere in `value`.
fn containers(value: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if matches!(
                    key.as_str(),
                    "containers" | "initContainers" | "ephemeralContainers"
                ) {
                    found.extend(child.as_array().into_iter().flatten());
                } else {
                    found.extend(containers(child));
                }
            }
        }
        Value::Array(items) => found.extend(items.iter().flat_map(containers)),
        _ => {}
    }
    found
}

/// Validates `file` (a path; its objects, `count` of them) with kubernetes-validate, strict,
/// for each of [`KUBERNETES_VERSIONS`]. Any error, warning (a kind without a schema) or missing
/// verdict fails; `what` names the objects in the failure.
fn validate(file: &Path, what: &str, count: usize) {
    let mut command = Command::new(kubernetes_validate());
    command.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        command.args(["--kubernetes-version", version]);
    }
    let output = command
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("run kubernetes-validate: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let passed = stdout.lines().filter(|l| l.starts_with("INFO ")).count();
    let complaints: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| !l.starts_with("INFO ") && !l.trim().is_empty())
        .collect();
    assert!(
        output.status.success() && complaints.is_empty(),
        "{what} does not validate (kubernetes-validate --strict, Kubernetes {}):\n{}",
        KUBERNETES_VERSIONS.join(", "),
        complaints.join("\n")
    );
    assert_eq!(
        passed,
        count * KUBERNETES_VERSIONS.len(),
        "{what}: kubernetes-validate passed {passed} object×version pairs, expected {count} objects × {} versions:\n{stdout}",
        KUBERNETES_VERSIONS.len()
    );
}

/// Validates a kustomization's rendered objects (through a temporary file: kubernetes-validate
/// reads its input once per version).
fn validate_rendered(dir: &str, yaml: &str, count: usize) {
    let file = std::env::temp_dir().join(format!(
        "pgzm-deploy-{}-{}.yaml",
        dir.replace('/', "-"),
        std::process::id()
    ));
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    validate(&file, &format!("kubectl kustomize {dir}"), count);
    let _ = std::fs::remove_file(&file);
}

/// The YAML files below `dir` (relative to the repository root), recursively.
fn yaml_files(dir: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_string()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(repo_root().join(&dir)).unwrap_or_else(|e| panic!("read {dir}: {e}"));
        for entry in entries {
            let entry = entry.expect("directory entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = format!("{dir}/{name}");
            if entry.file_type().expect("file type").is_dir() {
                pending.push(path);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                found.insert(path);
            }
        }
    }
    found
}

#[test]
fn kustomizations_render_every_image_from_their_images_setting() {
    let found: BTreeSet<String> = yaml_files(K8S_DIR)
        .into_iter()
        .filter_map(|f| f.strip_suffix("/kustomization.yaml").map(str::to_string))
        .collect();
    let expected: BTreeSet<String> = KUSTOMIZATIONS.iter().map(|k| k.to_string()).collect();
    assert_eq!(
        found, expected,
        "the kustomizations under {K8S_DIR} are not the ones the deploy checks render (KUSTOMIZATIONS in tests/tests/deploy/kubernetes.rs)"
    );

    let mut images = BTreeSet::new();
    for dir in KUSTOMIZATIONS {
        let kustomization = Kustomization::read(dir);
        let (_, objects) = kustomization.render();
        let mut seen = 0;
        for object in &objects {
            for container in containers(object) {
                let image = container["image"].as_str().unwrap_or("");
                assert_eq!(
                    image,
                    kustomization.image,
                    "kubectl kustomize {dir}: {} container {} has image {image:?}, not the kustomization's {} (a manifest applied outside the kustomization, or an image name other than {IMAGE:?})",
                    kind_name(object),
                    container["name"],
                    kustomization.image
                );
                seen += 1;
            }
            if object["kind"] != "Namespace" {
                assert_eq!(
                    object["metadata"]["namespace"].as_str(),
                    Some(kustomization.namespace.as_str()),
                    "kubectl kustomize {dir}: {} is not in namespace {}",
                    kind_name(object),
                    kustomization.namespace
                );
            }
        }
        assert!(seen > 0, "kubectl kustomize {dir} renders no container");
        if dir == "deploy/k8s/migrate" {
            assert!(
                objects.iter().any(|o| kind_name(o) == "Job/pgzm-migrate"),
                "{dir} does not render the coordinator Job pgzm-migrate"
            );
        }
        images.insert(kustomization.image);
    }
    assert_eq!(
        images.len(),
        1,
        "the kustomizations {KUSTOMIZATIONS:?} set different images ({images:?}): set the same in each"
    );
}

#[test]
fn every_kubernetes_object_validates() {
    let mut through_kustomizations = BTreeSet::new();
    for dir in KUSTOMIZATIONS {
        let kustomization = Kustomization::read(dir);
        through_kustomizations.extend(kustomization.resources.iter().cloned());
        let (yaml, objects) = kustomization.render();
        validate_rendered(dir, &yaml, objects.len());
    }
    let standalone: BTreeSet<String> = yaml_files(K8S_DIR)
        .into_iter()
        .filter(|f| !f.ends_with("/kustomization.yaml") && !through_kustomizations.contains(f))
        .collect();
    let expected: BTreeSet<String> = STANDALONE.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        standalone, expected,
        "manifests under {K8S_DIR} outside every kustomization: add them to one (or, for examples applied on their own, to STANDALONE in tests/tests/deploy/kubernetes.rs)"
    );
    for file in &standalone {
        let count = yaml_documents(&read(file), file).len();
        assert!(count > 0, "{file} holds no object");
        validate(&repo_root().join(file), file, count);
    }
}

/// The ports a NetworkPolicy's ingress rules open to any source (rules without `from`).
fn open_ports(policy: &Value) -> BTreeSet<i64> {
    policy["spec"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|rule| rule["from"].as_array().is_none_or(|from| from.is_empty()))
        .flat_map(|rule| rule["ports"].as_array().into_iter().flatten())
        .filter_map(|port| port["port"].as_i64())
        .collect()
}

/// Whether `selector`'s `matchLabels` all hold in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels[k] == *v)
}

#[test]
fn agents_probe_a_health_port_they_serve_and_the_policies_open() {
    let (_, objects) = Kustomization::read("deploy/k8s").render();
    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    let mut probed = 0;
    for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let template = &deployment["spec"]["template"];
        for container in containers(template) {
            let what = format!("{} container {}", kind_name(deployment), container["name"]);
            let args: Vec<&str> = container["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = container[probe]["grpc"]["port"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("{what}: {probe} is not a gRPC probe"));
                let served = args.iter().any(|a| {
                    a.strip_prefix("--health-listen=")
                        .and_then(|addr| addr.rsplit_once(':'))
                        .is_some_and(|(_, p)| p == port.to_string())
                });
                assert!(
                    served,
                    "{what}: {probe} asks port {port}, which no --health-listen=HOST:{port} serves"
                );
                let declared = container["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["containerPort"].as_i64() == Some(port));
                assert!(
                    declared,
                    "{what}: port {port} of its {probe} is not among its ports"
                );
                let labels = &template["metadata"]["labels"];
                let governing: Vec<&&Value> = policies
                    .iter()
                    .filter(|p| selects(&p["spec"]["podSelector"], labels))
                    .collect();
                for policy in governing {
                    assert!(
                        open_ports(policy).contains(&port),
                        "{what}: NetworkPolicy {} does not let the kubelet's {probe} reach port {port} (an ingress rule with that port and no `from`)",
                        kind_name(policy)
                    );
                }
                probed += 1;
            }
        }
    }
    assert!(
        probed >= 4,
        "expected readiness and liveness probes on both agents, saw {probed}"
    );
}
