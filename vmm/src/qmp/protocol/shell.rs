//! Shell-like word splitting as GLib's `g_shell_parse_argv()` does it.
//!
//! QEMU's HMP `migrate_set_parameter cpr-exec-command <rest of line>` feeds
//! the rest of the line to `g_shell_parse_argv`, so the same input must give
//! the same argv (and the same error texts) here.  GLib's rules are a
//! "semi-arbitrary subset" of POSIX sh: single quotes are literal, double
//! quotes honour `\"`, `\\`, `` \` ``, `\$` and backslash-newline (keeping
//! any other backslash), an unquoted backslash escapes the next character,
//! `#` starts a comment only at the start of the line or after a space or
//! newline, and no expansion of any kind happens.

/// Why a line cannot be split into words; the texts are GLib's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    #[error("Text ended just after a “\\” character. (The text was “{0}”)")]
    TrailingBackslash(String),
    #[error("Text ended before matching quote was found for {quote}. (The text was “{line}”)")]
    UnclosedQuote { quote: char, line: String },
    #[error("Text was empty (or contained only whitespace)")]
    Empty,
    #[error("Unmatched quotation mark in command line or other shell-quoted text")]
    UnmatchedQuote,
}

/// Split `line` into words, or say why not (GLib's error texts).
pub fn parse_argv(line: &str) -> Result<Vec<String>, ShellError> {
    let tokens = tokenize(line)?;
    tokens.iter().map(|t| unquote(t)).collect()
}

/// GLib's `tokenize_command_line`: find word boundaries, keeping quotes
/// and escapes in the words for [`unquote`].
fn tokenize(line: &str) -> Result<Vec<String>, ShellError> {
    let chars: Vec<char> = line.chars().collect();
    let mut words = Vec::new();
    let mut token: Option<String> = None;
    let mut quote: Option<char> = None;
    // Parity of consecutive backslashes, to spot `\"` inside double quotes.
    let mut escaped = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match quote {
            Some('\\') => {
                if c != '\n' {
                    let t = token.get_or_insert_with(String::new);
                    t.push('\\');
                    t.push(c);
                }
                quote = None;
            }
            Some('#') => {
                // Skip the comment; the newline ending it is swallowed too.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                quote = None;
                if i >= chars.len() {
                    break;
                }
            }
            Some(q) => {
                if c == q && !(q == '"' && escaped) {
                    quote = None;
                }
                token.get_or_insert_with(String::new).push(c);
            }
            None => match c {
                '\n' => {
                    if let Some(t) = token.take() {
                        words.push(t);
                    }
                }
                ' ' | '\t' => {
                    if token.as_ref().is_some_and(|t| !t.is_empty()) {
                        words.extend(token.take());
                    }
                }
                '\'' | '"' => {
                    token.get_or_insert_with(String::new).push(c);
                    quote = Some(c);
                }
                '\\' => quote = Some('\\'),
                '#' => {
                    let at_word_start = i == 0 || matches!(chars[i - 1], ' ' | '\n' | '\0');
                    if at_word_start {
                        quote = Some('#');
                    } else {
                        token.get_or_insert_with(String::new).push(c);
                    }
                }
                _ => token.get_or_insert_with(String::new).push(c),
            },
        }
        let c = chars.get(i).copied().unwrap_or('\0');
        escaped = if c == '\\' { !escaped } else { false };
        i += 1;
    }
    if let Some(t) = token.take() {
        words.push(t);
    }
    match quote {
        Some('\\') => {
            return Err(ShellError::TrailingBackslash(line.to_owned()));
        }
        Some(q) => {
            return Err(ShellError::UnclosedQuote {
                quote: q,
                line: line.to_owned(),
            });
        }
        None => {}
    }
    if words.is_empty() {
        return Err(ShellError::Empty);
    }
    Ok(words)
}

/// GLib's `g_shell_unquote` for one word.
fn unquote(word: &str) -> Result<String, ShellError> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::with_capacity(word.len());
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                // Outside quotes a backslash escapes anything; an escaped
                // newline disappears.
                if let Some(&next) = chars.get(i + 1) {
                    if next != '\n' {
                        out.push(next);
                    }
                    i += 2;
                } else {
                    i += 1;
                }
            }
            '\'' => {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(unmatched()),
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            out.push(c);
                            i += 1;
                        }
                    }
                }
            }
            '"' => {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(unmatched()),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            i += 1;
                            match chars.get(i) {
                                Some(&c @ ('"' | '\\' | '`' | '$' | '\n')) => {
                                    out.push(c);
                                    i += 1;
                                }
                                // Not an escape: keep the backslash and
                                // read the next character normally.
                                _ => out.push('\\'),
                            }
                        }
                        Some(&c) => {
                            out.push(c);
                            i += 1;
                        }
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn unmatched() -> ShellError {
    ShellError::UnmatchedQuote
}
