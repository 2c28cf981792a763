//! Checks a kubeconfig an operator registers before it is sealed and stored: it must parse,
//! name one context whose cluster has a server URL, and not make the Bud host run commands or
//! read its files unless `clusters.allow_exec_kubeconfig` says the kubeconfig's authors are
//! trusted with the host. Pure: nothing here connects, runs or reads anything.

use bud_domain::ValidationError;
use kube::config::{AuthInfo, Kubeconfig, NamedContext};

/// The largest kubeconfig accepted; real ones are a few KiB, even with embedded certificates.
pub const MAX_KUBECONFIG_BYTES: usize = 1024 * 1024;

/// The field every error names.
const FIELD: &str = "kubeconfig";

/// The setting that lets kubeconfigs run commands and read files on the Bud host.
const ALLOW_EXEC_SETTING: &str = "clusters.allow_exec_kubeconfig";

/// What a valid kubeconfig connects to, for the operator to confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeconfigSummary {
    /// The API server URL of the chosen context's cluster.
    pub server: String,
    /// The context the driver uses: the current one, or the only one.
    pub context: String,
    /// The user of that context; "" when the context names none (anonymous access).
    pub user: String,
}

/// Parses `yaml` and checks it can be used as registered; see the module docs.
pub fn validate_kubeconfig(
    yaml: &str,
    allow_exec: bool,
) -> Result<KubeconfigSummary, ValidationError> {
    if yaml.len() > MAX_KUBECONFIG_BYTES {
        return Err(invalid(format!(
            "is {} bytes; at most {MAX_KUBECONFIG_BYTES} (1 MiB) are accepted",
            yaml.len()
        )));
    }
    if yaml.trim().is_empty() {
        return Err(invalid("is empty"));
    }
    // The first line only: the parser goes on to quote the offending line, which may hold a
    // token or a key.
    let config = Kubeconfig::from_yaml(yaml).map_err(|e| {
        let e = e.to_string();
        invalid(format!("is not a valid kubeconfig: {}", e.lines().next().unwrap_or_default()))
    })?;
    let context = chosen_context(&config)?;
    let Some(details) = &context.context else {
        return Err(invalid(format!("context {:?} has no cluster", context.name)));
    };

    let cluster = config.clusters.iter().find(|c| c.name == details.cluster).ok_or_else(|| {
        invalid(format!(
            "context {:?} names cluster {:?}, which is not in the file",
            context.name, details.cluster
        ))
    })?;
    let cluster_details = cluster.cluster.as_ref();
    let server = cluster_details.and_then(|c| c.server.as_deref()).unwrap_or("").trim();
    if server.is_empty() {
        return Err(invalid(format!("cluster {:?} has no server URL", cluster.name)));
    }
    let url_ok = reqwest::Url::parse(server)
        .is_ok_and(|u| matches!(u.scheme(), "https" | "http") && u.host_str().is_some());
    if !url_ok {
        return Err(invalid(format!(
            "cluster {:?} has server {server:?}; it must be an https:// (or http://) URL",
            cluster.name
        )));
    }
    if let Some(c) = cluster_details
        && !allow_exec
        && let Some(path) = &c.certificate_authority
    {
        let whose = format!("cluster {:?}", cluster.name);
        return Err(reads_host_file(
            &whose,
            "certificate-authority",
            path,
            "certificate-authority-data",
        ));
    }

    let user = details.user.clone().unwrap_or_default();
    if !user.is_empty() {
        let auth = config.auth_infos.iter().find(|u| u.name == user).ok_or_else(|| {
            invalid(format!(
                "context {:?} names user {user:?}, which is not in the file",
                context.name
            ))
        })?;
        if let Some(info) = &auth.auth_info
            && !allow_exec
        {
            check_host_access(&user, info)?;
        }
    }

    Ok(KubeconfigSummary { server: server.to_owned(), context: context.name.clone(), user })
}

fn invalid(message: impl Into<String>) -> ValidationError {
    ValidationError::new(FIELD, message)
}

/// The current context, or the only one when none is current.
fn chosen_context(config: &Kubeconfig) -> Result<&NamedContext, ValidationError> {
    match config.current_context.as_deref().filter(|c| !c.is_empty()) {
        Some(name) => config.contexts.iter().find(|c| c.name == name).ok_or_else(|| {
            invalid(format!("current-context is {name:?}, which is not in the file's contexts"))
        }),
        None => match config.contexts.as_slice() {
            [only] => Ok(only),
            [] => Err(invalid("has no context")),
            _ => Err(invalid(format!(
                "has {} contexts and no current-context; set current-context to the one to use",
                config.contexts.len()
            ))),
        },
    }
}

/// Refuses auth that runs commands or reads files on the Bud host. A kubeconfig is uploaded by
/// an operator but used by the server process: `exec` and `auth-provider` would run programs
/// as that process, and file references would send the host's files (as a token or client
/// certificate) to whatever server the kubeconfig names.
fn check_host_access(user: &str, info: &AuthInfo) -> Result<(), ValidationError> {
    let whose = format!("user {user:?}");
    if let Some(exec) = &info.exec {
        let command = exec.command.as_deref().unwrap_or("a command");
        return Err(invalid(format!(
            "{whose} authenticates with exec ({command:?}), which runs a command on the Bud host; \
             use a token or client certificate, or set {ALLOW_EXEC_SETTING} = true to allow it"
        )));
    }
    if let Some(provider) = &info.auth_provider {
        return Err(invalid(format!(
            "{whose} authenticates with auth-provider {:?}, which runs commands on the Bud host; \
             use a token or client certificate, or set {ALLOW_EXEC_SETTING} = true to allow it",
            provider.name
        )));
    }
    let files = [
        ("tokenFile", &info.token_file, "token"),
        ("client-certificate", &info.client_certificate, "client-certificate-data"),
        ("client-key", &info.client_key, "client-key-data"),
    ];
    for (key, path, embedded) in files {
        if let Some(path) = path {
            return Err(reads_host_file(&whose, key, path, embedded));
        }
    }
    Ok(())
}

fn reads_host_file(whose: &str, key: &str, path: &str, embedded: &str) -> ValidationError {
    invalid(format!(
        "{whose} has {key} {path:?}, which reads a file on the Bud host; embed its content as \
         {embedded}, or set {ALLOW_EXEC_SETTING} = true to allow it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kubeconfig with one cluster, one context and `user` as its user's auth.
    fn kubeconfig(server: &str, user: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: gpu
  cluster:
    server: {server}
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
contexts:
- name: gpu-admin
  context:
    cluster: gpu
    user: admin
    namespace: default
current-context: gpu-admin
users:
- name: admin
  user:
{user}
"
        )
    }

    const TOKEN: &str = "    token: abc.def";

    fn message(yaml: &str, allow_exec: bool) -> String {
        let e = validate_kubeconfig(yaml, allow_exec).unwrap_err();
        assert_eq!(e.field, "kubeconfig");
        e.message
    }

    #[test]
    fn a_token_kubeconfig_is_summarised() {
        let summary =
            validate_kubeconfig(&kubeconfig("https://10.0.0.1:6443", TOKEN), false).unwrap();
        assert_eq!(
            summary,
            KubeconfigSummary {
                server: "https://10.0.0.1:6443".into(),
                context: "gpu-admin".into(),
                user: "admin".into(),
            }
        );
    }

    #[test]
    fn the_only_context_is_used_when_none_is_current() {
        let yaml = kubeconfig("https://k8s.example.com", TOKEN)
            .replace("current-context: gpu-admin\n", "");
        assert_eq!(validate_kubeconfig(&yaml, false).unwrap().context, "gpu-admin");
    }

    #[test]
    fn several_contexts_need_a_current_one() {
        let yaml = kubeconfig("https://k8s.example.com", TOKEN)
            .replace("current-context: gpu-admin\n", "")
            .replace(
                "contexts:\n",
                "contexts:\n- name: other\n  context:\n    cluster: gpu\n    user: admin\n",
            );
        assert!(message(&yaml, false).contains("set current-context"));
    }

    #[test]
    fn a_current_context_that_is_not_there_is_refused() {
        let yaml = kubeconfig("https://k8s.example.com", TOKEN)
            .replace("current-context: gpu-admin", "current-context: nope");
        assert!(message(&yaml, false).contains("\"nope\""));
    }

    #[test]
    fn no_context_is_refused() {
        assert!(
            message("apiVersion: v1\nkind: Config\nclusters: []\n", false).contains("no context")
        );
    }

    #[test]
    fn a_missing_cluster_or_user_is_refused() {
        let yaml = kubeconfig("https://k8s.example.com", TOKEN)
            .replace("    cluster: gpu\n", "    cluster: cpu\n");
        assert!(message(&yaml, false).contains("cluster \"cpu\", which is not in the file"));
        let yaml = kubeconfig("https://k8s.example.com", TOKEN)
            .replace("    user: admin\n", "    user: root\n");
        assert!(message(&yaml, false).contains("user \"root\", which is not in the file"));
    }

    #[test]
    fn the_server_must_be_an_http_url() {
        assert!(message(&kubeconfig("ftp://k8s.example.com", TOKEN), false).contains("https://"));
        assert!(message(&kubeconfig("k8s.example.com:6443", TOKEN), false).contains("https://"));
        let yaml = kubeconfig("https://k8s.example.com", TOKEN)
            .replace("    server: https://k8s.example.com\n", "");
        assert!(message(&yaml, false).contains("no server URL"));
        assert!(validate_kubeconfig(&kubeconfig("http://127.0.0.1:8001", TOKEN), false).is_ok());
    }

    #[test]
    fn what_is_not_a_kubeconfig_is_refused() {
        assert!(message("", false).contains("empty"));
        assert!(message("clusters: [", false).contains("not a valid kubeconfig"));
        assert!(message("clusters: 3", false).contains("not a valid kubeconfig"));
        // The parser quotes the line it stopped at; the message must not.
        let m = message("users:\n- name: u\n  user: { token: s3cret\n", false);
        assert!(m.contains("not a valid kubeconfig") && !m.contains("s3cret"), "{m}");
    }

    #[test]
    fn more_than_a_mebibyte_is_refused() {
        let yaml = format!(
            "{}\n# {}\n",
            kubeconfig("https://k8s.example.com", TOKEN),
            "x".repeat(MAX_KUBECONFIG_BYTES)
        );
        assert!(message(&yaml, false).contains("1 MiB"));
    }

    #[test]
    fn exec_is_refused_unless_allowed() {
        let exec = "    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      command: aws
      args: [eks, get-token, --cluster-name, gpu]";
        let yaml = kubeconfig("https://k8s.example.com", exec);
        let m = message(&yaml, false);
        assert!(m.contains("runs a command on the Bud host"), "{m}");
        assert!(m.contains("clusters.allow_exec_kubeconfig"), "{m}");
        assert!(m.contains("\"aws\""), "{m}");
        assert_eq!(validate_kubeconfig(&yaml, true).unwrap().user, "admin");
    }

    #[test]
    fn auth_providers_are_refused_unless_allowed() {
        let provider = "    auth-provider:
      name: gcp
      config:
        cmd-path: /usr/bin/gcloud";
        let yaml = kubeconfig("https://k8s.example.com", provider);
        let m = message(&yaml, false);
        assert!(m.contains("auth-provider \"gcp\""), "{m}");
        assert!(m.contains("clusters.allow_exec_kubeconfig"), "{m}");
        assert!(validate_kubeconfig(&yaml, true).is_ok());
    }

    #[test]
    fn files_on_the_host_are_refused_unless_allowed() {
        for (user, key) in [
            ("    tokenFile: /etc/shadow", "tokenFile"),
            (
                "    client-certificate: /root/.kube/admin.crt\n    client-key-data: a2V5",
                "client-certificate",
            ),
            (
                "    client-certificate-data: Y2VydA==\n    client-key: /root/.kube/admin.key",
                "client-key",
            ),
        ] {
            let yaml = kubeconfig("https://k8s.example.com", user);
            let m = message(&yaml, false);
            assert!(m.contains(key) && m.contains("reads a file on the Bud host"), "{m}");
            assert!(validate_kubeconfig(&yaml, true).is_ok());
        }
        let yaml = kubeconfig("https://k8s.example.com", TOKEN).replace(
            "certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==",
            "certificate-authority: /etc/kubernetes/pki/ca.crt",
        );
        assert!(message(&yaml, false).contains("certificate-authority-data"));
    }

    #[test]
    fn a_context_without_a_user_is_anonymous() {
        let yaml = kubeconfig("https://k8s.example.com", TOKEN).replace("    user: admin\n", "");
        assert_eq!(validate_kubeconfig(&yaml, false).unwrap().user, "");
    }
}
