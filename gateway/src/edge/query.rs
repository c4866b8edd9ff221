//! Query strings of the socket and REST paths (realtime-js appends the socket's query to REST
//! URLs and percent-encodes values).

/// One decoded query parameter.
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        (decode(k) == name).then(|| decode(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let q = Some("apikey=a%2Eb&log_level=info&vsn=2.0.0");
        assert_eq!(query_param(q, "apikey").as_deref(), Some("a.b"));
        assert_eq!(query_param(q, "vsn").as_deref(), Some("2.0.0"));
        assert_eq!(query_param(q, "nope"), None);
        assert_eq!(query_param(None, "vsn"), None);
    }
}
