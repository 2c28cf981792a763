//! The OpenAI wire format as far as the gateway needs it: the error envelope and its registry
//! (code → type → status), the few request fields it reads, the in-place rewrite of a request
//! body, and the `usage` it meters.
//!
//! Bodies are never re-serialised: the fields the gateway reads are borrowed from the request's
//! bytes, and a rewrite splices new bytes in place of the old value, so every field the gateway
//! does not know about reaches the upstream exactly as the client wrote it.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use http::StatusCode;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// Every error the gateway answers with, and how it looks on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The body is not the JSON object the endpoint expects.
    InvalidRequest,
    /// The body is larger than `max_request_bytes`.
    RequestTooLarge,
    /// No `Authorization: Bearer` key, or one that is unknown, revoked or expired.
    InvalidApiKey,
    /// The key's project may not use the model (or it does not exist: the client cannot tell).
    ModelNotFound,
    /// No such path.
    UnknownUrl,
    /// A known path with the wrong method.
    MethodNotAllowed,
    /// The key's or route's requests per minute are spent.
    RequestsRateLimited,
    /// The key's or route's tokens per minute are spent.
    TokensRateLimited,
    /// Every upstream tried answered 429.
    UpstreamRateLimited,
    /// Every upstream tried failed (refused, reset, 5xx, malformed answer).
    BadGateway,
    /// No upstream could be tried: every target's breaker is open, or the route has none.
    Unavailable,
    /// The upstreams did not answer in time.
    Timeout,
    /// A limited request could not be checked: the shared rate limiter (Redis) is unreachable
    /// and the gateway is configured to fail closed.
    RateLimiterUnavailable,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            Self::InvalidRequest => StatusCode::BAD_REQUEST,
            Self::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound | Self::UnknownUrl => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestsRateLimited | Self::TokensRateLimited | Self::UpstreamRateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::Unavailable | Self::RateLimiterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The envelope's `type`, as OpenAI spells it.
    pub fn kind(self) -> &'static str {
        match self {
            Self::InvalidRequest
            | Self::RequestTooLarge
            | Self::ModelNotFound
            | Self::UnknownUrl
            | Self::MethodNotAllowed => "invalid_request_error",
            Self::InvalidApiKey => "authentication_error",
            Self::RequestsRateLimited => "requests",
            Self::TokensRateLimited => "tokens",
            Self::UpstreamRateLimited => "rate_limit_error",
            Self::BadGateway | Self::Timeout => "api_error",
            Self::Unavailable | Self::RateLimiterUnavailable => "server_error",
        }
    }

    /// The envelope's `code`.
    pub fn code(self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest => None,
            Self::RequestTooLarge => Some("request_too_large"),
            Self::InvalidApiKey => Some("invalid_api_key"),
            Self::ModelNotFound => Some("model_not_found"),
            Self::UnknownUrl => Some("unknown_url"),
            Self::MethodNotAllowed => Some("method_not_allowed"),
            Self::RequestsRateLimited | Self::TokensRateLimited | Self::UpstreamRateLimited => {
                Some("rate_limit_exceeded")
            }
            Self::BadGateway => Some("bad_gateway"),
            Self::Unavailable => Some("service_unavailable"),
            Self::Timeout => Some("timeout"),
            Self::RateLimiterUnavailable => Some("rate_limiter_unavailable"),
        }
    }
}

/// An error answer: the code and a message for the client (never a cause chain: 5xx messages
/// are fixed texts, their causes are logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), param: None }
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// `{"error":{"message","type","param","code"}}`.
    pub fn envelope(&self) -> Bytes {
        error_envelope(self.code, &self.message, self.param)
    }

    /// The envelope as one SSE event, which is how a stream that already started reports a
    /// failure (followed by the end of the stream, never by `data: [DONE]`).
    pub fn sse_event(&self) -> Bytes {
        let envelope = self.envelope();
        let mut event = BytesMut::with_capacity(envelope.len() + 8);
        event.put_slice(b"data: ");
        event.put_slice(&envelope);
        event.put_slice(b"\n\n");
        event.freeze()
    }
}

fn error_envelope(code: ErrorCode, message: &str, param: Option<&str>) -> Bytes {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        error: Body<'a>,
    }
    #[derive(serde::Serialize)]
    struct Body<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    }
    let envelope =
        Envelope { error: Body { message, kind: code.kind(), param, code: code.code() } };
    // Serialising borrowed strings into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
}

/// The request fields the gateway reads, borrowed from the body. Everything else is skipped by
/// the parser and forwarded untouched.
#[derive(Debug, Deserialize)]
pub struct RequestHead<'a> {
    /// Kept raw so that its position in the body is known for a rewrite.
    #[serde(borrow)]
    model: &'a RawValue,
    #[serde(default)]
    stream: Option<bool>,
    /// `Some` even when the value is `null`, so a rewrite replaces it rather than adding a
    /// second key.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// What [`RequestHead::parse`] found, owning nothing but the model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    /// The public model name the client asked for.
    pub model: String,
    pub stream: bool,
    /// Whether the client itself asked for the usage chunk at the end of a stream.
    pub include_usage: bool,
    model_span: Range<usize>,
    /// Where `stream_options`' value lies, or, when absent, `None`.
    stream_options_span: Option<Range<usize>>,
    /// Just after the body's opening `{`.
    object_start: usize,
}

impl<'a> RequestHead<'a> {
    /// Reads the fields the gateway needs from a request body.
    pub fn parse(body: &'a [u8]) -> Result<ParsedRequest, ApiError> {
        let object_start = match body.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) if body[i] == b'{' => i + 1,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "the request body must be a JSON object",
                ));
            }
        };
        let head: RequestHead<'_> = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(ErrorCode::InvalidRequest, format!("invalid request body: {e}"))
        })?;
        let model = json_string(head.model.get()).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidRequest, "`model` must be a string").with_param("model")
        })?;
        let include_usage = match head.stream_options {
            None => false,
            Some(raw) => serde_json::from_str::<Option<StreamOptions>>(raw.get())
                .map_err(|e| {
                    ApiError::new(ErrorCode::InvalidRequest, format!("invalid stream_options: {e}"))
                        .with_param("stream_options")
                })?
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        };
        let model_span = span_of(body, head.model.get()).ok_or_else(internal_span_error)?;
        let stream_options_span = match head.stream_options {
            Some(raw) => Some(span_of(body, raw.get()).ok_or_else(internal_span_error)?),
            None => None,
        };
        Ok(ParsedRequest {
            model,
            stream: head.stream.unwrap_or(false),
            include_usage,
            model_span,
            stream_options_span,
            object_start,
        })
    }
}

fn internal_span_error() -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, "invalid request body")
}

/// A JSON string literal's value.
fn json_string(raw: &str) -> Option<String> {
    serde_json::from_str::<String>(raw).ok()
}

/// Where `part`, a slice the parser borrowed from `body`, lies in `body`.
fn span_of(body: &[u8], part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let range = start..start + part.len();
    (body.get(range.clone()) == Some(part.as_bytes())).then_some(range)
}

impl ParsedRequest {
    /// The body to send upstream: `model` replaced by `upstream_model` when it differs, and for
    /// a stream `stream_options.include_usage` forced on (so usage can be metered). The original
    /// bytes are returned, shared, when nothing changes.
    pub fn upstream_body(&self, body: &Bytes, upstream_model: &str, meter_stream: bool) -> Bytes {
        let rename = upstream_model != self.model;
        let force_usage = meter_stream && self.stream && !self.include_usage;
        if !rename && !force_usage {
            return body.clone();
        }
        // Edits as (range replaced, new bytes), applied from the front.
        let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::with_capacity(2);
        if rename {
            let quoted = serde_json::to_vec(upstream_model).unwrap_or_default();
            edits.push((self.model_span.clone(), quoted));
        }
        if force_usage {
            match &self.stream_options_span {
                Some(span) => {
                    let old = &body[span.clone()];
                    let mut options = serde_json::from_slice::<serde_json::Value>(old)
                        .ok()
                        .and_then(|v| match v {
                            serde_json::Value::Object(map) => Some(map),
                            _ => None,
                        })
                        .unwrap_or_default();
                    options.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
                    let new = serde_json::to_vec(&options).unwrap_or_default();
                    edits.push((span.clone(), new));
                }
                None => {
                    // The object holds at least `model`, so a comma always follows.
                    let at = self.object_start;
                    edits.push((at..at, b"\"stream_options\":{\"include_usage\":true},".to_vec()));
                }
            }
        }
        edits.sort_by_key(|(range, _)| range.start);
        let grow: usize = edits.iter().map(|(_, new)| new.len()).sum();
        let mut out = BytesMut::with_capacity(body.len() + grow);
        let mut at = 0;
        for (range, new) in &edits {
            out.put_slice(&body[at..range.start]);
            out.put_slice(new);
            at = range.end;
        }
        out.put_slice(&body[at..]);
        out.freeze()
    }
}

/// Token counts as upstreams report them. Embeddings report no completion tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u32,
    #[serde(default)]
    pub completion_tokens: u32,
}

impl Usage {
    pub fn total(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// A non-streaming answer as far as metering reads it; parsing it also checks that the
/// upstream sent well-formed JSON.
#[derive(Debug, Deserialize)]
pub struct AnswerUsage {
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// One `data:` event of a stream as far as the relay reads it.
#[derive(Debug, Deserialize)]
pub struct StreamChunk {
    /// Only counted: each choice in a chunk carries about one token. `IgnoredAny` has no size,
    /// so the vector does not allocate.
    #[serde(default)]
    pub choices: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    pub usage: Option<Usage>,
    /// An upstream reporting a failure in-band.
    #[serde(default)]
    pub error: Option<IgnoredAny>,
}

/// `GET /v1/models`: the routes the key may use.
pub fn model_list<'a>(names: impl Iterator<Item = &'a str>) -> Bytes {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    let data: Vec<ModelObject<'_>> = names.into_iter().map(ModelObject::new).collect();
    let list = ModelList { object: "list", data };
    Bytes::from(serde_json::to_vec(&list).unwrap_or_default())
}

/// `GET /v1/models/{model}`.
pub fn model_object(name: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&ModelObject::new(name)).unwrap_or_default())
}

#[derive(serde::Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelObject<'a>>,
}

#[derive(serde::Serialize)]
struct ModelObject<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

impl<'a> ModelObject<'a> {
    fn new(id: &'a str) -> Self {
        Self { id, object: "model", created: 0, owned_by: "bud" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(body: &str, to: &str, meter: bool) -> String {
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let parsed = RequestHead::parse(&bytes).unwrap();
        String::from_utf8(parsed.upstream_body(&bytes, to, meter).to_vec()).unwrap()
    }

    #[test]
    fn reads_the_fields_it_needs_and_nothing_else() {
        let body =
            br#" {"messages":[{"role":"user","content":"hi"}],"model":"m\u0031","stream":true,
            "stream_options":{"include_usage":true},"max_tokens":5,"extra":{"a":[1,2]}}"#;
        let p = RequestHead::parse(body).unwrap();
        assert_eq!(p.model, "m1");
        assert!(p.stream);
        assert!(p.include_usage);
    }

    #[test]
    fn rejects_what_is_not_a_request_object() {
        for body in
            [&b"[\"model\"]"[..], b"{}", b"{\"model\":3}", b"nope", b"", b"{\"model\":\"a\""]
        {
            let e = RequestHead::parse(body).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{}", String::from_utf8_lossy(body));
        }
        // A second `model` could make the upstream read another model than the one authorised.
        let e = RequestHead::parse(br#"{"model":"a","model":"b"}"#).unwrap_err();
        assert!(e.message.contains("duplicate"), "{}", e.message);
    }

    #[test]
    fn an_unchanged_body_is_the_same_bytes() {
        let bytes = Bytes::from_static(br#"{"model":"m","stream":false}"#);
        let parsed = RequestHead::parse(&bytes).unwrap();
        let out = parsed.upstream_body(&bytes, "m", true);
        assert_eq!(out.as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn rewrites_the_model_in_place() {
        assert_eq!(
            rewrite(r#"{"model": "public" ,"x":"model"}"#, "served/\"q\"", true),
            r#"{"model": "served/\"q\"" ,"x":"model"}"#
        );
    }

    #[test]
    fn forces_usage_on_streams_only() {
        assert_eq!(
            rewrite(r#"{"model":"m","stream":true}"#, "m", true),
            r#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        assert_eq!(
            rewrite(
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"k":1}}"#,
                "n",
                true
            ),
            r#"{"model":"n","stream":true,"stream_options":{"include_usage":true,"k":1}}"#
        );
        assert_eq!(
            rewrite(r#"{"model":"m","stream":true,"stream_options":null}"#, "m", true),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            rewrite(r#"{"model":"m","stream":true}"#, "m", false),
            r#"{"model":"m","stream":true}"#
        );
        assert_eq!(rewrite(r#"{"model":"m"}"#, "m", true), r#"{"model":"m"}"#);
    }

    #[test]
    fn rewritten_bodies_stay_valid_json() {
        let out = rewrite(r#"  {"stream":true, "model":"m", "stream_options":{}}"#, "x", true);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["model"], "x");
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn envelopes_have_the_openai_shape() {
        let e = ApiError::new(ErrorCode::ModelNotFound, "no \"x\"").with_param("model");
        let v: serde_json::Value = serde_json::from_slice(&e.envelope()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "no \"x\"", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}})
        );
        assert!(e.sse_event().starts_with(b"data: {\"error\":"));
        assert!(e.sse_event().ends_with(b"}\n\n"));
    }

    #[test]
    fn stream_chunks_count_choices_and_read_usage() {
        let c: StreamChunk = serde_json::from_str(
            r#"{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(c.choices.map(|c| c.len()), Some(0));
        assert_eq!(c.usage, Some(Usage { prompt_tokens: 3, completion_tokens: 4 }));
        let c: StreamChunk =
            serde_json::from_str(r#"{"choices":[{"delta":{"content":"a"}}],"usage":null}"#)
                .unwrap();
        assert_eq!(c.choices.map(|c| c.len()), Some(1));
        assert_eq!(c.usage, None);
    }
}
