//! Where model weights come from: a uniform view over GGUF and safetensors files.
//!
//! Tensors are named with GGUF's canonical names (`token_embd.weight`, `blk.{i}.attn_q.weight`,
//! `blk.{i}.attn_k.weight`, `blk.{i}.attn_v.weight`, `blk.{i}.attn_output.weight`,
//! `blk.{i}.attn_norm.weight`, `blk.{i}.ffn_gate.weight`, `blk.{i}.ffn_up.weight`,
//! `blk.{i}.ffn_down.weight`, `blk.{i}.ffn_norm.weight`, `output_norm.weight`, `output.weight`,
//! and for Qwen2 `blk.{i}.attn_{q,k,v}.bias`); a safetensors source maps Hugging Face names onto
//! these. Views borrow the memory map: no copies. This module never interprets tensor contents.

use crate::quant::GgmlType;

/// A borrowed tensor: its element type, its shape in ggml order (`shape[0]` is the innermost,
/// contiguous dimension: for a weight matrix `[in_features, out_features]`, i.e. one row of
/// `in_features` elements per output), and its raw bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: GgmlType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements.
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Anything that can hand out tensors by canonical name.
pub trait WeightSource: Send + Sync {
    /// The tensor called `name`, or `None` if the file has none by that name.
    fn tensor(&self, name: &str) -> Option<TensorView<'_>>;
    /// All tensor names, in file order.
    fn names(&self) -> Vec<String>;
}
