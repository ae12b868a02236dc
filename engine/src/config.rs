//! Model hyperparameters, read from GGUF metadata (`llama.*`, `qwen2.*`) or a Hugging Face
//! `config.json`. Plain data; validated once when read (every size non-zero, heads divide
//! evenly), so the model code can trust it.

/// How rotary position embeddings pair up dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): llama.cpp's convention for GGUF `llama` models, whose
    /// converter permuted the Q/K weights to match.
    Interleaved,
    /// First half with second half (x[i], x[i + d/2]): Hugging Face's `rotate_half`, and
    /// llama.cpp's for `qwen2`.
    Neox,
}

/// Architecture family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f32,
    /// Context length the model was trained for.
    pub max_position_embeddings: usize,
    /// The output projection reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
}
