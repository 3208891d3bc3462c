//! Prompt cleaning and tokenisation (model-spec §1.3) against the reference: ftfy 6.3.1 +
//! html.unescape twice + whitespace collapse in Python, and the `tokenizers` fast-tokenizer call
//! with padding and truncation to text_len, on a tiny tokenizer.json of the umT5 kind
//! (Unigram, Metaspace, EOS template). Fixtures from make_golden_encoders.py tok.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use runtime::models::t5::T5Tokenizer;
use runtime::models::t5::text::{clean_prompt, html_unescape};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/t5_tiny")
}

fn golden() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn prompt_cleaning_matches_reference() {
    for c in golden()["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        assert_eq!(
            clean_prompt(prompt),
            c["clean"].as_str().unwrap(),
            "prompt {prompt:?}"
        );
    }
}

#[test]
fn tokenizer_matches_reference() {
    let g = golden();
    let text_len = g["text_len"].as_u64().unwrap() as usize;
    let tok = T5Tokenizer::from_file(fixtures().join("tokenizer"), text_len).unwrap();
    for c in g["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        let t = tok.encode(prompt).unwrap();
        let ids: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(t.ids, ids, "prompt {prompt:?}");
        assert_eq!(t.real, c["real"].as_u64().unwrap() as usize);
        assert_eq!(t.real_ids().last(), Some(&1), "EOS last: {prompt:?}");
    }
}

#[test]
fn html_unescape_edge_cases() {
    // Python: html.unescape of the same strings.
    assert_eq!(html_unescape("&amp;lt; &notit; &#x80;"), "&lt; ¬it; €");
    assert_eq!(
        html_unescape("&#0; &#xD800; &#1114112; &#x1;"),
        "\u{fffd} \u{fffd} \u{fffd} "
    );
    assert_eq!(html_unescape("&AMP &ampx &#; & x"), "& &x &#; & x");
    assert_eq!(html_unescape("&#99999999999999999999;"), "\u{fffd}");
}

#[test]
fn tokenizer_file_errors_are_clear() {
    let e = T5Tokenizer::from_file(fixtures().join("nope"), 8).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}
