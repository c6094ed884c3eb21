//! `google.api.http` path templates: parsed once per version of the
//! contracts, matched against each request's path.
//!
//! ```text
//! Template  = "/" Segments [ Verb ] ;
//! Segments  = Segment { "/" Segment } ;
//! Segment   = "*" | "**" | LITERAL | Variable ;
//! Variable  = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb      = ":" LITERAL ;
//! ```

use std::cmp::Ordering;
use std::fmt;

use percent_encoding::percent_decode_str;

/// A parsed template: its segments, the variables bound to runs of them,
/// and its verb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
    text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: one segment.
    One,
    /// `**`: the rest of the path, zero or more segments.
    Rest,
}

/// A field path bound to the segments `start..end` of the template.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Variable {
    field: Vec<String>,
    start: usize,
    end: usize,
}

/// A variable's value taken from a path: the field path it sets, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub field: Vec<String>,
    pub value: String,
}

impl PathTemplate {
    /// Errors say what is wrong with the template, for a load error that
    /// names the method and the option.
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err("a path template starts with /".into());
        };
        let (path, verb) = split_verb(rest);
        if let Some(verb) = verb
            && !is_literal(verb)
        {
            return Err(format!("the verb `:{verb}` is not a literal"));
        }
        let mut template = PathTemplate {
            segments: Vec::new(),
            variables: Vec::new(),
            verb: verb.map(str::to_string),
            text: text.to_string(),
        };
        for part in split_top(path)? {
            if let Some(inner) = part.strip_prefix('{') {
                let inner = inner.strip_suffix('}').ok_or_else(|| format!("`{part}` is not a variable"))?;
                template.add_variable(inner)?;
            } else {
                template.segments.push(segment(part)?);
            }
        }
        let rest_at = template.segments.iter().position(|segment| *segment == Segment::Rest);
        if rest_at.is_some_and(|at| at + 1 != template.segments.len()) {
            return Err("`**` may only be the last segment (before a verb)".into());
        }
        let mut fields: Vec<&Vec<String>> = template.variables.iter().map(|v| &v.field).collect();
        fields.sort();
        if let Some(twice) = fields.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(format!("the field `{}` is bound twice", twice[0].join(".")));
        }
        Ok(template)
    }

    fn add_variable(&mut self, inner: &str) -> Result<(), String> {
        let (field, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
        let field: Vec<String> = field.split('.').map(str::to_string).collect();
        if !field.iter().all(|name| is_ident(name)) {
            return Err(format!("`{}` is not a field path", field.join(".")));
        }
        let start = self.segments.len();
        for part in pattern.split('/') {
            if part.contains(['{', '}']) {
                return Err(format!("the variable `{}` holds another variable", field.join(".")));
            }
            self.segments.push(segment(part)?);
        }
        self.variables.push(Variable { field, start, end: self.segments.len() });
        Ok(())
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The paths the template matches, with its variables' names left out:
    /// two templates of one shape match the same paths.
    pub fn shape(&self) -> String {
        let segments = self.segments.iter().map(|segment| match segment {
            Segment::Literal(literal) => literal.as_str(),
            Segment::One => "*",
            Segment::Rest => "**",
        });
        let mut shape = format!("/{}", segments.collect::<Vec<_>>().join("/"));
        if let Some(verb) = &self.verb {
            shape.push(':');
            shape.push_str(verb);
        }
        shape
    }

    /// The field paths the template binds.
    pub fn fields(&self) -> impl Iterator<Item = &[String]> {
        self.variables.iter().map(|variable| variable.field.as_slice())
    }

    /// The variables' values if `path` (without its query) matches.
    pub fn matches(&self, path: &str) -> Option<Vec<Binding>> {
        let path = path.strip_prefix('/')?;
        let path = match &self.verb {
            Some(verb) => path.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => path,
        };
        // Checked before anything is allocated: most templates tried do not match.
        let count = path.bytes().filter(|&b| b == b'/').count() + 1;
        let ends_in_rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = self.segments.len() - usize::from(ends_in_rest);
        if count < fixed || (!ends_in_rest && count != fixed) {
            return None;
        }
        for (segment, part) in self.segments.iter().zip(path.split('/')) {
            match segment {
                Segment::Literal(literal) if literal != part => return None,
                Segment::One if part.is_empty() => return None,
                _ => {}
            }
        }
        let parts: Vec<&str> = path.split('/').collect();
        let bindings = self.variables.iter().map(|variable| {
            let end = if variable.end == self.segments.len() && ends_in_rest { parts.len() } else { variable.end };
            let taken = &parts[variable.start.min(end)..end];
            let value = match taken {
                [one] if variable.end - variable.start == 1 && self.segments[variable.start] == Segment::One => {
                    percent_decode_str(one).decode_utf8_lossy().into_owned()
                }
                many => many.iter().map(|part| decode_keeping_slashes(part)).collect::<Vec<_>>().join("/"),
            };
            Binding { field: variable.field.clone(), value }
        });
        Some(bindings.collect())
    }

    /// Orders templates so that the first one to match a path is the most
    /// specific: a verb first, then, segment by segment, a literal before
    /// `*` before `**`.
    pub fn specificity(&self, other: &PathTemplate) -> Ordering {
        let rank = |segment: &Segment| match segment {
            Segment::Literal(_) => 0,
            Segment::One => 1,
            Segment::Rest => 2,
        };
        let ranks = |template: &PathTemplate| template.segments.iter().map(rank).collect::<Vec<_>>();
        other.verb.is_some().cmp(&self.verb.is_some()).then_with(|| ranks(self).cmp(&ranks(other)))
    }
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A multi-segment variable keeps `%2F` encoded, so that the slashes in its
/// value are the path's own.
fn decode_keeping_slashes(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    let mut rest = part;
    while let Some(at) = rest.to_ascii_lowercase().find("%2f") {
        out.push_str(&percent_decode_str(&rest[..at]).decode_utf8_lossy());
        out.push_str(&rest[at..at + 3]);
        rest = &rest[at + 3..];
    }
    out.push_str(&percent_decode_str(rest).decode_utf8_lossy());
    out
}

/// The path and its verb: a `:` after the last `/` outside braces.
fn split_verb(path: &str) -> (&str, Option<&str>) {
    let mut depth = 0usize;
    let mut verb_at = None;
    for (at, c) in path.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            '/' if depth == 0 => verb_at = None,
            ':' if depth == 0 => verb_at = Some(at),
            _ => {}
        }
    }
    match verb_at {
        Some(at) => (&path[..at], Some(&path[at + 1..])),
        None => (path, None),
    }
}

/// Splits at the slashes outside braces.
fn split_top(path: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (at, c) in path.char_indices() {
        match c {
            '{' if depth > 0 => return Err("a variable may not hold another variable".into()),
            '{' => depth = 1,
            '}' if depth == 0 => return Err("a `}` closes no variable".into()),
            '}' => depth = 0,
            '/' if depth == 0 => {
                parts.push(&path[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("a variable is not closed with `}`".into());
    }
    parts.push(&path[start..]);
    Ok(parts)
}

fn segment(part: &str) -> Result<Segment, String> {
    match part {
        "*" => Ok(Segment::One),
        "**" => Ok(Segment::Rest),
        literal if is_literal(literal) => Ok(Segment::Literal(literal.to_string())),
        "" => Err("a segment is empty (`//` or a trailing `/`)".into()),
        other => Err(format!("`{other}` is not a segment: write a literal, *, ** or a {{variable}}")),
    }
}

fn is_literal(text: &str) -> bool {
    !text.is_empty() && !text.contains(['*', '{', '}', '/', '?', '#'])
}

fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        let template = PathTemplate::parse(template).unwrap();
        let bindings = template.matches(path)?;
        Some(bindings.into_iter().map(|b| (b.field.join("."), b.value)).collect())
    }

    fn pairs(list: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(list.iter().map(|(f, v)| (f.to_string(), v.to_string())).collect())
    }

    #[test]
    fn variables_take_their_segments() {
        assert_eq!(
            bound("/v1/messages/{message_id}/{sub.subfield}", "/v1/messages/123456/foo"),
            pairs(&[("message_id", "123456"), ("sub.subfield", "foo")])
        );
        assert_eq!(bound("/v1/{name=messages/*}", "/v1/messages/42"), pairs(&[("name", "messages/42")]));
        assert_eq!(bound("/v1/{name=messages/*}", "/v1/users/42"), None, "the literal inside the variable");
        assert_eq!(
            bound("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2"),
            pairs(&[("name", "shelves/1/books/2")])
        );
        assert_eq!(bound("/v1/messages/{id}", "/v1/messages"), None);
        assert_eq!(bound("/v1/messages/{id}", "/v1/messages/"), None, "an empty segment is no value");
        assert_eq!(bound("/v1/messages/{id}", "/v1/messages/1/2"), None);
    }

    #[test]
    fn double_star_takes_the_rest_and_verbs_end_the_path() {
        assert_eq!(bound("/v1/{path=**}", "/v1/a/b/c"), pairs(&[("path", "a/b/c")]));
        assert_eq!(bound("/v1/{path=**}", "/v1"), pairs(&[("path", "")]));
        assert_eq!(bound("/v1/files/**", "/v1/files/x/y"), pairs(&[]));
        assert_eq!(
            bound("/v1/{name=operations/**}:cancel", "/v1/operations/a/b:cancel"),
            pairs(&[("name", "operations/a/b")])
        );
        assert_eq!(bound("/v1/{name}:cancel", "/v1/op:cancel"), pairs(&[("name", "op")]));
        assert_eq!(bound("/v1/{name}:cancel", "/v1/op"), None);
        assert_eq!(
            bound("/v1/{name}", "/v1/op:cancel"),
            pairs(&[("name", "op:cancel")]),
            "no verb: the colon is the value's"
        );
    }

    #[test]
    fn values_are_percent_decoded_but_a_multi_segment_value_keeps_its_encoded_slashes() {
        assert_eq!(bound("/v1/{name}", "/v1/a%20b%2Fc"), pairs(&[("name", "a b/c")]));
        assert_eq!(bound("/v1/{name=**}", "/v1/a%20b%2Fc/d"), pairs(&[("name", "a b%2Fc/d")]));
        assert_eq!(bound("/v1/{name}", "/v1/%FF"), pairs(&[("name", "\u{FFFD}")]), "not UTF-8: replaced, no panic");
    }

    #[test]
    fn malformed_templates_say_what_is_wrong() {
        let error = |text: &str| PathTemplate::parse(text).unwrap_err();
        assert!(error("v1/x").contains("starts with /"));
        assert!(error("/v1/{name").contains("not closed"));
        assert!(error("/v1/name}").contains("closes no variable"));
        assert!(error("/v1/{a={b}}").contains("another variable"));
        assert!(error("/v1/**/x").contains("`**` may only be the last"));
        assert!(error("/v1//x").contains("empty"));
        assert!(error("/v1/{a}/{a}").contains("bound twice"));
        assert!(error("/v1/{a-b}").contains("not a field path"));
        assert!(error("/v1/x:").contains("verb"));
    }

    #[test]
    fn templates_that_match_the_same_paths_have_one_shape() {
        let shape = |text: &str| PathTemplate::parse(text).unwrap().shape();
        assert_eq!(shape("/v1/messages/{id}"), shape("/v1/{name=messages/*}"));
        assert_eq!(shape("/v1/{name=ops/**}:cancel"), "/v1/ops/**:cancel");
        assert_ne!(shape("/v1/messages/{id}"), shape("/v1/messages/{id}:cancel"));
    }

    #[test]
    fn the_most_specific_template_sorts_first() {
        let mut templates: Vec<PathTemplate> =
            ["/v1/{name=**}", "/v1/{id}", "/v1/special", "/v1/{id}:cancel", "/v1/{id}/items"]
                .iter()
                .map(|text| PathTemplate::parse(text).unwrap())
                .collect();
        templates.sort_by(PathTemplate::specificity);
        let order: Vec<&str> = templates.iter().map(PathTemplate::as_str).collect();
        assert_eq!(order, ["/v1/{id}:cancel", "/v1/special", "/v1/{id}", "/v1/{id}/items", "/v1/{name=**}"]);
    }
}
