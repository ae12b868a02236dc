//! A child process killed when dropped. Shared by this crate's tests and
//! `operator/tests/gateway_up.rs` (included there by path).

/// A child process killed (and reaped) when dropped, so a failing test leaves no `kvroute up`
/// behind (its agents die with it: they have a parent-death signal).
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
