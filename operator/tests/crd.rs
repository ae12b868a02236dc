#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CRD as committed, and samples checked against it without a cluster.
//!
//! - drift: `kvroute crd` (the Rust types) must equal `deploy/crd.yaml` and the chart's copy;
//! - every sample under `deploy/samples/` passes the CRD's own OpenAPI schema (structural checks,
//!   as the API server's strict field validation would do them) AND its CEL rules, evaluated
//!   client-side by kube's `cel` feature (kube-cel) from the committed YAML;
//! - every sample under `operator/tests/samples/invalid/` is rejected, with the message its
//!   `# expect:` line names (so a validator that accepts everything fails this test).

use std::path::{Path, PathBuf};
use std::process::Command;

use kvroute_crd::{crd_yaml, ModelDeployment};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let generated = crd_yaml().unwrap();
    for rel in [
        "deploy/crd.yaml",
        "charts/kvroute/crds/modeldeployments.yaml",
    ] {
        let committed = read(&root().join(rel));
        assert!(
            committed == generated,
            "{rel} drifted from crd/src/resource.rs; regenerate with `cargo run -p kvroute-operator -- crd > {rel}`"
        );
    }
}

#[test]
fn kvroute_crd_command_prints_the_same_yaml() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), crd_yaml().unwrap());
}

/// The `openAPIV3Schema` of the committed CRD (what the API server would use).
fn committed_schema() -> Value {
    let crd: Value = serde_yaml::from_str(&read(&root().join("deploy/crd.yaml"))).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Structural validation of `v` against an OpenAPI v3 (Kubernetes structural) schema, the checks
/// the API server runs before CEL: types, required, enum, bounds, lengths, patterns, and unknown
/// fields (strict field validation).
fn check_schema(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errs.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            errs.push(format!("{path}: expected integer or string"));
        }
        return;
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(v) {
            errs.push(format!("{path}: {v} is not one of {options:?}"));
        }
    }
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = v.as_object() else {
                errs.push(format!("{path}: expected object"));
                return;
            };
            for req in schema["required"].as_array().into_iter().flatten() {
                let k = req.as_str().unwrap();
                if !obj.contains_key(k) {
                    errs.push(format!("{path}.{k}: required"));
                }
            }
            let props = schema["properties"].as_object();
            let extra = &schema["additionalProperties"];
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true);
            for (k, child) in obj {
                // The API server itself owns the root's apiVersion, kind and metadata.
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if let Some(s) = props.and_then(|m| m.get(k)) {
                    check_schema(s, child, &p, errs);
                } else if extra.is_object() {
                    check_schema(extra, child, &p, errs);
                } else if props.is_some() && !preserve {
                    errs.push(format!("{p}: unknown field"));
                }
            }
        }
        Some("array") => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_schema(&schema["items"], item, &format!("{path}[{i}]"), errs);
                }
            }
            None => errs.push(format!("{path}: expected array")),
        },
        Some("string") => match v.as_str() {
            Some(s) => {
                let n = s.chars().count() as u64;
                if schema["minLength"].as_u64().is_some_and(|m| n < m) {
                    errs.push(format!("{path}: shorter than {}", schema["minLength"]));
                }
                if schema["maxLength"].as_u64().is_some_and(|m| n > m) {
                    errs.push(format!("{path}: longer than {}", schema["maxLength"]));
                }
                if let Some(p) = schema["pattern"].as_str() {
                    if !regex::Regex::new(p).unwrap().is_match(s) {
                        errs.push(format!("{path}: {v} does not match {p}"));
                    }
                }
            }
            None => errs.push(format!("{path}: expected string")),
        },
        Some(t @ ("integer" | "number")) => {
            let ok = if t == "integer" {
                v.is_i64() || v.is_u64()
            } else {
                v.is_number()
            };
            if !ok {
                errs.push(format!("{path}: expected {t}"));
                return;
            }
            let x = v.as_f64().unwrap();
            if schema["minimum"].as_f64().is_some_and(|m| x < m) {
                errs.push(format!("{path}: below minimum {}", schema["minimum"]));
            }
            if schema["maximum"].as_f64().is_some_and(|m| x > m) {
                errs.push(format!("{path}: above maximum {}", schema["maximum"]));
            }
        }
        Some("boolean") if !v.is_boolean() => errs.push(format!("{path}: expected boolean")),
        _ => {}
    }
}

/// All problems with `doc` under the committed CRD: structural first, then CEL.
fn problems(doc: &Value) -> Vec<String> {
    let schema = committed_schema();
    let mut errs = Vec::new();
    check_schema(&schema, doc, "", &mut errs);
    if errs.is_empty() {
        if let Err(cel) = kube::core::cel::Validator::new().validate(&schema, doc, None) {
            errs.extend(
                cel.as_slice()
                    .iter()
                    .map(|e| format!("{}: {}", e.rule, e.message)),
            );
        }
    }
    errs
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn good_samples_pass_schema_and_cel_and_deserialize() {
    let files = yaml_files(&root().join("deploy/samples"));
    assert!(files.len() >= 3, "expected the committed samples");
    for f in files {
        let text = read(&f);
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        let errs = problems(&doc);
        assert!(errs.is_empty(), "{}: {errs:#?}", f.display());
        let md: ModelDeployment = serde_yaml::from_str(&text).unwrap();
        md.spec
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

#[test]
fn invalid_samples_are_rejected_with_the_expected_message() {
    let files = yaml_files(&root().join("operator/tests/samples/invalid"));
    assert!(files.len() >= 10);
    for f in files {
        let text = read(&f);
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", f.display()))
            .to_string();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        let errs = problems(&doc);
        assert!(
            errs.iter().any(|e| e.contains(&expect)),
            "{}: expected an error containing {expect:?}, got {errs:#?}",
            f.display()
        );
        // The controller's own check agrees wherever the document still deserializes (unknown
        // fields are pruned by the API server, so serde ignoring them is the same behaviour).
        if expect.contains("unknown field") {
            continue;
        }
        if let Ok(md) = serde_yaml::from_str::<ModelDeployment>(&text) {
            assert!(
                md.spec.validate().is_err(),
                "{}: spec.validate() accepted it",
                f.display()
            );
        }
    }
}

#[test]
fn cel_rules_are_evaluated_not_just_present() {
    // The same document flips between accepted and rejected on each CEL-only rule.
    let base = serde_json::json!({
        "apiVersion": "kvroute.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": {"model": {"name": "m", "hostPath": "/m.gguf"}, "engine": {}}
    });
    assert!(problems(&base).is_empty(), "{:?}", problems(&base));
    for (field, good, bad) in [
        ("blockSize", 32.into(), Value::from(24)),
        ("gpuMemoryUtilization", Value::from(1), Value::from(-0.5)),
        (
            "gpuMemoryUtilization",
            Value::from(0.25),
            Value::from(1.0001),
        ),
    ] {
        let mut ok = base.clone();
        ok["spec"]["engine"][field] = good;
        assert!(problems(&ok).is_empty(), "{field}: {:?}", problems(&ok));
        let mut ko = base.clone();
        ko["spec"]["engine"][field] = bad;
        assert!(!problems(&ko).is_empty(), "{field} should be rejected");
    }
    let mut zero = base.clone();
    zero["spec"]["replicas"] = 0.into();
    assert!(problems(&zero).is_empty());
    zero["spec"]["replicas"] = (-3).into();
    assert!(!problems(&zero).is_empty());
}

/// Every `x-kubernetes-validations` rule in `schema`, with the sub-schema it sits on.
fn rules(schema: &Value, out: &mut Vec<(String, Value)>) {
    if let Some(vs) = schema["x-kubernetes-validations"].as_array() {
        for v in vs {
            out.push((v["rule"].as_str().unwrap().to_string(), schema.clone()));
        }
    }
    for key in ["properties"] {
        if let Some(m) = schema[key].as_object() {
            for child in m.values() {
                rules(child, out);
            }
        }
    }
    for key in ["items", "additionalProperties"] {
        if schema[key].is_object() {
            rules(&schema[key], out);
        }
    }
}

#[test]
fn cel_rules_compile_and_stay_in_crd_scope() {
    use kube::core::cel::{analyze_rule, compile_schema, ScopeContext};
    let schema = committed_schema();
    let compiled = compile_schema(&schema);
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
    let mut found = Vec::new();
    rules(&schema, &mut found);
    assert_eq!(
        found.len(),
        5,
        "the five CEL rules of the CRD: {:?}",
        found.iter().map(|(r, _)| r).collect::<Vec<_>>()
    );
    for (rule, at) in found {
        let warnings = analyze_rule(&rule, &compile_schema(&at), ScopeContext::CrdValidation);
        assert!(warnings.is_empty(), "{rule}: {warnings:?}");
    }
    // The analysis does flag what the API server would refuse (an admission-policy variable).
    let bad = analyze_rule(
        "object.spec.replicas >= 0",
        &compiled,
        ScopeContext::CrdValidation,
    );
    assert!(!bad.is_empty(), "scope analysis flagged nothing");
    assert!(compile_schema(
        &serde_json::json!({"type": "integer", "x-kubernetes-validations": [{"rule": "self >="}]})
    )
    .has_errors());
}
