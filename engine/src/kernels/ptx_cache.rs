//! PTX compiled by NVRTC, kept on disk between runs so a restart does not recompile.
//!
//! Keys come from [`super::cache_key`] (source, options, architecture, NVRTC version), so a
//! changed kernel or compiler never hits a stale entry. Writes go to a temporary file renamed into
//! place: concurrent agents on one node see a whole file or none. A cache that cannot be read or
//! written only costs a recompile.

use std::path::{Path, PathBuf};

/// A folder of `<key>.ptx` files.
#[derive(Debug, Clone)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// `$KVROUTE_CACHE/ptx`, else `$XDG_CACHE_HOME/kvroute/ptx`, else `~/.cache/kvroute/ptx`;
    /// `None` when none of these can be named.
    pub fn default_dir() -> Option<PathBuf> {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = env("KVROUTE_CACHE")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("kvroute")))
            .or_else(|| env("HOME").map(|d| d.join(".cache").join("kvroute")))?;
        Some(root.join("ptx"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.ptx"))
    }

    /// The cached PTX for `key`, if present and readable.
    pub fn get(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.path(key))
            .ok()
            .filter(|s| s.contains(".entry"))
    }

    /// Stores `ptx` under `key`.
    pub fn put(&self, key: &str, ptx: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{key}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, ptx)?;
        std::fs::rename(&tmp, self.path(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_then_get_round_trips_and_missing_keys_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("ptx"));
        assert_eq!(cache.get("k"), None);
        cache.put("k", ".visible .entry f()\n").unwrap();
        assert_eq!(cache.get("k").as_deref(), Some(".visible .entry f()\n"));
        // A truncated or foreign file is not PTX: treated as a miss.
        std::fs::write(cache.dir().join("bad.ptx"), "garbage").unwrap();
        assert_eq!(cache.get("bad"), None);
    }
}
