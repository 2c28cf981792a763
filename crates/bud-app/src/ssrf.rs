//! The server-side request forgery guard for provider base URLs: budapp stores URLs that the
//! gateway will call with a secret attached, so a URL must not point into the platform's own
//! network unless the operator says so.

use std::net::IpAddr;

use bud_domain::ValidationError;
use ipnet::IpNet;

use crate::config::ProviderPolicy;

/// Ranges refused by default: loopback, private (RFC 1918, ULA), link-local (which holds the
/// cloud metadata address 169.254.169.254), carrier-grade NAT, unspecified and multicast.
const REFUSED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Host names that always mean "this machine" or "the cloud metadata service".
const REFUSED_HOSTS: &[&str] =
    &["localhost", "metadata", "metadata.google.internal", "instance-data"];

/// Checks `raw` and returns it normalised (no trailing slash). Resolves the host name, so every
/// address it points to is checked, not just the first.
pub async fn check_provider_url(
    raw: &str,
    policy: &ProviderPolicy,
) -> Result<String, ValidationError> {
    let field = "base_url";
    let url = url::Url::parse(raw.trim()).map_err(|_| {
        ValidationError::new(
            field,
            "must be an absolute http(s) URL such as https://api.openai.com/v1",
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ValidationError::new(field, "must use http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ValidationError::new(field, "must not carry credentials; set api_key instead"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ValidationError::new(field, "must not have a query string or fragment"));
    }
    let host = url.host_str().ok_or_else(|| ValidationError::new(field, "must name a host"))?;
    let normalised = url.as_str().trim_end_matches('/').to_owned();
    if policy.allow_private_networks
        || policy.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    {
        return Ok(normalised);
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    if REFUSED_HOSTS.contains(&bare.as_str())
        || bare.ends_with(".localhost")
        || bare.ends_with(".internal")
    {
        return Err(refused(host));
    }
    let addresses: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => {
            let port = url.port_or_known_default().unwrap_or(443);
            tokio::net::lookup_host((bare.as_str(), port))
                .await
                .map_err(|_| {
                    ValidationError::new(field, format!("host `{host}` does not resolve"))
                })?
                .map(|a| a.ip())
                .collect()
        }
    };
    if addresses.iter().any(|ip| is_refused(*ip)) {
        return Err(refused(host));
    }
    Ok(normalised)
}

fn refused(host: &str) -> ValidationError {
    ValidationError::new(
        "base_url",
        format!(
            "host `{host}` is a loopback, private, link-local or metadata address; \
             set providers.allow_private_networks or list it in providers.allowed_hosts to allow it"
        ),
    )
}

/// Whether `ip` (or the IPv4 address inside an IPv4-mapped IPv6 one) is in a refused range.
pub fn is_refused(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    REFUSED.iter().filter_map(|r| r.parse::<IpNet>().ok()).any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_internal_targets_by_default() {
        let policy = ProviderPolicy::default();
        for url in [
            "http://127.0.0.1:8000/v1",
            "http://localhost/v1",
            "http://169.254.169.254/latest",
            "http://10.1.2.3/v1",
            "http://[::1]/v1",
            "http://[::ffff:127.0.0.1]/v1",
            "http://metadata.google.internal/",
            "http://192.168.1.10/",
        ] {
            assert!(check_provider_url(url, &policy).await.is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn accepts_public_ip_and_policy_exceptions() {
        let policy = ProviderPolicy::default();
        assert_eq!(
            check_provider_url("https://8.8.8.8/v1/", &policy).await.unwrap(),
            "https://8.8.8.8/v1"
        );
        let open = ProviderPolicy { allow_private_networks: true, ..Default::default() };
        assert!(check_provider_url("http://127.0.0.1:8000/v1", &open).await.is_ok());
        let listed =
            ProviderPolicy { allowed_hosts: vec!["localhost".into()], ..Default::default() };
        assert!(check_provider_url("http://localhost:8000/v1", &listed).await.is_ok());
    }

    #[tokio::test]
    async fn rejects_non_http_and_credentials() {
        let policy = ProviderPolicy::default();
        for url in
            ["ftp://8.8.8.8/", "https://user:pw@8.8.8.8/", "not a url", "https://8.8.8.8/?x=1"]
        {
            assert!(check_provider_url(url, &policy).await.is_err(), "{url}");
        }
    }
}
