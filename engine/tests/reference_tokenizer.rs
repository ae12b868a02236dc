//! The tokenizer and chat template of the default model against llama.cpp's reference output
//! (`shared/fixtures/smollm2-reference.json`).
#![allow(clippy::unwrap_used)]

mod model_fixture;

use kvroute_engine::chat::{ChatMessage, ChatTemplate};
use kvroute_engine::gguf::Gguf;
use kvroute_engine::tokenizer::Tokenizer;
use proptest::prelude::*;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::from_gguf(&Gguf::open(model_fixture::model_path()).unwrap()).unwrap()
    })
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn token_ids_match_llama_cpp_for_every_fixture_string() {
    let t = tokenizer();
    let fixture = model_fixture::fixture();
    let cases = fixture["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let special = case["special"].as_bool().unwrap();
        let want = ids(&case["ids"]);
        let got = t.encode(text, special).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?} (special={special}):\n  want {want:?}\n  got  {got:?}"
            ));
        }
        // Byte-level BPE is lossless: the ids decode back to the text (specials included).
        assert_eq!(t.decode_with_special(&got), text);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn generation_prompts_tokenize_like_llama_cpp() {
    // The prompts llama.cpp generated from (one is a rendered chat prompt) tokenize to the ids it
    // fed the model.
    let t = tokenizer();
    let fixture = model_fixture::fixture();
    for g in fixture["generate"].as_array().unwrap() {
        let prompt = g["prompt"].as_str().unwrap();
        assert_eq!(
            t.encode(prompt, true).unwrap(),
            ids(&g["prompt_ids"]),
            "{prompt:?}"
        );
    }
}

#[test]
fn default_model_tokenizer_facts() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    assert_eq!(t.eos_token().as_deref(), Some("<|im_end|>"));
    assert_eq!(t.stop_ids(), vec![2]);
    assert!(t.is_special(1) && t.is_special(16) && !t.is_special(17));
    assert!(t.chat_template().unwrap().contains("<|im_start|>"));
    // Without special parsing, the markers are plain text.
    let literal = t.encode("<|im_start|>", false).unwrap();
    assert!(literal.len() > 1 && !literal.contains(&1), "{literal:?}");
}

#[test]
fn serialized_tokenizer_rebuilds_identically() {
    let t = tokenizer();
    let json = t.to_json().unwrap();
    let back = Tokenizer::from_json(&json).unwrap();
    let fixture = model_fixture::fixture();
    for case in fixture["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        for special in [true, false] {
            assert_eq!(
                back.encode(text, special).unwrap(),
                t.encode(text, special).unwrap()
            );
        }
    }
    assert_eq!(back.chat_template(), t.chat_template());
    assert_eq!(back.stop_ids(), t.stop_ids());
}

#[test]
fn greedy_reference_texts_stream_like_they_decode() {
    let t = tokenizer();
    let fixture = model_fixture::fixture();
    for g in fixture["generate"].as_array().unwrap() {
        let gen = ids(&g["greedy_ids"]);
        let mut s = t.stream_decoder();
        let mut out = String::new();
        for &i in &gen {
            out.push_str(&s.push(i));
        }
        out.push_str(&s.finish());
        assert_eq!(out, t.decode(&gen));
        // llama.cpp's detokenized continuation (it may stop mid-character at 32 tokens, which
        // it shows as U+FFFD like we do).
        assert_eq!(out, g["greedy_text"].as_str().unwrap());
    }
}

#[test]
fn chat_prompts_match_llama_cpp_byte_for_byte() {
    let t = tokenizer();
    let fixture = model_fixture::fixture();
    // The template in the model file is the one the fixture was rendered with.
    assert_eq!(t.chat_template(), fixture["chat_template"].as_str());
    let template = ChatTemplate::from_tokenizer(t).unwrap();
    let cases = fixture["chat"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let messages = ChatMessage::from_openai(&case["messages"]).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(&messages, add).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        // The rendered prompt tokenizes with its markers as single special tokens.
        let ids = t.encode(&rendered, true).unwrap();
        assert_eq!(ids[0], 1, "starts with <|im_start|>");
        assert_eq!(
            ids.iter().filter(|&&i| i == 2).count(),
            messages.len() + usize::from(messages[0].role != "system")
        );
        assert_eq!(t.decode_with_special(&ids), rendered);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random ids from the real vocabulary — most of them pieces of multi-byte characters — give
    /// deltas that add up to the full decode.
    #[test]
    fn stream_decoding_random_ids(ids in prop::collection::vec(0u32..49152, 0..48)) {
        let t = tokenizer();
        let mut s = t.stream_decoder();
        let mut out = String::new();
        for &i in &ids {
            out.push_str(&s.push(i));
        }
        out.push_str(&s.finish());
        prop_assert_eq!(out, t.decode(&ids));
    }

    /// Emoji and CJK split across byte-level tokens stream without broken characters.
    #[test]
    fn stream_decoding_real_text(text in "[a-z 🚀🔥👩‍💻日本語éü\\n]{0,32}") {
        let t = tokenizer();
        let ids = t.encode(&text, false).unwrap();
        let mut s = t.stream_decoder();
        let mut out = String::new();
        for &i in &ids {
            let d = s.push(i);
            prop_assert!(!d.contains(char::REPLACEMENT_CHARACTER), "delta {:?}", d);
            out.push_str(&d);
        }
        out.push_str(&s.finish());
        prop_assert_eq!(out, text);
    }
}
