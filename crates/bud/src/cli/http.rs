//! One typed HTTP client for budapp's REST API: bearer tokens from the saved session, one
//! refresh when the access token has expired, every page of a list, and the control plane's
//! error body turned into a one-line message.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bud_protocol::ErrorBody;
use bud_protocol::ErrorDetail;
use bud_protocol::control::{
    ApiKeyList, AuditList, ClusterList, EndpointList, MemberList, ModelList, ProjectList,
    ProviderList, RefreshRequest, TokenResponse, UserList,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::credentials::{Credentials, CredentialsFile};

/// The most items a list command fetches across pages.
pub const LIST_CAP: usize = 1000;

/// budapp's largest page.
const MAX_PAGE_SIZE: usize = 200;

/// Longer than budapp's own 30-second request timeout, so its answer arrives first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

const SESSION_ENDED: &str = "your session has ended: run `bud login`";

/// A client of one budapp, anonymous or on behalf of a logged-in user.
pub struct Api {
    http: reqwest::Client,
    /// Without a trailing slash; paths start with one.
    base: String,
    session: Option<Session>,
}

/// The logged-in user's tokens and where refreshed ones are saved.
struct Session {
    credentials: Credentials,
    file: CredentialsFile,
}

/// An error answer from budapp.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    /// The control plane's error body; absent when something else answered (a proxy, an old
    /// server).
    pub detail: Option<ErrorDetail>,
    body: String,
}

/// A list response: one page of items and the cursor of the next.
pub trait Page: DeserializeOwned {
    type Item;

    fn into_parts(self) -> (Vec<Self::Item>, Option<String>);
}

impl Api {
    /// A client that sends no credentials (login, logout).
    pub fn anonymous(url: &str) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url)
            .with_context(|| format!("`{url}` is not a URL such as http://127.0.0.1:9081"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            bail!("`{url}` is not an http:// or https:// URL");
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("bud-cli/", env!("CARGO_PKG_VERSION")))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("setting up the HTTP client")?;
        Ok(Self { http, base: url.trim_end_matches('/').to_owned(), session: None })
    }

    /// A client for the saved session, at `url` instead of the saved URL when given.
    pub fn logged_in(file: &CredentialsFile, url: Option<&str>) -> anyhow::Result<Self> {
        let credentials = file.load()?.ok_or_else(|| anyhow!("not logged in: run `bud login`"))?;
        let mut api = Self::anonymous(url.unwrap_or(&credentials.url))?;
        api.session = Some(Session { credentials, file: file.clone() });
        Ok(api)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub async fn get<T: DeserializeOwned>(
        &mut self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<T> {
        self.call(Method::GET, path, query, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.call(Method::POST, path, &[], Some(serde_json::to_value(body)?)).await
    }

    pub async fn put<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.call(Method::PUT, path, &[], Some(serde_json::to_value(body)?)).await
    }

    pub async fn patch<T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &impl Serialize,
    ) -> anyhow::Result<T> {
        self.call(Method::PATCH, path, &[], Some(serde_json::to_value(body)?)).await
    }

    /// DELETE; `T = ()` for routes that answer 204.
    pub async fn delete<T: DeserializeOwned>(
        &mut self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<T> {
        self.call(Method::DELETE, path, query, None).await
    }

    /// A GET whose success body is text (logs), returned as it is.
    pub async fn get_text(
        &mut self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<String> {
        let response = self.exchange(Method::GET, path, query, None).await?;
        let bytes = body(&self.base, response).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Every item of a list, following `next_cursor`, up to `max` items (a note on standard
    /// error says when more were left).
    pub async fn list<L: Page>(
        &mut self,
        path: &str,
        filters: &[(&str, String)],
        max: usize,
    ) -> anyhow::Result<Vec<L::Item>> {
        let page_size = max.clamp(1, MAX_PAGE_SIZE).to_string();
        let mut items = Vec::new();
        let mut cursor = None;
        loop {
            let mut query = filters.to_vec();
            query.push(("limit", page_size.clone()));
            query.extend(cursor.take().map(|c| ("cursor", c)));
            let (page, next) = self.get::<L>(path, &query).await?.into_parts();
            items.extend(page);
            match next {
                Some(next) if items.len() < max => cursor = Some(next),
                more => {
                    if more.is_some() || items.len() > max {
                        eprintln!("note: showing the first {max} items only");
                    }
                    items.truncate(max);
                    return Ok(items);
                }
            }
        }
    }

    /// Sends a request and reads its JSON answer.
    async fn call<T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let response = self.exchange(method, path, query, body).await?;
        read(&self.base, response).await
    }

    /// Sends a request; on 401 `token_expired`, refreshes the session once and sends it again.
    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut response = self.send(method.clone(), path, query, body.as_ref()).await?;
        if response.status() == StatusCode::UNAUTHORIZED && self.session.is_some() {
            let bytes = response.bytes().await.map_err(|e| transport(&self.base, e))?;
            let failure = ApiFailure::new(StatusCode::UNAUTHORIZED, &bytes);
            if failure.code() != Some("token_expired") {
                return Err(anyhow::Error::new(failure).context(SESSION_ENDED));
            }
            self.refresh().await?;
            response = self.send(method, path, query, body.as_ref()).await?;
        }
        Ok(response)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(session) = &self.session {
            request = request.bearer_auth(&session.credentials.access_token);
        }
        request.send().await.map_err(|e| transport(&self.base, e))
    }

    /// Trades the refresh token for new tokens and saves them before anything else: the old
    /// refresh token is spent from here on.
    async fn refresh(&mut self) -> anyhow::Result<()> {
        let Some(session) = &self.session else { bail!("not logged in: run `bud login`") };
        let body = RefreshRequest { refresh_token: session.credentials.refresh_token.clone() };
        let response = self
            .http
            .post(format!("{}/auth/refresh", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| transport(&self.base, e))?;
        let tokens: TokenResponse = read(&self.base, response).await.context(SESSION_ENDED)?;
        let Some(session) = &mut self.session else { bail!("not logged in: run `bud login`") };
        session.credentials.access_token = tokens.access_token;
        session.credentials.refresh_token = tokens.refresh_token;
        session.file.save(&session.credentials).context("saving the refreshed session")
    }
}

impl ApiFailure {
    pub fn code(&self) -> Option<&str> {
        self.detail.as_ref().map(|d| d.code.as_str())
    }

    fn new(status: StatusCode, body: &[u8]) -> Self {
        let detail = serde_json::from_slice::<ErrorBody>(body).ok().map(|b| b.error);
        Self { status, detail, body: String::from_utf8_lossy(body).into_owned() }
    }
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(d) => write!(f, "{} (code {}, request {})", d.message, d.code, d.request_id),
            None => {
                let body: String = self.body.trim().chars().take(200).collect();
                write!(f, "budapp answered {}: {body}", self.status)
            }
        }
    }
}

impl std::error::Error for ApiFailure {}

/// A success body as `T` (an empty body reads as JSON `null`, so `()` fits a 204), or the
/// error answer as an [`ApiFailure`].
async fn read<T: DeserializeOwned>(base: &str, response: reqwest::Response) -> anyhow::Result<T> {
    let status = response.status();
    let bytes = body(base, response).await?;
    let json: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
    serde_json::from_slice(json).with_context(|| {
        format!("budapp's answer ({status}) is not what this client expects; is `bud` the same version as the server?")
    })
}

/// A success body's bytes, or the error answer as an [`ApiFailure`].
async fn body(base: &str, response: reqwest::Response) -> anyhow::Result<Vec<u8>> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| transport(base, e))?;
    if !status.is_success() {
        return Err(ApiFailure::new(status, &bytes).into());
    }
    Ok(bytes.into())
}

fn transport(base: &str, e: reqwest::Error) -> anyhow::Error {
    if e.is_connect() {
        anyhow!("cannot reach budapp at {base}: is `bud serve` running?")
    } else if e.is_timeout() {
        anyhow!("budapp at {base} did not answer within {}s", REQUEST_TIMEOUT.as_secs())
    } else {
        anyhow::Error::new(e).context(format!("talking to budapp at {base}"))
    }
}

macro_rules! page {
    ($($list:ty => $item:ty),* $(,)?) => {
        $(impl Page for $list {
            type Item = $item;

            fn into_parts(self) -> (Vec<$item>, Option<String>) {
                (self.data, self.next_cursor)
            }
        })*
    };
}

page!(
    UserList => bud_protocol::control::UserDto,
    ProjectList => bud_protocol::control::ProjectDto,
    MemberList => bud_protocol::control::MemberDto,
    ModelList => bud_protocol::control::ModelDto,
    ProviderList => bud_protocol::control::ProviderDto,
    ApiKeyList => bud_protocol::control::ApiKeyDto,
    AuditList => bud_protocol::control::AuditRecordDto,
    ClusterList => bud_protocol::control::ClusterDto,
    EndpointList => bud_protocol::control::EndpointDto,
);

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bud_protocol::control::ProjectDto;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// One request as the fake budapp saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        /// `GET /projects?limit=200`
        line: String,
        authorization: Option<String>,
        body: String,
    }

    /// A fake budapp that answers each connection with the next scripted `(status, body)`, and
    /// records what it was sent. It closes every connection, so each request opens a new one.
    async fn fake_budapp(script: Vec<(u16, String)>) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for (status, body) in script {
                let (mut stream, _) = listener.accept().await.unwrap();
                let request = read_request(&mut stream).await;
                log.lock().unwrap().push(request);
                let response = format!(
                    "HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
                stream.shutdown().await.ok();
            }
        });
        (url, seen)
    }

    async fn read_request(stream: &mut tokio::net::TcpStream) -> Seen {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed mid-request");
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let length: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
        while buffer.len() < head_end + length {
            let n = stream.read(&mut chunk).await.unwrap();
            buffer.extend_from_slice(&chunk[..n]);
        }
        let line = head.lines().next().unwrap().trim_end_matches(" HTTP/1.1").to_owned();
        Seen {
            line,
            authorization: header("authorization"),
            body: String::from_utf8_lossy(&buffer[head_end..]).into_owned(),
        }
    }

    fn project(name: &str) -> String {
        serde_json::json!({
            "id": uuid::Uuid::new_v4(), "name": name, "description": "", "created_by": null,
            "created_at": "2025-03-14T09:26:53Z", "updated_at": "2025-03-14T09:26:53Z",
        })
        .to_string()
    }

    fn error(code: &str, message: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": message, "request_id": "req-7"}})
            .to_string()
    }

    fn logged_in(url: &str, dir: &std::path::Path) -> (Api, CredentialsFile) {
        let file = CredentialsFile::in_dir(dir);
        let credentials = Credentials {
            url: url.to_owned(),
            access_token: "access-1".into(),
            refresh_token: "refresh-1".into(),
            email: "admin@bud.local".into(),
        };
        file.save(&credentials).unwrap();
        (Api::logged_in(&file, None).unwrap(), file)
    }

    #[tokio::test]
    async fn an_expired_access_token_is_refreshed_once_saved_and_the_request_retried() {
        let tokens = serde_json::json!({
            "access_token": "access-2", "token_type": "Bearer", "expires_in": 900,
            "refresh_token": "refresh-2",
        });
        let (url, seen) = fake_budapp(vec![
            (401, error("token_expired", "the access token has expired")),
            (200, tokens.to_string()),
            (200, project("search")),
        ])
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, file) = logged_in(&url, tmp.path());

        let project: ProjectDto = api.get("/projects/x", &[]).await.unwrap();

        assert_eq!(project.name, "search");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer access-1"));
        assert_eq!(seen[1].line, "POST /auth/refresh");
        assert_eq!(seen[1].authorization, None);
        assert_eq!(seen[1].body, r#"{"refresh_token":"refresh-1"}"#);
        assert_eq!(seen[2].line, "GET /projects/x");
        assert_eq!(seen[2].authorization.as_deref(), Some("Bearer access-2"));
        let saved = file.load().unwrap().unwrap();
        assert_eq!(
            (saved.access_token.as_str(), saved.refresh_token.as_str()),
            ("access-2", "refresh-2")
        );
        assert_eq!(saved.url, url);
    }

    #[tokio::test]
    async fn a_failed_refresh_says_to_log_in_again() {
        let (url, seen) = fake_budapp(vec![
            (401, error("token_expired", "the access token has expired")),
            (401, error("token_invalid", "the refresh token is not valid; log in again")),
        ])
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, _file) = logged_in(&url, tmp.path());

        let message = format!("{:#}", api.get::<ProjectDto>("/projects/x", &[]).await.unwrap_err());

        assert_eq!(
            message,
            "your session has ended: run `bud login`: the refresh token is not valid; log in again \
             (code token_invalid, request req-7)"
        );
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn other_errors_are_one_line_with_code_and_request_id_and_are_not_retried() {
        let (url, seen) = fake_budapp(vec![(
            403,
            error("permission_denied", "missing permission project:manage"),
        )])
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, _file) = logged_in(&url, tmp.path());

        let e = api.delete::<()>("/projects/x", &[]).await.unwrap_err();

        let failure = e.downcast_ref::<ApiFailure>().unwrap();
        assert_eq!(failure.status, StatusCode::FORBIDDEN);
        assert_eq!(
            e.to_string(),
            "missing permission project:manage (code permission_denied, request req-7)"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_204_reads_as_unit_and_queries_are_encoded() {
        let (url, seen) = fake_budapp(vec![(204, String::new())]).await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, _file) = logged_in(&url, tmp.path());

        let query = [("user_id", "u1".to_owned()), ("permission", "key:manage".to_owned())];
        api.delete::<()>("/permissions", &query).await.unwrap();

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].line, "DELETE /permissions?user_id=u1&permission=key%3Amanage");
    }

    #[tokio::test]
    async fn text_answers_come_back_as_they_are_and_errors_still_read_as_failures() {
        let logs = "==> replica 0 <==\n--- started pid 42 port 4000 at now ---\n";
        let (url, seen) = fake_budapp(vec![
            (200, logs.to_owned()),
            (503, error("unavailable", "budcluster cannot be reached")),
        ])
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, _file) = logged_in(&url, tmp.path());

        let text = api.get_text("/endpoints/e/logs", &[("tail", "5".to_owned())]).await.unwrap();
        let e = api.get_text("/endpoints/e/logs", &[]).await.unwrap_err();

        assert_eq!(text, logs);
        assert_eq!(e.downcast_ref::<ApiFailure>().unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].line, "GET /endpoints/e/logs?tail=5");
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer access-1"));
    }

    #[tokio::test]
    async fn put_sends_its_body_as_json() {
        let (url, seen) = fake_budapp(vec![(200, project("search"))]).await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, _file) = logged_in(&url, tmp.path());

        let body = serde_json::json!({"kubeconfig": "apiVersion: v1"});
        let _: ProjectDto = api.put("/clusters/c/kubeconfig", &body).await.unwrap();

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].line, "PUT /clusters/c/kubeconfig");
        assert_eq!(seen[0].body, r#"{"kubeconfig":"apiVersion: v1"}"#);
    }

    #[tokio::test]
    async fn lists_follow_the_cursor_to_the_last_page() {
        let page = |names: &[&str], next: Option<&str>| {
            let data: Vec<serde_json::Value> =
                names.iter().map(|n| serde_json::from_str(&project(n)).unwrap()).collect();
            serde_json::json!({"data": data, "next_cursor": next}).to_string()
        };
        let (url, seen) =
            fake_budapp(vec![(200, page(&["a", "b"], Some("c1"))), (200, page(&["c"], None))])
                .await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, _file) = logged_in(&url, tmp.path());

        let items = api.list::<ProjectList>("/projects", &[], LIST_CAP).await.unwrap();

        let names: Vec<_> = items.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[0].line, "GET /projects?limit=200");
        assert_eq!(seen[1].line, "GET /projects?limit=200&cursor=c1");
    }

    #[tokio::test]
    async fn lists_stop_at_the_limit() {
        let body = serde_json::json!({
            "data": [serde_json::from_str::<serde_json::Value>(&project("a")).unwrap()],
            "next_cursor": "c1",
        });
        let (url, seen) = fake_budapp(vec![(200, body.to_string())]).await;
        let tmp = tempfile::tempdir().unwrap();
        let (mut api, _file) = logged_in(&url, tmp.path());

        let filters = [("action", "key.revoke".to_owned())];
        let items = api.list::<ProjectList>("/audit", &filters, 1).await.unwrap();

        assert_eq!(items.len(), 1);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].line, "GET /audit?action=key.revoke&limit=1");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named_with_a_hint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let mut api = Api::anonymous(&format!("{url}/")).unwrap();

        let e = api.get::<ProjectDto>("/projects", &[]).await.unwrap_err();

        assert_eq!(e.to_string(), format!("cannot reach budapp at {url}: is `bud serve` running?"));
    }

    #[test]
    fn not_logged_in_says_how_to_log_in() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Api::logged_in(&CredentialsFile::in_dir(tmp.path()), None).err().unwrap();
        assert_eq!(e.to_string(), "not logged in: run `bud login`");
    }

    #[test]
    fn a_non_json_error_body_is_quoted() {
        let failure = ApiFailure::new(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(
            failure.to_string(),
            "budapp answered 502 Bad Gateway: <html>bad gateway</html>"
        );
    }
}
