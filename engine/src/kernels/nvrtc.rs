//! NVRTC, NVIDIA's run-time CUDA C compiler, loaded as a shared library at run time.
//!
//! Owns finding `libnvrtc`, calling it, and turning its failures into errors: a build of kvroute
//! never links against CUDA, and a machine without NVRTC gets [`NvrtcError::NotFound`], never a
//! panic. Only the eight calls kvroute needs are bound, so this works the same with or without the
//! `cuda` feature (the CPU machine's test command compiles every kernel through it).
//!
//! Where it looks: the folder in `KVROUTE_NVRTC_LIB_DIR` when that is set (and only there, so a
//! test run with it set proves that folder's library works); otherwise the dynamic linker's search
//! path, then `CUDA_PATH`/`CUDA_HOME` and `/usr/local/cuda`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Environment variable naming the folder that holds `libnvrtc.so.*`.
pub const LIB_DIR_ENV: &str = "KVROUTE_NVRTC_LIB_DIR";

/// File names tried in a folder, newest CUDA major first.
const LIB_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error("NVRTC library not found (tried: {tried}); set {LIB_DIR_ENV} to the folder holding libnvrtc.so.13")]
    NotFound { tried: String },
    #[error("NVRTC library {path} lacks symbol {symbol}: {source}")]
    Symbol {
        path: String,
        symbol: &'static str,
        source: libloading::Error,
    },
    #[error("NVRTC {call} failed: {message}")]
    Call { call: &'static str, message: String },
    #[error("NVRTC could not compile {program} for {arch}:\n{log}")]
    Compile {
        program: String,
        arch: String,
        log: String,
    },
    #[error("kernel source or option contains a NUL byte")]
    Nul,
}

type Prog = *mut c_void;
type Res = c_int;

struct Api {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Res,
    error_string: unsafe extern "C" fn(Res) -> *const c_char,
    create: unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Res,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> Res,
    ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> Res,
    ptx: unsafe extern "C" fn(Prog, *mut c_char) -> Res,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> Res,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> Res,
    destroy: unsafe extern "C" fn(*mut Prog) -> Res,
}

/// A loaded NVRTC library.
pub struct Nvrtc {
    api: Api,
    path: PathBuf,
    version: (i32, i32),
    // Keeps the library mapped while the function pointers in `api` are alive.
    _lib: libloading::Library,
    // NVRTC opens `libnvrtc-builtins.so.X.Y` by bare name; loaded first from NVRTC's own folder,
    // the dynamic linker finds it already mapped (by its soname) without LD_LIBRARY_PATH.
    _builtins: Option<libloading::Library>,
}

impl std::fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvrtc")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish()
    }
}

/// PTX text for one compiled program.
#[derive(Debug, Clone)]
pub struct Ptx {
    pub text: String,
    /// The compiler's messages (warnings), empty when it had none.
    pub log: String,
}

impl Ptx {
    /// Names of the kernels (`.entry` directives) the PTX defines.
    pub fn entries(&self) -> Vec<&str> {
        self.text
            .lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix(".visible .entry ")?;
                Some(rest.split('(').next().unwrap_or(rest).trim())
            })
            .collect()
    }
}

impl Ptx {
    /// The parameter types of kernel `entry` as PTX declares them, one letter each: `p` for 8
    /// bytes (a pointer or an i64), `i` for a 32-bit integer, `f` for an f32; `None` if the PTX has
    /// no such entry.
    pub fn params(&self, entry: &str) -> Option<String> {
        let head = format!(".entry {entry}(");
        let start = self.text.find(&head)? + head.len();
        let body = &self.text[start..];
        let body = &body[..body.find(')')?];
        Some(
            body.lines()
                .filter_map(|l| {
                    let l = l.trim();
                    let ty = l.strip_prefix(".param ")?.split_whitespace().next()?;
                    Some(match ty {
                        ".u64" | ".s64" | ".b64" => 'p',
                        ".u32" | ".s32" | ".b32" => 'i',
                        ".f32" => 'f',
                        _ => '?',
                    })
                })
                .collect(),
        )
    }
}

impl Nvrtc {
    /// The process-wide library, loaded on first use.
    pub fn global() -> Result<&'static Nvrtc, NvrtcError> {
        static LIB: OnceLock<Result<Nvrtc, String>> = OnceLock::new();
        match LIB.get_or_init(|| Nvrtc::load().map_err(|e| e.to_string())) {
            Ok(n) => Ok(n),
            Err(tried) => Err(NvrtcError::NotFound {
                tried: tried.clone(),
            }),
        }
    }

    /// Finds and loads the library (see the module docs for where it looks).
    pub fn load() -> Result<Nvrtc, NvrtcError> {
        let mut tried = Vec::new();
        for candidate in candidates() {
            let builtins = candidate.parent().and_then(load_builtins);
            // SAFETY: loading NVRTC runs its initializers, which have no preconditions.
            match unsafe { libloading::Library::new(&candidate) } {
                Ok(lib) => return Nvrtc::from_library(lib, builtins, candidate),
                Err(e) => tried.push(format!("{} ({e})", candidate.display())),
            }
        }
        Err(NvrtcError::NotFound {
            tried: tried.join("; "),
        })
    }

    fn from_library(
        lib: libloading::Library,
        builtins: Option<libloading::Library>,
        path: PathBuf,
    ) -> Result<Nvrtc, NvrtcError> {
        fn sym<T: Copy>(
            lib: &libloading::Library,
            path: &Path,
            name: &'static str,
        ) -> Result<T, NvrtcError> {
            // SAFETY: each symbol is looked up with the C signature from nvrtc.h that `T` spells.
            unsafe { lib.get::<T>(name.as_bytes()) }
                .map(|s| *s)
                .map_err(|source| NvrtcError::Symbol {
                    path: path.display().to_string(),
                    symbol: name,
                    source,
                })
        }
        let api = Api {
            version: sym(&lib, &path, "nvrtcVersion")?,
            error_string: sym(&lib, &path, "nvrtcGetErrorString")?,
            create: sym(&lib, &path, "nvrtcCreateProgram")?,
            compile: sym(&lib, &path, "nvrtcCompileProgram")?,
            ptx_size: sym(&lib, &path, "nvrtcGetPTXSize")?,
            ptx: sym(&lib, &path, "nvrtcGetPTX")?,
            log_size: sym(&lib, &path, "nvrtcGetProgramLogSize")?,
            log: sym(&lib, &path, "nvrtcGetProgramLog")?,
            destroy: sym(&lib, &path, "nvrtcDestroyProgram")?,
        };
        let mut n = Nvrtc {
            api,
            path,
            version: (0, 0),
            _lib: lib,
            _builtins: builtins,
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: both pointers are valid for writes.
        let r = unsafe { (n.api.version)(&mut major, &mut minor) };
        n.check("nvrtcVersion", r)?;
        n.version = (major, minor);
        Ok(n)
    }

    /// Where the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// NVRTC's (major, minor) version, e.g. (13, 0).
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    fn check(&self, call: &'static str, r: Res) -> Result<(), NvrtcError> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
        let p = unsafe { (self.api.error_string)(r) };
        let message = if p.is_null() {
            format!("error {r}")
        } else {
            // SAFETY: non-null, NUL-terminated, static (see above).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Err(NvrtcError::Call { call, message })
    }

    /// Compiles CUDA C `source` to PTX with the given options (e.g.
    /// `--gpu-architecture=compute_90`). `name` labels the program in messages.
    pub fn compile(&self, name: &str, source: &str, options: &[String]) -> Result<Ptx, NvrtcError> {
        let c_src = CString::new(source).map_err(|_| NvrtcError::Nul)?;
        let c_name = CString::new(name).map_err(|_| NvrtcError::Nul)?;
        let c_opts = options
            .iter()
            .map(|o| CString::new(o.as_str()).map_err(|_| NvrtcError::Nul))
            .collect::<Result<Vec<_>, _>>()?;
        let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
        let n_opts = c_int::try_from(opt_ptrs.len()).map_err(|_| NvrtcError::Call {
            call: "nvrtcCompileProgram",
            message: "too many options".into(),
        })?;

        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; zero headers are passed as null arrays.
        let r = unsafe {
            (self.api.create)(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check("nvrtcCreateProgram", r)?;
        let program = Program {
            api: &self.api,
            prog,
        };

        // SAFETY: `prog` is a live program; the option pointers are valid for the call.
        let compiled = unsafe { (self.api.compile)(program.prog, n_opts, opt_ptrs.as_ptr()) };
        let log = program.log()?;
        if compiled != 0 {
            let arch = options
                .iter()
                .find_map(|o| o.strip_prefix("--gpu-architecture="))
                .unwrap_or("default")
                .to_string();
            return Err(NvrtcError::Compile {
                program: name.to_string(),
                arch,
                log,
            });
        }
        let mut size = 0usize;
        // SAFETY: valid program and out-pointer.
        self.check("nvrtcGetPTXSize", unsafe {
            (self.api.ptx_size)(program.prog, &mut size)
        })?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: `buf` holds `size` bytes, as NVRTC asked for.
        self.check("nvrtcGetPTX", unsafe {
            (self.api.ptx)(program.prog, buf.as_mut_ptr().cast())
        })?;
        Ok(Ptx {
            text: c_buf_to_string(buf),
            log,
        })
    }
}

/// Destroys the NVRTC program when dropped, whichever way `compile` returns.
struct Program<'a> {
    api: &'a Api,
    prog: Prog,
}

impl Program<'_> {
    fn log(&self) -> Result<String, NvrtcError> {
        let mut size = 0usize;
        // SAFETY: valid program and out-pointer.
        let r = unsafe { (self.api.log_size)(self.prog, &mut size) };
        if r != 0 {
            return Ok(String::new());
        }
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: `buf` holds `size` bytes, as NVRTC asked for.
        let r = unsafe { (self.api.log)(self.prog, buf.as_mut_ptr().cast()) };
        if r != 0 {
            return Ok(String::new());
        }
        Ok(c_buf_to_string(buf).trim().to_string())
    }
}

impl Drop for Program<'_> {
    fn drop(&mut self) {
        // SAFETY: `prog` came from nvrtcCreateProgram and is destroyed once, here.
        unsafe {
            (self.api.destroy)(&mut self.prog);
        }
    }
}

fn c_buf_to_string(mut buf: Vec<u8>) -> String {
    if let Some(nul) = buf.iter().position(|&b| b == 0) {
        buf.truncate(nul);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Loads `libnvrtc-builtins.so.*` from `dir` (not the `.alt.` variant), if there is one.
fn load_builtins(dir: &Path) -> Option<libloading::Library> {
    if dir.as_os_str().is_empty() {
        return None;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so."))
        })
        .collect();
    found.sort();
    // SAFETY: as for NVRTC itself: its initializers have no preconditions.
    found
        .iter()
        .rev()
        .find_map(|p| unsafe { libloading::Library::new(p) }.ok())
}

/// Paths to try, in order.
fn candidates() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os(LIB_DIR_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return LIB_NAMES.iter().map(|n| dir.join(n)).collect();
    }
    // Bare names go through the dynamic linker's search path (LD_LIBRARY_PATH, ld.so.cache).
    let mut out: Vec<PathBuf> = LIB_NAMES.iter().map(PathBuf::from).collect();
    let mut roots: Vec<PathBuf> = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    for root in roots {
        for sub in ["lib64", "lib"] {
            out.extend(LIB_NAMES.iter().map(|n| root.join(sub).join(n)));
        }
    }
    out
}
