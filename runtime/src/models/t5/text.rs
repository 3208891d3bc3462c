//! Prompt cleaning before tokenisation (model-spec §1.3): ftfy's `fix_text`, Python's
//! `html.unescape` twice, strip, then every whitespace run collapsed to one space.
//!
//! ftfy is reproduced for its character-level fixes, applied per line until nothing changes,
//! in its order: semicolon-terminated HTML entities (only when the line has no `<`), C1
//! controls read as windows-1252, Latin ligatures, full/half-width forms, curly quotes, line
//! breaks, terminal escapes, control characters, NFC. Not reproduced: ftfy's mojibake repair
//! (`fix_encoding`, which guesses a mis-decoding such as "cafÃ©" → "café") and its all-caps
//! entity variants ("&EACUTE;"); such text passes through unchanged.

use unicode_normalization::UnicodeNormalization;

use super::html_entities::{HTML5, INVALID_CHARREFS, INVALID_CODEPOINTS};

/// `whitespace_clean(basic_clean(text))` of the reference.
pub fn clean_prompt(text: &str) -> String {
    let t = fix_text(text);
    let t = html_unescape(&html_unescape(&t));
    collapse_whitespace(t.trim_matches(py_isspace))
}

/// Python's `str.isspace` (also what `\s` matches): White_Space plus U+001C–U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn collapse_whitespace(t: &str) -> String {
    let mut out = String::with_capacity(t.len());
    let mut in_space = false;
    for c in t.chars() {
        if py_isspace(c) {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(c);
            in_space = false;
        }
    }
    out.trim_matches(' ').to_string()
}

fn lookup(name: &str) -> Option<&'static str> {
    HTML5
        .binary_search_by(|(k, _)| k.cmp(&name))
        .ok()
        .map(|i| HTML5[i].1)
}

/// A numeric reference's replacement (None: leave the text), as Python's html module.
fn numeric(num: Option<u32>) -> String {
    let Some(n) = num else {
        return "\u{fffd}".into();
    };
    if let Ok(i) = INVALID_CHARREFS.binary_search_by(|(k, _)| k.cmp(&n)) {
        return INVALID_CHARREFS[i].1.to_string();
    }
    if (0xd800..=0xdfff).contains(&n) || n > 0x10ffff {
        return "\u{fffd}".into();
    }
    if INVALID_CODEPOINTS.binary_search(&n).is_ok() {
        return String::new();
    }
    char::from_u32(n)
        .map(String::from)
        .unwrap_or_else(|| "\u{fffd}".into())
}

/// Python's `html.unescape`: `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)`.
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'&' {
            let next = s[i..].find('&').map_or(s.len(), |p| i + p);
            out.push_str(&s[i..next]);
            i = next;
            continue;
        }
        let rest = &s[i + 1..];
        if let Some(num) = rest.strip_prefix('#') {
            let hex = num.starts_with(['x', 'X']);
            let digits = if hex { &num[1..] } else { num };
            let n = digits
                .bytes()
                .take_while(|c| {
                    if hex {
                        c.is_ascii_hexdigit()
                    } else {
                        c.is_ascii_digit()
                    }
                })
                .count();
            if n > 0 {
                let mut len = 1 + usize::from(hex) + n;
                if rest.as_bytes().get(len) == Some(&b';') {
                    len += 1;
                }
                // Python's int() has no overflow: anything past u32 is > 0x10FFFF.
                let v = u32::from_str_radix(&digits[..n], if hex { 16 } else { 10 }).ok();
                out.push_str(&numeric(v));
                i += 1 + len;
                continue;
            }
            out.push('&');
            i += 1;
            continue;
        }
        // Named: up to 32 characters outside "\t\n\f <&#;", then an optional ';'.
        let mut end = 0;
        for (count, (p, c)) in rest.char_indices().enumerate() {
            if count == 32 || matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';') {
                break;
            }
            end = p + c.len_utf8();
        }
        if end == 0 {
            out.push('&');
            i += 1;
            continue;
        }
        let mut name = &rest[..end];
        if rest[end..].starts_with(';') {
            name = &rest[..end + 1];
        }
        if let Some(v) = lookup(name) {
            out.push_str(v);
        } else {
            // The longest known prefix (at least 2 characters), the rest kept.
            let cut = name
                .char_indices()
                .map(|(p, _)| p)
                .filter(|&p| p >= 2)
                .rev()
                .find_map(|p| lookup(&name[..p]).map(|v| (p, v)));
            match cut {
                Some((p, v)) => {
                    out.push_str(v);
                    out.push_str(&name[p..]);
                }
                None => {
                    out.push('&');
                    out.push_str(name);
                }
            }
        }
        i += 1 + name.len();
    }
    out
}

/// ftfy's `unescape_html`: only `&#?[0-9A-Za-z]{1,24};` that are known entities or numeric
/// references fully consumed.
fn ftfy_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'&' {
            let start = i + 1 + usize::from(b.get(i + 1) == Some(&b'#'));
            let n = b[start..]
                .iter()
                .take(24)
                .take_while(|c| c.is_ascii_alphanumeric())
                .count();
            if n > 0 && b.get(start + n) == Some(&b';') {
                let ent = &s[i..start + n + 1];
                let rep = if ent.starts_with("&#") {
                    let u = html_unescape(ent);
                    (!u.contains(';')).then_some(u)
                } else {
                    lookup(&ent[1..]).map(str::to_string)
                };
                if let Some(r) = rep {
                    out.push_str(&r);
                    i = start + n + 1;
                    continue;
                }
            }
        }
        let c = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(c);
        i += c.len_utf8().max(1);
    }
    out
}

/// windows-1252 for the C1 range (the five undefined bytes stay as they are).
fn c1(c: char) -> char {
    const MAP: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž',
        '\u{8f}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}',
        'ž', 'Ÿ',
    ];
    match c as u32 {
        0x80..=0x9f => MAP[c as usize - 0x80],
        _ => c,
    }
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

fn is_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
}

/// One pass of ftfy's character fixes over a line.
fn fix_pass(line: &str, unescape: bool) -> String {
    let t = if unescape {
        ftfy_unescape(line)
    } else {
        line.to_string()
    };
    let mut s = String::with_capacity(t.len());
    for ch in t.chars() {
        let ch = c1(ch);
        if let Some(l) = ligature(ch) {
            s.push_str(l);
        } else if ch == '\u{3000}' || ('\u{ff01}'..='\u{ffee}').contains(&ch) {
            s.extend(ch.nfkc()); // width: NFKC of full/half-width forms
        } else {
            s.push(match ch {
                'ʼ' | '\u{2018}'..='\u{201b}' => '\'',
                '\u{201c}'..='\u{201f}' => '"',
                _ => ch,
            });
        }
    }
    let s = s
        .replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
    let s = remove_terminal_escapes(&s);
    let s: String = s.chars().filter(|&c| !is_control(c)).collect();
    s.nfc().collect()
}

/// `\x1b\[[0-9;]*[A-Za-z]` removed.
fn remove_terminal_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find("\u{1b}[") {
        out.push_str(&rest[..p]);
        let after = &rest[p + 2..];
        let n = after
            .bytes()
            .take_while(|c| c.is_ascii_digit() || *c == b';')
            .count();
        match after.as_bytes().get(n) {
            Some(c) if c.is_ascii_alphabetic() => rest = &after[n + 1..],
            _ => {
                out.push_str("\u{1b}[");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// ftfy `fix_text` without its encoding repair: lines fixed separately until stable.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let unescape = !line.contains('<');
        let mut cur = line.to_string();
        loop {
            let next = fix_pass(&cur, unescape);
            if next == cur {
                break;
            }
            cur = next;
        }
        out.push_str(&cur);
    }
    out
}
