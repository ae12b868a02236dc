//! `kvroute-agent tokenize` with the default model prints, as a JSON array, the reference token ids (llama.cpp's,
//! from the fixture) for every reference text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvroute_tests::{fixture, model_arg, run_agent};

#[test]
fn tokenize_matches_the_reference_ids() {
    let f = fixture();
    let cases = f["tokenize"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let model = model_arg();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let mut args = vec!["tokenize", "--model", &model];
        if c["special"] == false {
            args.push("--no-special");
        }
        args.push("--");
        args.push(text);
        let out = run_agent(&args);
        assert!(
            out.status.success(),
            "{text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ids: Vec<u64> = serde_json::from_slice(&out.stdout).unwrap();
        let want: Vec<u64> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids, want, "{text:?}");
    }
}
