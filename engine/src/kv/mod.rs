//! The paged KV cache's bookkeeping: the block hash (the wire contract with the gateway), the
//! block pool with its LRU free list and prefix-cache map, and the per-request manager.
//!
//! This is a pure core: no I/O, no model, no clock, no randomness. It accounts for every block
//! exactly; the scheduler (`engine::sched`) decides with it, the model runner writes KV into the
//! blocks it names, and the agent reports its [`CapacitySnapshot`] and [`BlockEvent`]s.

pub use kvroute_text::hash;
pub mod host;
pub mod manager;
pub mod pool;

pub use hash::{block_hashes, extend_block_hashes, hash_block, BlockHash};
pub use host::HostTier;
pub use manager::{CapacitySnapshot, KvConfig, KvCopies, KvError, KvManager, KvSeq, PrefixHit};
pub use pool::{BlockEvent, BlockId, BlockPool};
