//! The HTTP request edgeload sends: built once from the command line (`-m`, `-H`,
//! `--body`, `--http1.0`) before the test starts, then copied `depth` times per write.
//!
//! Rules, so that what goes on the wire is what the user asked for and still a request
//! edgeload can measure:
//! - edgeload's defaults are `Host` (from the URL) and `User-Agent: edgeload`; a `-H`
//!   of the same name (any case) replaces the default.
//! - `--http1.0` writes `HTTP/1.0` in the request line and adds `Connection: keep-alive`
//!   unless a `-H Connection` is given.
//! - A body goes with a `Content-Length` that edgeload computes. A `-H Content-Length`
//!   or `-H Transfer-Encoding` is refused: the first could disagree with the body, the
//!   second would need framing edgeload does not write. `--body ''` sends
//!   `Content-Length: 0`.
//! - A `-H Connection` holding `close` is refused: edgeload keeps connections alive, and
//!   `--reconnect` is the flag for a new connection per request.
//! - Header names must be tokens, values visible characters, spaces and tabs (no CR or
//!   LF, so a value cannot smuggle in another header); the method must be a token.

use crate::http1::{has_token, is_field_vchar, is_tchar};

use super::LoadError;

/// What the user asked to send; the URL gives the path and the default `Host`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestSpec {
    /// `-m/--method`; None sends GET. Kept apart from GET so that `-m` given with a
    /// `tcp://` URL can be refused.
    pub method: Option<String>,
    /// `-H/--header`, each as the user wrote it (`Name: value`), in order.
    pub headers: Vec<String>,
    /// `--body` or `--body-file`, sent with `Content-Length`.
    pub body: Option<Vec<u8>>,
    /// `--http1.0`: an HTTP/1.0 request line, and `Connection: keep-alive`.
    pub http10: bool,
}

impl RequestSpec {
    /// The method sent.
    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("GET")
    }

    /// Whether responses carry no body whatever their headers say (RFC 9112 §6.3).
    pub fn is_head(&self) -> bool {
        self.method() == "HEAD"
    }

    /// Whether anything was asked besides the default GET, for refusing it on `tcp://`:
    /// the flag to name, if so.
    pub fn http_only_flag(&self) -> Option<&'static str> {
        if self.method.is_some() {
            Some("-m/--method")
        } else if !self.headers.is_empty() {
            Some("-H/--header")
        } else if self.body.is_some() {
            Some("--body/--body-file")
        } else if self.http10 {
            Some("--http1.0")
        } else {
            None
        }
    }
}

/// Splits a `-H` argument into name and value (optional whitespace around the value
/// dropped), refusing anything that is not one well-formed header line.
pub fn parse_header(h: &str) -> Result<(&str, &str), LoadError> {
    let bad = |why: &str| Err(LoadError::Config(format!("-H/--header {h:?}: {why}")));
    if h.bytes().any(|b| b == b'\r' || b == b'\n') {
        return bad("a header cannot hold CR or LF");
    }
    let Some((name, value)) = h.split_once(':') else {
        return bad("expected 'Name: value'");
    };
    if name.is_empty() {
        return bad("the name is empty; expected 'Name: value'");
    }
    if !name.bytes().all(is_tchar) {
        return bad("the name must be a token (letters, digits, !#$%&'*+-.^_`|~; no spaces)");
    }
    let value = value.trim_matches([' ', '\t']);
    if !value
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || is_field_vchar(b))
    {
        return bad("the value holds a control character");
    }
    Ok((name, value))
}

/// The request's bytes: request line, headers, blank line, body.
pub fn build_request(host: &str, path: &str, spec: &RequestSpec) -> Result<Vec<u8>, LoadError> {
    let bad = |m: String| Err(LoadError::Config(m));
    let method = spec.method();
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return bad(format!(
            "-m/--method {method:?}: a method is a token such as GET, POST or PURGE"
        ));
    }
    if method == "CONNECT" {
        return bad("-m/--method CONNECT opens a tunnel; edgeload cannot measure one".into());
    }
    let mut user = Vec::with_capacity(spec.headers.len());
    for h in &spec.headers {
        user.push(parse_header(h)?);
    }
    let given = |n: &str| user.iter().any(|(name, _)| name.eq_ignore_ascii_case(n));
    for (name, value) in &user {
        if name.eq_ignore_ascii_case("content-length") {
            return bad(format!(
                "-H/--header {name}: edgeload sets Content-Length from --body/--body-file \
                 (--body '' sends Content-Length: 0)"
            ));
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return bad(format!(
                "-H/--header {name}: edgeload sends a body with Content-Length only"
            ));
        }
        if name.eq_ignore_ascii_case("connection") && has_token(value.as_bytes(), "close") {
            return bad(format!(
                "-H/--header '{name}: {value}': edgeload keeps connections alive; \
                 use --reconnect for a new connection per request"
            ));
        }
    }
    if user
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .count()
        > 1
    {
        return bad("-H/--header Host is given more than once".into());
    }

    let version = if spec.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    let mut head = format!("{method} {path} {version}\r\n");
    if !given("host") {
        head.push_str(&format!("Host: {host}\r\n"));
    }
    if !given("user-agent") {
        head.push_str("User-Agent: edgeload\r\n");
    }
    if spec.http10 && !given("connection") {
        // HTTP/1.0 closes after each response unless asked not to.
        head.push_str("Connection: keep-alive\r\n");
    }
    for (name, value) in &user {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = &spec.body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(body) = &spec.body {
        out.extend_from_slice(body);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(spec: RequestSpec) -> Result<String, String> {
        build_request("h:1", "/p?q", &spec)
            .map(|b| String::from_utf8(b).unwrap())
            .map_err(|e| e.to_string())
    }

    fn headers(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_default_is_a_keep_alive_get() {
        assert_eq!(
            build(RequestSpec::default()).unwrap(),
            "GET /p?q HTTP/1.1\r\nHost: h:1\r\nUser-Agent: edgeload\r\n\r\n"
        );
    }

    #[test]
    fn user_headers_replace_defaults_and_a_body_gets_its_length() {
        let spec = RequestSpec {
            method: Some("POST".into()),
            headers: headers(&[
                "host: example.org",
                "X-A:  1 2\t",
                "USER-AGENT: me",
                "X-A: 3",
            ]),
            body: Some(b"{\"k\":1}".to_vec()),
            http10: false,
        };
        assert_eq!(
            build(spec).unwrap(),
            "POST /p?q HTTP/1.1\r\nhost: example.org\r\nX-A: 1 2\r\nUSER-AGENT: me\r\nX-A: 3\r\n\
             Content-Length: 7\r\n\r\n{\"k\":1}"
        );
        let empty = RequestSpec {
            body: Some(Vec::new()),
            ..RequestSpec::default()
        };
        assert!(build(empty).unwrap().ends_with("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn http10_asks_for_keep_alive_unless_told_otherwise() {
        let spec = RequestSpec {
            http10: true,
            ..RequestSpec::default()
        };
        assert_eq!(
            build(spec.clone()).unwrap(),
            "GET /p?q HTTP/1.0\r\nHost: h:1\r\nUser-Agent: edgeload\r\nConnection: keep-alive\r\n\r\n"
        );
        let own = RequestSpec {
            headers: headers(&["connection: Keep-Alive, x"]),
            ..spec
        };
        assert_eq!(
            build(own).unwrap(),
            "GET /p?q HTTP/1.0\r\nHost: h:1\r\nUser-Agent: edgeload\r\nconnection: Keep-Alive, x\r\n\r\n"
        );
    }

    #[test]
    fn bad_requests_are_refused_with_the_flag_named() {
        for (method, h, says) in [
            (Some("GE T"), vec![], "-m/--method"),
            (Some(""), vec![], "-m/--method"),
            (Some("CONNECT"), vec![], "tunnel"),
            (None, vec!["X-A: 1\r\nX-B: 2"], "CR or LF"),
            (None, vec!["X-A: 1\n"], "CR or LF"),
            (None, vec!["no colon"], "'Name: value'"),
            (None, vec![": v"], "name is empty"),
            (None, vec!["X A: v"], "token"),
            (None, vec!["X-A : v"], "token"),
            (None, vec!["X-A: a\0b"], "control"),
            (
                None,
                vec!["Content-Length: 3"],
                "Content-Length from --body",
            ),
            (
                None,
                vec!["transfer-encoding: chunked"],
                "Content-Length only",
            ),
            (None, vec!["Connection: close"], "--reconnect"),
            (None, vec!["Host: a", "HOST: b"], "more than once"),
        ] {
            let spec = RequestSpec {
                method: method.map(String::from),
                headers: headers(&h),
                ..RequestSpec::default()
            };
            let e = build(spec).unwrap_err();
            assert!(e.contains(says), "{method:?} {h:?}: {e}");
            if !h.is_empty() {
                assert!(e.contains("-H/--header"), "{e}");
            }
        }
    }

    #[test]
    fn head_and_http_only_flags() {
        let head = RequestSpec {
            method: Some("HEAD".into()),
            ..RequestSpec::default()
        };
        assert!(head.is_head());
        assert_eq!(head.http_only_flag(), Some("-m/--method"));
        assert!(!RequestSpec::default().is_head());
        assert_eq!(RequestSpec::default().http_only_flag(), None);
        let http10 = RequestSpec {
            http10: true,
            ..RequestSpec::default()
        };
        assert_eq!(http10.http_only_flag(), Some("--http1.0"));
    }
}
