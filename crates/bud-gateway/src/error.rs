//! The library's errors: what can go wrong setting the gateway up. Failures while serving a
//! request are not errors of the library; they become OpenAI error envelopes ([`crate::openai`]).

/// Why the gateway could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A proxy URL in the configuration does not parse.
    #[error("invalid {which} url")]
    Proxy {
        /// `http_proxy` or `https_proxy`.
        which: &'static str,
        #[source]
        source: reqwest::Error,
    },
    /// The HTTP client for external providers could not be built (TLS roots, proxies).
    #[error("building the provider http client")]
    ProviderClient(#[source] reqwest::Error),
    /// The Redis URL for shared rate limits does not parse.
    #[error("invalid redis url for rate limits")]
    RedisUrl(#[source] redis::RedisError),
}
