//! Reading and checking the mutations a user gives: on the command line, in a file, or on stdin.
//!
//! Pure functions: a whole list is checked before anything is enqueued, so bad input changes nothing.

use std::collections::HashSet;

use crate::config::MAX_MUTATION_CHARS;

/// Why a list of mutations was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{origin}: the mutation is empty")]
    Empty { origin: String },
    #[error(
        "{origin}: the mutation is {chars} characters long; at most {MAX_MUTATION_CHARS} are allowed"
    )]
    TooLong { origin: String, chars: usize },
    #[error("{origin}: the mutation contains a control character (U+{code:04X}); remove it")]
    ControlCharacter { origin: String, code: u32 },
    #[error(
        "{origin}: not valid UTF-8 text (byte {byte_offset} of the line); save the file as UTF-8"
    )]
    InvalidUtf8 { origin: String, byte_offset: usize },
    #[error("{0}: no mutations found (only blank lines and # comments)")]
    NoMutations(String),
    #[error(
        "no mutations given: name them as arguments or use --file PATH ('-' reads standard input)"
    )]
    NothingGiven,
}

/// Checks one mutation and returns it with surrounding white space removed and inner runs of
/// white space folded to one space (so `BRAF  V600E` and `BRAF V600E` are the same job).
pub fn normalize_mutation(raw: &str, origin: &str) -> Result<String, InputError> {
    if let Some(c) = raw
        .chars()
        .find(|c| c.is_control() && !matches!(c, ' ' | '\t'))
    {
        return Err(InputError::ControlCharacter {
            origin: origin.to_owned(),
            code: c as u32,
        });
    }
    let folded = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    if folded.is_empty() {
        return Err(InputError::Empty {
            origin: origin.to_owned(),
        });
    }
    let chars = folded.chars().count();
    if chars > MAX_MUTATION_CHARS {
        return Err(InputError::TooLong {
            origin: origin.to_owned(),
            chars,
        });
    }
    Ok(folded)
}

/// Checks mutations given as arguments.
pub fn mutations_from_args(args: &[String]) -> Result<Vec<String>, InputError> {
    args.iter()
        .enumerate()
        .map(|(i, raw)| normalize_mutation(raw, &format!("argument {}", i + 1)))
        .collect()
}

/// Reads a mutation file: one mutation a line; blank lines and lines starting with `#` are skipped,
/// as is anything after ` #` on a line. `name` is used in messages.
pub fn mutations_from_file(bytes: &[u8], name: &str) -> Result<Vec<String>, InputError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut mutations = Vec::new();
    for (index, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let origin = format!("{name} line {}", index + 1);
        let line = std::str::from_utf8(line).map_err(|e| InputError::InvalidUtf8 {
            origin: origin.clone(),
            byte_offset: e.valid_up_to(),
        })?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let content = match line.find(" #") {
            Some(at) => &line[..at],
            None => line,
        };
        let trimmed = content.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        mutations.push(normalize_mutation(content, &origin)?);
    }
    if mutations.is_empty() {
        return Err(InputError::NoMutations(name.to_owned()));
    }
    Ok(mutations)
}

/// Drops repeats (compared without regard to case), keeping the first; returns the repeats dropped.
pub fn dedupe(mutations: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut seen = HashSet::new();
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for m in mutations {
        if seen.insert(m.to_lowercase()) {
            kept.push(m);
        } else {
            dropped.push(m);
        }
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_trimmed_and_folded() {
        assert_eq!(
            normalize_mutation("  BRAF \t V600E ", "x").unwrap(),
            "BRAF V600E"
        );
    }

    #[test]
    fn bad_mutations_are_refused_with_the_place_named() {
        assert!(matches!(
            normalize_mutation("", "argument 1"),
            Err(InputError::Empty { .. })
        ));
        assert!(matches!(
            normalize_mutation("   \t", "argument 1"),
            Err(InputError::Empty { .. })
        ));
        let long = "A".repeat(MAX_MUTATION_CHARS + 1);
        assert_eq!(
            normalize_mutation(&long, "argument 2")
                .unwrap_err()
                .to_string(),
            "argument 2: the mutation is 201 characters long; at most 200 are allowed"
        );
        assert!(
            normalize_mutation(&"é".repeat(MAX_MUTATION_CHARS), "x").is_ok(),
            "characters, not bytes"
        );
        let err = normalize_mutation("BRAF\u{7}V600E", "argument 3").unwrap_err();
        assert_eq!(
            err,
            InputError::ControlCharacter {
                origin: "argument 3".into(),
                code: 7
            }
        );
        assert!(
            normalize_mutation("BRAF\nV600E", "x").is_err(),
            "a newline inside an argument is refused"
        );
    }

    #[test]
    fn files_skip_comments_and_blank_lines() {
        let text = b"# nightly list\nBRAF V600E\n\n  EGFR L858R   # common\r\nKRAS G12C\n";
        assert_eq!(
            mutations_from_file(text, "m.txt").unwrap(),
            ["BRAF V600E", "EGFR L858R", "KRAS G12C"]
        );
    }

    #[test]
    fn bad_files_are_refused_whole() {
        assert_eq!(
            mutations_from_file(b"", "m.txt").unwrap_err(),
            InputError::NoMutations("m.txt".into())
        );
        assert_eq!(
            mutations_from_file(b"# only\n\n", "m.txt").unwrap_err(),
            InputError::NoMutations("m.txt".into())
        );
        let err = mutations_from_file(b"BRAF V600E\nKRAS \xff G12C\n", "m.txt").unwrap_err();
        assert_eq!(
            err,
            InputError::InvalidUtf8 {
                origin: "m.txt line 2".into(),
                byte_offset: 5
            }
        );
        let long = format!("BRAF V600E\n{}\n", "A".repeat(300));
        assert!(matches!(
            mutations_from_file(long.as_bytes(), "m.txt"),
            Err(InputError::TooLong { .. })
        ));
    }

    #[test]
    fn repeats_are_dropped_keeping_the_first() {
        let (kept, dropped) = dedupe(vec![
            "BRAF V600E".into(),
            "KRAS G12C".into(),
            "braf v600e".into(),
        ]);
        assert_eq!(kept, ["BRAF V600E", "KRAS G12C"]);
        assert_eq!(dropped, ["braf v600e"]);
    }
}
