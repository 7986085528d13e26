//! `${NAME}` expansion: the one expander for policies (`${DATA}`, `${CACHE}`, …) and for
//! mcpbox.json (`${MCPBOX_TOKEN}` from the environment). Each caller says where names come from
//! and words the errors for its own file.

/// Why a string could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("unclosed `${{` in `{0}`")]
    Unclosed(String),
    #[error("`${{{0}}}` is not a valid variable name (letters, digits, _)")]
    BadName(String),
    #[error("`${{{0}}}` is not defined")]
    Undefined(String),
}

/// Replaces every `${NAME}` in `s` by `lookup(NAME)`. Names are ASCII letters, digits and `_`;
/// anything else between `${` and `}`, an unclosed `${`, or a name `lookup` does not know is an
/// error. Text without `${` is returned as it is.
pub fn expand_vars(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| ExpandError::Unclosed(s.to_string()))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ExpandError::BadName(name.to_string()));
        }
        out.push_str(&lookup(name).ok_or_else(|| ExpandError::Undefined(name.to_string()))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(n: &str) -> Option<String> {
        (n == "DATA").then(|| "/srv/data".to_string())
    }

    #[test]
    fn names_expand_and_everything_else_is_an_error() {
        assert_eq!(expand_vars("${DATA}/x:${DATA}", vars).unwrap(), "/srv/data/x:/srv/data");
        assert_eq!(expand_vars("no vars, $HOME {x}", vars).unwrap(), "no vars, $HOME {x}");
        assert_eq!(expand_vars("${NOPE}", vars), Err(ExpandError::Undefined("NOPE".into())));
        assert_eq!(expand_vars("${a b}", vars), Err(ExpandError::BadName("a b".into())));
        assert_eq!(expand_vars("${}", vars), Err(ExpandError::BadName(String::new())));
        assert_eq!(expand_vars("x${DATA", vars), Err(ExpandError::Unclosed("x${DATA".into())));
    }
}
