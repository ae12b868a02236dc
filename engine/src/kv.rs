//! The paged KV-cache block pool and prefix cache (placeholder until the KV-core work lands).
