//! Text ↔ token ids: the model's own tokenizer, built from GGUF metadata or a Hugging Face
//! `tokenizer.json`, plus streaming detokenization.
//!
//! Owns tokenizer construction (vocabulary, merges, the pre-tokenizer that matches llama.cpp's for
//! the model's `tokenizer.ggml.pre`, special tokens), a serialized form that the gateway fetches
//! once from an agent and rebuilds the identical tokenizer from, and [`StreamDecoder`], which turns
//! a stream of ids into text deltas that never end inside a UTF-8 character. The BPE itself is the
//! `tokenizers` crate's. This module never reads files other than the ones it is pointed at and
//! never panics on input: unknown ids decode to nothing, bad metadata is an error.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};
use tracing::debug;

/// Result alias for this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata lacks {0:?}")]
    Missing(&'static str),
    #[error("tokenizer metadata {key:?} is invalid: {why}")]
    BadValue { key: &'static str, why: String },
    #[error("unsupported tokenizer model {0:?} (kvroute builds \"gpt2\" byte-level BPE from GGUF; use a tokenizer.json for others)")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer {0:?} (tokenizer.ggml.pre); supported: {SUPPORTED_PRE}")]
    UnsupportedPre(String),
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
    #[error("cannot tokenize: {0}")]
    Encode(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid tokenizer JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("serialized tokenizer has format {found:?}, expected {FORMAT:?}")]
    Format { found: String },
}

/// The `tokenizer.ggml.pre` values this module knows, for error messages.
pub const SUPPORTED_PRE: &str = "default, gpt2, smollm, starcoder, refact, command-r, codeshell, exaone, minerva, llama3 (llama-bpe), qwen2";

/// Tag of the serialized form, bumped when it changes incompatibly.
pub const FORMAT: &str = "kvroute-tokenizer/1";

// llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`. The GPT-2 one,
// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`, is built into
// `tokenizers`' ByteLevel pre-tokenizer (with a final `|\s+`, which only matters for trailing
// whitespace, where llama.cpp's hand-written splitter behaves the same).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What the serialized form carries besides the `tokenizers` JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Extras {
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    /// Extra ids that also end generation (e.g. an end-of-turn token distinct from EOS).
    stop_ids: Vec<u32>,
    /// The model's Jinja chat template, if it has one.
    chat_template: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Serialized {
    format: String,
    #[serde(flatten)]
    extras: Extras,
    tokenizer: serde_json::Value,
}

struct Inner {
    /// Recognises special tokens written in the text.
    hf: tokenizers::Tokenizer,
    /// The same tokenizer with special-token matching turned off: text is taken literally.
    hf_literal: tokenizers::Tokenizer,
    extras: Extras,
    special: HashSet<u32>,
}

/// A model's tokenizer. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.inner.extras.bos_id)
            .field("eos", &self.inner.extras.eos_id)
            .finish()
    }
}

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

/// A model file's metadata, as the tokenizer reads it: GGUF's key/value pairs
/// (`tokenizer.ggml.*`). The engine's GGUF reader implements it; nothing else here knows the file
/// format.
pub trait Metadata {
    type Value: MetaValue;
    /// The value under `key`, if the file has one.
    fn get(&self, key: &str) -> Option<&Self::Value>;
}

/// One metadata value.
pub trait MetaValue: Sized {
    fn as_str(&self) -> Option<&str>;
    /// An unsigned integer of any width.
    fn as_u64(&self) -> Option<u64>;
    /// A signed or unsigned integer that fits.
    fn as_i64(&self) -> Option<i64>;
    fn as_bool(&self) -> Option<bool>;
    /// The items of an array.
    fn items(&self) -> Option<&[Self]>;
    /// What the value is, for error messages ("string", "array of 3 U32", ...).
    fn describe(&self) -> String;
}

fn meta_str<'a, G: Metadata>(g: &'a G, key: &'static str) -> Result<Option<&'a str>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or(TokenizerError::BadValue {
            key,
            why: format!("expected a string, found {}", v.describe()),
        }),
    }
}

fn meta_id<G: Metadata>(g: &G, key: &'static str, vocab: usize) -> Result<Option<u32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let id = v.as_u64().ok_or(TokenizerError::BadValue {
                key,
                why: format!("expected a token id, found {}", v.describe()),
            })?;
            // Some converters write -1 (as u32::MAX) for "none".
            if id == u64::from(u32::MAX) {
                return Ok(None);
            }
            if id >= vocab as u64 {
                return Err(TokenizerError::BadValue {
                    key,
                    why: format!("token id {id} is outside the vocabulary of {vocab}"),
                });
            }
            Ok(Some(id as u32))
        }
    }
}

fn meta_bool<G: Metadata>(g: &G, key: &'static str) -> Result<Option<bool>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or(TokenizerError::BadValue {
            key,
            why: format!("expected a bool, found {}", v.describe()),
        }),
    }
}

fn meta_strings<'a, G: Metadata>(g: &'a G, key: &'static str) -> Result<Option<Vec<&'a str>>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.items() {
            Some(items) => items
                .iter()
                .map(|v| {
                    v.as_str().ok_or(TokenizerError::BadValue {
                        key,
                        why: format!("expected strings, found {}", v.describe()),
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            None => Err(TokenizerError::BadValue {
                key,
                why: format!("expected an array of strings, found {}", v.describe()),
            }),
        },
    }
}

/// The pre-tokenizer llama.cpp uses for `pre`, as a `tokenizers` pre-tokenizer, and whether BPE
/// should look a whole pre-token up in the vocabulary before merging (llama3's `ignore_merges`).
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(build_err)?
        .into())
    };
    // The regex has done the splitting; ByteLevel only maps bytes to its printable alphabet.
    let bytes_only = || -> PreTokenizerWrapper { ByteLevel::new(false, false, false).into() };
    let gpt2 = || -> PreTokenizerWrapper { ByteLevel::new(false, false, true).into() };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => (gpt2(), false),
        // Digits one by one, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            Sequence::new(vec![Digits::new(true).into(), gpt2()]).into(),
            false,
        ),
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" | "falcon3" => (
            Sequence::new(vec![split(LLAMA3_REGEX)?, bytes_only()]).into(),
            true,
        ),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" | "hunyuan" => (
            Sequence::new(vec![split(QWEN2_REGEX)?, bytes_only()]).into(),
            false,
        ),
        other => return Err(TokenizerError::UnsupportedPre(other.to_owned())),
    })
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model = "gpt2"`: byte-level BPE
    /// with `tokenizer.ggml.tokens`, `.merges`, `.token_type`, `.pre`, special ids and
    /// `.add_bos_token`), plus its `tokenizer.chat_template`.
    pub fn from_gguf<G: Metadata>(g: &G) -> Result<Self> {
        let model = meta_str(g, "tokenizer.ggml.model")?
            .ok_or(TokenizerError::Missing("tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let tokens = meta_strings(g, "tokenizer.ggml.tokens")?
            .ok_or(TokenizerError::Missing("tokenizer.ggml.tokens"))?;
        let merges = meta_strings(g, "tokenizer.ggml.merges")?
            .ok_or(TokenizerError::Missing("tokenizer.ggml.merges"))?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(TokenizerError::BadValue {
                key: "tokenizer.ggml.tokens",
                why: format!("{n} tokens"),
            });
        }
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").map(|v| (v, v.items())) {
            None => vec![1; n],
            Some((_, Some(items))) if items.len() == n => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or(TokenizerError::BadValue {
                        key: "tokenizer.ggml.token_type",
                        why: format!("expected integers, found {}", v.describe()),
                    })
                })
                .collect::<Result<_>>()?,
            Some((v, _)) => {
                return Err(TokenizerError::BadValue {
                    key: "tokenizer.ggml.token_type",
                    why: format!("expected an array of {n} integers, found {}", v.describe()),
                })
            }
        };
        let pre = meta_str(g, "tokenizer.ggml.pre")?.unwrap_or("default");
        let (pre_tok, ignore_merges) = pre_tokenizer(pre)?;

        // llama.cpp maps text to the last id that has it; do the same.
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::BadValue {
                        key: "tokenizer.ggml.merges",
                        why: format!("merge #{i} {m:?} is not two tokens separated by a space"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(build_err)?;

        let mut hf = tokenizers::Tokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(pre_tok));
        hf.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));

        // Control tokens are special: matched in text only when asked, skipped when decoding.
        // User-defined tokens are always matched, as llama.cpp does.
        let mut specials = Vec::new();
        let mut user = Vec::new();
        for (i, &t) in types.iter().enumerate() {
            // An empty added token would match everywhere; no real vocabulary has one.
            if tokens[i].is_empty() {
                continue;
            }
            match t {
                TOKEN_TYPE_CONTROL => specials.push(AddedToken::from(tokens[i], true)),
                TOKEN_TYPE_USER_DEFINED => {
                    user.push(AddedToken::from(tokens[i], false).normalized(false))
                }
                _ => {}
            }
        }
        hf.add_special_tokens(&specials);
        hf.add_tokens(&user);

        let bos_id = meta_id(g, "tokenizer.ggml.bos_token_id", n)?;
        let eos_id = meta_id(g, "tokenizer.ggml.eos_token_id", n)?;
        let pad_id = meta_id(g, "tokenizer.ggml.padding_token_id", n)?;
        let eot_id = meta_id(g, "tokenizer.ggml.eot_token_id", n)?;
        // llama.cpp adds no BOS to BPE vocabularies unless the file asks for it.
        let add_bos = meta_bool(g, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = meta_bool(g, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let mut single = Vec::new();
        let mut post_specials = Vec::new();
        if add_bos {
            let id = bos_id.ok_or(TokenizerError::Missing("tokenizer.ggml.bos_token_id"))?;
            single.push(tokens[id as usize].to_owned());
            post_specials.push((tokens[id as usize].to_owned(), id));
        }
        single.push("$A".to_owned());
        if add_eos {
            let id = eos_id.ok_or(TokenizerError::Missing("tokenizer.ggml.eos_token_id"))?;
            single.push(tokens[id as usize].to_owned());
            post_specials.push((tokens[id as usize].to_owned(), id));
        }
        if !post_specials.is_empty() {
            let post = TemplateProcessing::builder()
                .try_single(single.join(" "))
                .map_err(build_err)?
                .special_tokens(post_specials)
                .build()
                .map_err(build_err)?;
            hf.with_post_processor(Some(post));
        }

        let extras = Extras {
            bos_id,
            eos_id,
            pad_id,
            stop_ids: eot_id.filter(|&e| Some(e) != eos_id).into_iter().collect(),
            chat_template: meta_str(g, "tokenizer.chat_template")?.map(str::to_owned),
        };
        debug!(
            vocab = n,
            pre,
            add_bos,
            specials = specials.len(),
            "built tokenizer from GGUF"
        );
        Self::assemble(hf, extras)
    }

    /// Builds the tokenizer of a Hugging Face folder: `tokenizer.json`, and when present
    /// `tokenizer_config.json` for the BOS/EOS tokens and the chat template.
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TokenizerError::Io {
                path: p.to_owned(),
                source,
            })
        };
        let json = read(tokenizer_json)?;
        let config = match tokenizer_config {
            Some(p) => Some(read(p)?),
            None => None,
        };
        Self::from_hf_json(&json, config.as_deref())
    }

    /// Like [`Tokenizer::from_hf_files`], from the files' contents.
    pub fn from_hf_json(tokenizer_json: &str, tokenizer_config: Option<&str>) -> Result<Self> {
        let hf: tokenizers::Tokenizer = tokenizer_json.parse().map_err(build_err)?;
        let config: serde_json::Value = match tokenizer_config {
            Some(c) => serde_json::from_str(c)?,
            None => serde_json::Value::Null,
        };
        // Tokens in tokenizer_config.json are a string or an AddedToken object {"content": ..}.
        let token_of = |key: &str| -> Option<String> {
            let v = config.get(key)?;
            v.as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))
                .map(str::to_owned)
        };
        let id_of = |key: &str| token_of(key).and_then(|t| hf.token_to_id(&t));
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default", else the first.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        };
        let extras = Extras {
            bos_id: id_of("bos_token"),
            eos_id: id_of("eos_token"),
            pad_id: id_of("pad_token"),
            stop_ids: Vec::new(),
            chat_template,
        };
        Self::assemble(hf, extras)
    }

    fn assemble(hf: tokenizers::Tokenizer, extras: Extras) -> Result<Self> {
        let mut hf_literal = hf.clone();
        hf_literal.set_encode_special_tokens(true);
        let special = hf
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                hf,
                hf_literal,
                extras,
                special,
            }),
        })
    }

    /// Token ids for `text`. With `add_special`, special tokens written in the text
    /// (`<|im_start|>`) are recognised as single tokens and the model's BOS/EOS are added if its
    /// config asks for them (llama.cpp's `add_special` + `parse_special`); without, the text is
    /// tokenized literally and nothing is added.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let tok = if add_special {
            &self.inner.hf
        } else {
            &self.inner.hf_literal
        };
        let enc = tok
            .encode_fast(text, add_special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special (control) tokens left out, unknown ids skipped. Invalid UTF-8
    /// (a sequence cut inside a character) shows as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_opts(ids, true)
    }

    /// The text of `ids`, special tokens included (`<|im_end|>`).
    pub fn decode_with_special(&self, ids: &[u32]) -> String {
        self.decode_opts(ids, false)
    }

    fn decode_opts(&self, ids: &[u32], skip_special: bool) -> String {
        match self.inner.hf.decode(ids, skip_special) {
            Ok(s) => s,
            Err(e) => {
                // The byte-level and sentencepiece decoders do not fail; a custom tokenizer.json
                // decoder might. Text is best effort here, never a crash.
                tracing::warn!(error = %e, "decode failed");
                String::new()
            }
        }
    }

    /// The vocabulary entry of `id` as stored (byte-level pieces look like `Ġthe`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.hf.id_to_token(id)
    }

    /// The id of the vocabulary entry `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.hf.token_to_id(text)
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special.contains(&id)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.extras.bos_id
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.inner.extras.eos_id
    }

    /// Padding id.
    pub fn pad_id(&self) -> Option<u32> {
        self.inner.extras.pad_id
    }

    /// Every id that ends generation: EOS and, where the model has one, end-of-turn.
    pub fn stop_ids(&self) -> Vec<u32> {
        self.inner
            .extras
            .eos_id
            .into_iter()
            .chain(self.inner.extras.stop_ids.iter().copied())
            .collect()
    }

    /// The text of the BOS token (for chat templates).
    pub fn bos_token(&self) -> Option<String> {
        self.bos_id().and_then(|id| self.token_text(id))
    }

    /// The text of the EOS token (for chat templates).
    pub fn eos_token(&self) -> Option<String> {
        self.eos_id().and_then(|id| self.token_text(id))
    }

    /// The model's Jinja chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.extras.chat_template.as_deref()
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.hf.get_vocab_size(true)
    }

    /// The serialized form: a JSON document from which [`Tokenizer::from_json`] rebuilds a
    /// tokenizer that gives the same ids for every text.
    pub fn to_json(&self) -> Result<String> {
        let tokenizer: serde_json::Value =
            serde_json::from_str(&self.inner.hf.to_string(false).map_err(build_err)?)?;
        Ok(serde_json::to_string(&Serialized {
            format: FORMAT.to_owned(),
            extras: self.inner.extras.clone(),
            tokenizer,
        })?)
    }

    /// Rebuilds a tokenizer from [`Tokenizer::to_json`]'s output.
    pub fn from_json(json: &str) -> Result<Self> {
        let s: Serialized = serde_json::from_str(json)?;
        if s.format != FORMAT {
            return Err(TokenizerError::Format { found: s.format });
        }
        let hf: tokenizers::Tokenizer = s.tokenizer.to_string().parse().map_err(build_err)?;
        Self::assemble(hf, s.extras)
    }

    /// A streaming detokenizer for one sequence.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new(self.clone())
    }
}

/// Turns generated ids into text deltas for streaming. A delta never ends inside a multi-byte
/// UTF-8 character: bytes of a character split across tokens (emoji, CJK, byte-fallback pieces)
/// are held back until the character is complete. The concatenated deltas plus
/// [`StreamDecoder::finish`] equal [`Tokenizer::decode`] of all ids.
///
/// It decodes a short window (the ids since the last emitted boundary) each step, so the cost per
/// token stays constant however long the sequence grows.
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    ids: Vec<u32>,
    /// Start of the window whose text has already been partly emitted.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl StreamDecoder {
    /// A decoder with nothing decoded yet.
    pub fn new(tokenizer: Tokenizer) -> Self {
        StreamDecoder {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one id; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..]);
        // A trailing U+FFFD means the last character is not complete yet: hold it back.
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            // `prefix` is a prefix of `full` for byte-level and sentencepiece decoders; `get`
            // keeps an exotic decoder that rewrites earlier text from slicing inside a char.
            let delta = full.get(prefix.len()..).unwrap_or_default().to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Keep memory bounded: ids before the window are never looked at again.
            if self.prefix_offset > 64 {
                self.ids.drain(..self.prefix_offset);
                self.read_offset -= self.prefix_offset;
                self.prefix_offset = 0;
            }
            delta
        } else {
            String::new()
        }
    }

    /// The text still held back (an incomplete character shows as U+FFFD), at the end of the
    /// sequence.
    pub fn finish(&mut self) -> String {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        match full.strip_prefix(&prefix) {
            Some(rest) => rest.to_owned(),
            None => String::new(),
        }
    }
}
