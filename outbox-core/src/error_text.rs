//! Error text the relay stores (`last_error`) and reports (pause reasons): whatever a broker or
//! a database put in an error message, the text can always be written to any store and read
//! back, and it never carries a password.
//!
//! A store rejects some text outright (PostgreSQL refuses NUL bytes in `text`), and an outcome
//! a store cannot record would be retried for ever, so the text is made safe before it is
//! handed to the store, in one place, for every store.

use std::error::Error as StdError;

/// Longest stored error text, in bytes. Errors longer than this are cut on a character
/// boundary and end with `…`.
pub const MAX_ERROR_TEXT: usize = 2048;

/// What replaces a password.
const REDACTED: &str = "***";

/// `err` and its causes on one line, made safe to store: see [`sanitize`].
pub(crate) fn stored(err: &(dyn StdError + 'static)) -> String {
    sanitize(&crate::error::chain(err))
}

/// Makes `text` safe to store and to log: line breaks and tabs become spaces, other control
/// characters (NUL included) become `\u{fffd}`, the password of any `scheme://user:password@`
/// URL and the value of any `password=` setting become `***`, and the result is at most
/// [`MAX_ERROR_TEXT`] bytes.
///
/// ```
/// use outbox_core::sanitize_error_text;
///
/// let text = sanitize_error_text("connect to amqp://app:s3cret@mq:5672 failed:\nbad\0byte");
/// assert_eq!(text, "connect to amqp://app:***@mq:5672 failed: bad\u{fffd}byte");
/// ```
pub fn sanitize(text: &str) -> String {
    let mut clean = String::with_capacity(text.len().min(MAX_ERROR_TEXT + 8));
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\t' => clean.push(' '),
            c if c.is_control() => clean.push('\u{fffd}'),
            c => clean.push(c),
        }
    }
    let mut clean = redact_settings(&redact_urls(&clean));
    if clean.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT - '…'.len_utf8();
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
        clean.push('…');
    }
    clean
}

/// Replaces the password of every `scheme://user:password@host` in `text`.
fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The authority ends at the first character a URL cannot have there.
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '"' | '\''))
            .unwrap_or(after.len());
        let authority = &after[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..=colon]);
                out.push_str(REDACTED);
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Replaces the value of every `password=...` (also `passwd`, `pwd`, any case) in `text`: the
/// form of connection strings and of some client errors.
fn redact_settings(text: &str) -> String {
    const NAMES: [&str; 3] = ["password=", "passwd=", "pwd="];
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    let mut i = 0;
    while i < text.len() {
        let name = NAMES.iter().find(|name| lower[i..].starts_with(*name));
        let starts_word = i == 0 || !lower.as_bytes()[i - 1].is_ascii_alphanumeric();
        match name {
            Some(name) if starts_word => {
                let value = i + name.len();
                let end = text[value..]
                    .find(|c: char| c.is_whitespace() || matches!(c, '&' | ';' | ',' | '"' | '\''))
                    .map_or(text.len(), |n| value + n);
                out.push_str(&text[from..value]);
                out.push_str(REDACTED);
                from = end;
                i = end;
            }
            _ => i += text[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    out.push_str(&text[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_nul_bytes_never_reach_the_store() {
        let text = sanitize("a\0b\u{1b}[31mc\nd\re\tf\u{7f}");
        assert_eq!(text, "a\u{fffd}b\u{fffd}[31mc d e f\u{fffd}");
        assert!(!text.chars().any(char::is_control));
    }

    #[test]
    fn passwords_are_redacted_in_urls_and_settings() {
        assert_eq!(
            sanitize("nats://user:pa:ss@host:4222/x and postgres://u:p@db/app?sslmode=require"),
            "nats://user:***@host:4222/x and postgres://u:***@db/app?sslmode=require"
        );
        assert_eq!(
            sanitize("host=db user=app password=s3cret dbname=x; PWD=abc&y=1"),
            "host=db user=app password=*** dbname=x; PWD=***&y=1"
        );
        // Neither a user without a password nor a word ending in "password" is touched.
        assert_eq!(sanitize("kafka://broker@host"), "kafka://broker@host");
        assert_eq!(sanitize("mypassword=x"), "mypassword=x");
        assert_eq!(sanitize("a://b"), "a://b");
        assert_eq!(sanitize("://:@"), "://:***@");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let text = sanitize(&"é".repeat(MAX_ERROR_TEXT));
        assert!(text.len() <= MAX_ERROR_TEXT, "{}", text.len());
        assert!(text.ends_with('…'));
        assert_eq!(sanitize(&"x".repeat(MAX_ERROR_TEXT)).len(), MAX_ERROR_TEXT);
    }
}
