//! The shared bearer token between gateways and agents: how it is read from its file and how a
//! presented one is checked.
//!
//! An agent started with a token accepts HTTP requests (except `/health`, `/ready` and
//! `/metrics`) and gRPC calls only with `authorization: Bearer <token>`; gateways send it. The
//! token file holds the token alone (surrounding whitespace is ignored).

/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Shortest token accepted (a guessable token is no token).
pub const MIN_TOKEN_LEN: usize = 16;

/// Reads a token file: one token of [`MIN_TOKEN_LEN`]..=[`MAX_TOKEN_LEN`] visible ASCII
/// characters. Errors name the file, never the token.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > (MAX_TOKEN_LEN + 64) as u64 {
        return Err(format!(
            "{}: {} bytes is too large for a token file",
            path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    check_token(text.trim()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.trim().to_string())
}

/// Checks a token's form.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "a token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters long (this one has {})",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token may hold only visible ASCII characters".into());
    }
    Ok(())
}

/// Whether an `Authorization` header value carries `token` as a bearer token. Compares in
/// time independent of where the two differ.
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (presented.trim().as_bytes(), token.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `Authorization` header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0123456789abcdef-token";

    #[test]
    fn only_the_exact_bearer_token_matches() {
        assert!(bearer_matches(Some(&bearer(T)), T));
        assert!(bearer_matches(Some(&format!("Bearer  {T} ")), T));
        for bad in [
            None,
            Some(""),
            Some(T),
            Some("Basic 0123456789abcdef-token"),
            Some("Bearer 0123456789abcdef-tokeN"),
            Some("Bearer 0123456789abcdef-toke"),
            Some("Bearer 0123456789abcdef-token-and-more"),
        ] {
            assert!(!bearer_matches(bad, T), "{bad:?}");
        }
    }

    #[test]
    fn token_files_are_checked_and_errors_never_show_the_token() {
        let dir = std::env::temp_dir().join(format!("kvroute-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let f = dir.join("token");
        std::fs::write(&f, format!("  {T}\n")).unwrap_or_default();
        assert_eq!(read_token_file(&f).as_deref(), Ok(T));
        for bad in [
            "short",
            "has a space inside it!!",
            "tab\there-and-more-chars",
        ] {
            std::fs::write(&f, bad).unwrap_or_default();
            let e = read_token_file(&f).unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
        std::fs::write(&f, "x".repeat(MAX_TOKEN_LEN + 100)).unwrap_or_default();
        assert!(read_token_file(&f).unwrap_err().contains("too large"));
        assert!(read_token_file(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
