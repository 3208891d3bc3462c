//! The umT5 tokenizer (`google/umt5-xxl/tokenizer.json` in the checkpoint folder) through the
//! `tokenizers` crate, called as the reference calls its fast tokenizer (model-spec §1.3):
//! cleaned text, special tokens added (EOS), truncated and padded to `text_len`.

use std::path::Path;

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::text::clean_prompt;
use crate::weights::CheckpointErrorKind;
use crate::{Error, Result};

/// Token ids padded to `text_len` and how many are real (EOS included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub real: usize,
}

impl Tokens {
    /// The real tokens, what [`super::T5Encoder::forward`] takes.
    pub fn real_ids(&self) -> &[u32] {
        &self.ids[..self.real]
    }
}

#[derive(Debug)]
pub struct T5Tokenizer {
    tok: Tokenizer,
    text_len: usize,
}

impl T5Tokenizer {
    /// Load `tokenizer.json` (a file, or a folder holding one).
    pub fn from_file(path: impl AsRef<Path>, text_len: usize) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path = path.join("tokenizer.json");
        }
        let err = |msg: String| Error::Checkpoint {
            path: path.display().to_string(),
            kind: CheckpointErrorKind::Io {
                file: "tokenizer.json".into(),
                msg,
            },
        };
        let tok = Tokenizer::from_file(&path).map_err(|e| err(e.to_string()))?;
        Self::configure(tok, text_len, err)
    }

    /// As [`T5Tokenizer::from_file`], from the bytes of a `tokenizer.json` (e.g. sent by the
    /// rank that read it); `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str, text_len: usize) -> Result<Self> {
        let err = |msg: String| Error::Checkpoint {
            path: origin.to_string(),
            kind: CheckpointErrorKind::Io {
                file: "tokenizer.json".into(),
                msg,
            },
        };
        let tok = Tokenizer::from_bytes(bytes).map_err(|e| err(e.to_string()))?;
        Self::configure(tok, text_len, err)
    }

    /// Truncation and padding to `text_len` as the reference calls the tokenizer.
    fn configure(
        mut tok: Tokenizer,
        text_len: usize,
        err: impl Fn(String) -> Error,
    ) -> Result<Self> {
        let pad_id = tok
            .token_to_id("<pad>")
            .ok_or_else(|| err("no <pad> token".into()))?;
        tok.with_truncation(Some(TruncationParams {
            max_length: text_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| err(e.to_string()))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(text_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: "<pad>".into(),
        }));
        Ok(Self { tok, text_len })
    }

    pub fn text_len(&self) -> usize {
        self.text_len
    }

    /// Clean (§1.3) and tokenise one prompt.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let text = clean_prompt(prompt);
        let enc = self
            .tok
            .encode(text.as_str(), true)
            .map_err(|e| Error::invalid("tokenizer", e.to_string()))?;
        let real = enc.get_attention_mask().iter().filter(|&&m| m != 0).count();
        Ok(Tokens {
            ids: enc.get_ids().to_vec(),
            real,
        })
    }
}
