//! The tokenizer (crate `kvroute-text`) built from GGUF metadata the engine reads: byte-level BPE,
//! pre-tokenizers, special tokens, malformed metadata, the serialized form.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_engine::gguf::writer::{byte_level_alphabet, GgufWriter};
use kvroute_engine::gguf::Gguf;
use kvroute_engine::tokenizer::*;
use proptest::prelude::*;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::AddedToken;

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
];

fn gguf(w: GgufWriter) -> Gguf {
    Gguf::from_bytes(w.to_bytes()).unwrap()
}

fn synthetic() -> Tokenizer {
    Tokenizer::from_gguf(&gguf(
        GgufWriter::new().byte_level_tokenizer("smollm", SPECIALS, MERGES),
    ))
    .unwrap()
}

fn id(t: &Tokenizer, text: &str) -> u32 {
    t.token_id(text).unwrap()
}

#[test]
fn byte_level_bpe_from_gguf() {
    let t = synthetic();
    assert_eq!(t.vocab_size(), 3 + 256 + MERGES.len());
    let ids = t.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![id(&t, "hello"), id(&t, "Ġworld")]);
    assert_eq!(t.decode(&ids), "hello world");
    // A character outside the merges falls back to its bytes.
    let ids = t.encode("é", true).unwrap();
    let alpha = byte_level_alphabet();
    assert_eq!(
        ids,
        vec![
            id(&t, &alpha[0xC3].to_string()),
            id(&t, &alpha[0xA9].to_string())
        ]
    );
    assert_eq!(t.decode(&ids), "é");
    assert_eq!(t.bos_id(), Some(0));
    assert_eq!(t.eos_id(), Some(1));
    assert_eq!(t.eos_token().as_deref(), Some("<|im_start|>"));
    assert!(t.is_special(2));
    assert!(!t.is_special(id(&t, "hello")));
}

#[test]
fn smollm_splits_digits_one_by_one() {
    let t = synthetic();
    // The merge "1 2" exists, but the pre-tokenizer isolates every digit first.
    let ids = t.encode("123", true).unwrap();
    assert_eq!(ids, vec![id(&t, "1"), id(&t, "2"), id(&t, "3")]);
    // Plain GPT-2 pre-tokenization keeps the digit run together, so the merge applies.
    let gpt2 = Tokenizer::from_gguf(&gguf(
        GgufWriter::new().byte_level_tokenizer("gpt2", SPECIALS, MERGES),
    ))
    .unwrap();
    assert_eq!(
        gpt2.encode("123", true).unwrap(),
        vec![id(&t, "12"), id(&t, "3")]
    );
}

#[test]
fn special_tokens_only_when_asked() {
    let t = synthetic();
    let text = "<|im_start|>hello<|im_end|>";
    let with = t.encode(text, true).unwrap();
    assert_eq!(with, vec![1, id(&t, "hello"), 2]);
    let without = t.encode(text, false).unwrap();
    assert!(without.len() > 5, "{without:?}");
    assert!(!without.contains(&1) && !without.contains(&2));
    // Specials are left out of text unless asked for.
    assert_eq!(t.decode(&with), "hello");
    assert_eq!(t.decode_with_special(&with), text);
    assert_eq!(t.decode(&without), text);
}

#[test]
fn add_bos_token_is_honoured() {
    let w = GgufWriter::new()
        .byte_level_tokenizer("gpt2", SPECIALS, MERGES)
        .meta("tokenizer.ggml.add_bos_token", true);
    let t = Tokenizer::from_gguf(&gguf(w)).unwrap();
    assert_eq!(t.encode("hello", true).unwrap(), vec![0, id(&t, "hello")]);
    assert_eq!(t.encode("hello", false).unwrap(), vec![id(&t, "hello")]);
    // The serialized form keeps it.
    let back = Tokenizer::from_json(&t.to_json().unwrap()).unwrap();
    assert_eq!(
        back.encode("hello", true).unwrap(),
        vec![0, id(&t, "hello")]
    );
}

#[test]
fn json_round_trip_gives_identical_ids() {
    let w = GgufWriter::new()
        .byte_level_tokenizer("smollm", SPECIALS, MERGES)
        .meta("tokenizer.chat_template", "{{ messages }}");
    let t = Tokenizer::from_gguf(&gguf(w)).unwrap();
    let json = t.to_json().unwrap();
    let back = Tokenizer::from_json(&json).unwrap();
    for text in ["hello world 123", "<|im_start|>x<|im_end|>", "é ü 🚀", ""] {
        for special in [true, false] {
            assert_eq!(
                t.encode(text, special).unwrap(),
                back.encode(text, special).unwrap()
            );
        }
    }
    assert_eq!(back.chat_template(), Some("{{ messages }}"));
    assert_eq!(back.bos_id(), t.bos_id());
    assert_eq!(back.eos_id(), t.eos_id());
    assert_eq!(back.vocab_size(), t.vocab_size());

    let wrong = json.replace(FORMAT, "kvroute-tokenizer/0");
    assert!(matches!(
        Tokenizer::from_json(&wrong),
        Err(TokenizerError::Format { .. })
    ));
    assert!(matches!(
        Tokenizer::from_json("{\"format\": 1"),
        Err(TokenizerError::Json(_))
    ));
}

#[test]
fn bad_metadata_is_an_error() {
    let e = Tokenizer::from_gguf(&gguf(GgufWriter::new())).unwrap_err();
    assert!(matches!(e, TokenizerError::Missing("tokenizer.ggml.model")));
    let e = Tokenizer::from_gguf(&gguf(
        GgufWriter::new().meta("tokenizer.ggml.model", "llama"),
    ))
    .unwrap_err();
    assert!(matches!(e, TokenizerError::UnsupportedModel(m) if m == "llama"));
    let e = Tokenizer::from_gguf(&gguf(
        GgufWriter::new().byte_level_tokenizer("klingon", SPECIALS, MERGES),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("klingon") && e.to_string().contains("smollm"));
    let e = Tokenizer::from_gguf(&gguf(GgufWriter::new().byte_level_tokenizer(
        "gpt2",
        SPECIALS,
        &["nospace"],
    )))
    .unwrap_err();
    assert!(
        matches!(
            &e,
            TokenizerError::BadValue {
                key: "tokenizer.ggml.merges",
                ..
            }
        ),
        "{e}"
    );
    let e = Tokenizer::from_gguf(&gguf(
        GgufWriter::new()
            .byte_level_tokenizer("gpt2", &[], MERGES)
            .meta("tokenizer.ggml.eos_token_id", 1_000_000u32),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let e = Tokenizer::from_gguf(&gguf(
        GgufWriter::new()
            .byte_level_tokenizer("gpt2", &[], MERGES)
            .meta("tokenizer.ggml.add_bos_token", true),
    ))
    .unwrap_err();
    assert!(matches!(
        e,
        TokenizerError::Missing("tokenizer.ggml.bos_token_id")
    ));
    let e = Tokenizer::from_gguf(&gguf(
        GgufWriter::new()
            .meta("tokenizer.ggml.model", "gpt2")
            .meta("tokenizer.ggml.tokens", 5u32),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("array of strings"), "{e}");
    // A merge whose parts are not in the vocabulary.
    let e = Tokenizer::from_gguf(&gguf(
        GgufWriter::new()
            .meta("tokenizer.ggml.model", "gpt2")
            .meta_strings("tokenizer.ggml.tokens", &["a"])
            .meta_strings("tokenizer.ggml.merges", &["x y"]),
    ))
    .unwrap_err();
    assert!(matches!(e, TokenizerError::Build(_)), "{e}");
}

/// A sentencepiece-style tokenizer.json with byte fallback (as Llama 2 / Mistral ship).
fn byte_fallback_json() -> String {
    use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence};
    use tokenizers::normalizers::replace::Replace;
    let mut vocab: Vec<(String, u32)> =
        vec![("<unk>".into(), 0), ("<s>".into(), 1), ("</s>".into(), 2)];
    for b in 0..=255u32 {
        vocab.push((format!("<0x{b:02X}>"), 3 + b));
    }
    for (i, piece) in ["▁", "a", "b", "▁a", "ab"].iter().enumerate() {
        vocab.push(((*piece).into(), 259 + i as u32));
    }
    let merges = vec![("▁".into(), "a".into()), ("a".into(), "b".into())];
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .unk_token("<unk>".into())
        .byte_fallback(true)
        .build()
        .unwrap();
    let mut hf = tokenizers::Tokenizer::new(bpe);
    hf.with_normalizer(Some(Replace::new(" ", "▁").unwrap()));
    hf.with_decoder(Some(Sequence::new(vec![
        tokenizers::decoders::DecoderWrapper::Replace(Replace::new("▁", " ").unwrap()),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    hf.add_special_tokens(&[
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
    ]);
    hf.to_string(false).unwrap()
}

#[test]
fn tokenizer_json_with_byte_fallback() {
    let config = r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#;
    let t = Tokenizer::from_hf_json(&byte_fallback_json(), Some(config)).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    assert_eq!(t.chat_template(), Some("D"));
    let ids = t.encode("ab a😀", true).unwrap();
    // "ab", "▁a", then the four bytes of the emoji.
    assert_eq!(ids, vec![263, 262, 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80]);
    assert_eq!(t.decode(&ids), "ab a😀");

    let mut s = t.stream_decoder();
    let deltas: Vec<String> = ids.iter().map(|&i| s.push(i)).collect();
    assert_eq!(deltas, vec!["ab", " a", "", "", "", "😀"]);
    assert_eq!(s.finish(), "");

    // Malformed inputs are errors.
    assert!(matches!(
        Tokenizer::from_hf_json("{}", None),
        Err(TokenizerError::Build(_))
    ));
    assert!(matches!(
        Tokenizer::from_hf_json(&byte_fallback_json(), Some("[")),
        Err(TokenizerError::Json(_))
    ));
    let e = Tokenizer::from_hf_files(Path::new("/nonexistent/tokenizer.json"), None).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/tokenizer.json"));
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let t = synthetic();
    let ids = t.encode("a🚀b", true).unwrap();
    assert_eq!(ids.len(), 6, "a, four emoji bytes, b");
    let mut s = t.stream_decoder();
    let deltas: Vec<String> = ids.iter().map(|&i| s.push(i)).collect();
    assert_eq!(deltas, vec!["a", "", "", "", "🚀", "b"]);
    // An incomplete character at the end comes out as U+FFFD on finish.
    let mut s = t.stream_decoder();
    assert_eq!(s.push(ids[1]), "");
    assert_eq!(s.finish(), "\u{FFFD}");
    // Unknown ids decode to nothing.
    assert_eq!(t.decode(&[u32::MAX]), "");
}

proptest! {
    /// For any id sequence — valid text, specials, broken UTF-8, unknown ids — the deltas never
    /// split a character and add up to the full decode.
    #[test]
    fn stream_deltas_concatenate_to_decode(
        ids in prop::collection::vec(0u32..(3 + 256 + 12), 0..40),
    ) {
        let t = synthetic();
        let mut s = t.stream_decoder();
        let mut out = String::new();
        for &i in &ids {
            out.push_str(&s.push(i));
        }
        out.push_str(&s.finish());
        prop_assert_eq!(out, t.decode(&ids));
    }

    /// Encoding then decoding gives back the text (byte-level BPE is lossless).
    #[test]
    fn encode_decode_round_trip(text in "\\PC{0,24}") {
        let t = synthetic();
        let ids = t.encode(&text, false).unwrap();
        prop_assert_eq!(t.decode(&ids), text.clone());
        let mut s = t.stream_decoder();
        let mut out = String::new();
        for &i in &ids {
            let d = s.push(i);
            // Valid text never shows a replacement character mid-stream.
            let clean = text.contains(char::REPLACEMENT_CHARACTER)
                || !d.contains(char::REPLACEMENT_CHARACTER);
            prop_assert!(clean, "delta {:?}", d);
            out.push_str(&d);
        }
        out.push_str(&s.finish());
        prop_assert_eq!(out, text);
    }
}

#[test]
fn llama3_and_qwen2_pre_tokenizers_split_like_llama_cpp() {
    let merges = &[
        "1 2", "12 3", "4 5", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "' s",
    ];
    let build = |pre: &str| {
        Tokenizer::from_gguf(&gguf(
            GgufWriter::new().byte_level_tokenizer(pre, SPECIALS, merges),
        ))
        .unwrap()
    };
    let l3 = build("llama-bpe");
    let t = |tok: &Tokenizer, s: &str| -> Vec<String> {
        tok.encode(s, false)
            .unwrap()
            .iter()
            .map(|&i| tok.token_text(i).unwrap())
            .collect()
    };
    // Digits in runs of up to three.
    assert_eq!(t(&l3, "12345"), vec!["123", "45"]);
    assert_eq!(t(&l3, " world's"), vec!["Ġworld", "'s"]);
    // Qwen2: digits one at a time.
    let q = build("qwen2");
    assert_eq!(t(&q, "12345"), vec!["1", "2", "3", "4", "5"]);
    assert_eq!(t(&q, " world"), vec!["Ġworld"]);
    // GPT-2: digit runs stay whole and merge.
    let g = build("gpt2");
    assert_eq!(t(&g, "12345"), vec!["123", "45"]);
}

#[test]
fn empty_control_tokens_are_ignored() {
    let t = Tokenizer::from_gguf(&gguf(GgufWriter::new().byte_level_tokenizer(
        "gpt2",
        &["", "<|x|>"],
        MERGES,
    )))
    .unwrap();
    assert_eq!(
        t.encode("hello<|x|>", true).unwrap(),
        vec![id(&t, "hello"), 1]
    );
}
