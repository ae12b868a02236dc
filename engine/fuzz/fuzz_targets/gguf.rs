//! Feeds arbitrary bytes to the GGUF reader, and whatever it accepts to the config and tokenizer
//! readers: every input must give an error or a value, never a panic, and every tensor view must
//! lie inside the input.
#![no_main]

use kvroute_engine::config::ModelConfig;
use kvroute_engine::gguf::Gguf;
use kvroute_engine::tokenizer::Tokenizer;
use kvroute_engine::weights::WeightSource;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len();
    if let Ok(g) = Gguf::from_bytes(data.to_vec()) {
        for name in g.names() {
            if let Some(t) = g.tensor(&name) {
                assert!(t.data.len() <= len);
                assert_eq!(Some(t.data.len() as u64), t.dtype.bytes_for(t.elems() as u64));
            }
        }
        let _ = ModelConfig::from_gguf(&g);
        if let Ok(t) = Tokenizer::from_gguf(&g) {
            if let Ok(ids) = t.encode("hello <|im_start|> 123 🚀", true) {
                let _ = t.decode(&ids);
            }
        }
    }
});
