//! Rate-limit counts in Redis, shared by every gateway replica: the same GCRA as the in-process
//! [`Limiter`](super::Limiter), run by a Lua script that reads, decides and writes all the cells
//! of one request atomically, in one round trip (`EVALSHA`, or `EVAL` once after a `NOSCRIPT`,
//! which also caches the script again). Each cell is one key, `<prefix>:gcra:<kind>:<id>`,
//! holding its theoretical arrival time and expiring once the bucket would be full anyway.
//!
//! The clock is Redis's own (`TIME`), so replicas whose clocks disagree still share one
//! timeline. Times in the script are whole microseconds: Lua's numbers are doubles, exact up to
//! 2^53, which microseconds since 1970 stay below for two more centuries (nanoseconds do not).
//! A limit above 60 million per minute therefore refills at most one unit per microsecond.
//!
//! Redis is unreachable when a call fails or gets no answer within the timeout. Calls then fail
//! at once without trying it, except one probe per interval, so that requests do not each pay
//! the timeout; the connection manager reconnects underneath, and the first probe answered puts
//! Redis back in use.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, ErrorKind, RedisError, Script, ServerErrorKind};

use super::{Subject, Verdict, Verdicts};
use crate::config::RedisLimits;

/// GCRA over the cells in `KEYS`, as [`super::Gcra`] computes it. `ARGV[1]` is `check` (admit
/// every cell's cost or none: a request) or `charge` (add every cost, overdrawing: tokens
/// used); `ARGV[2]` is now in microseconds, or empty for Redis's clock; then each cell's limit
/// per minute and cost. Returns four integers per cell: allowed (1 or 0), remaining, reset and
/// retry after (microseconds). A written cell expires a period after its bucket is full again,
/// the slack covering clocks that step back (a failover to a replica whose clock is behind).
const GCRA_LUA: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local period = 60000000
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[2])
end
local charge = ARGV[1] == 'charge'
local verdicts, writes, admitted = {}, {}, true
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 * i + 1])
  local cost = tonumber(ARGV[2 * i + 2])
  local allowed, remaining, reset, retry_after = 0, 0, 0, period
  if limit > 0 then
    local unit = math.ceil(period / limit)
    local horizon = now + unit * limit
    local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
    local new_tat = tat + unit * cost
    if charge or new_tat <= horizon then
      allowed, retry_after = 1, 0
      remaining = math.floor(math.max(horizon - new_tat, 0) / unit)
      reset = new_tat - now
      if cost > 0 then writes[#writes + 1] = {key, new_tat} end
    else
      remaining = math.floor(math.max(horizon - tat, 0) / unit)
      reset = tat - now
      retry_after = new_tat - horizon
    end
  end
  if allowed == 0 then admitted = false end
  verdicts[#verdicts + 1] = allowed
  verdicts[#verdicts + 1] = remaining
  verdicts[#verdicts + 1] = reset
  verdicts[#verdicts + 1] = retry_after
end
if charge or admitted then
  for _, w in ipairs(writes) do
    local ttl = math.ceil((w[2] - now) / 1000) + period / 1000
    redis.call('SET', w[1], string.format('%d', w[2]), 'PX', ttl)
  end
end
return verdicts
";

/// Redis did not answer, or is not tried again before the next probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable;

/// The shared counts. Cheap to clone: charges are sent from tasks of their own.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// Made on first use: the manager spawns a task, so it needs the runtime, which
    /// [`RedisLimiter::new`] may be called outside of.
    connection: OnceLock<ConnectionManager>,
    /// SHA-1 of [`GCRA_LUA`], for `EVALSHA`.
    sha: String,
    prefix: String,
    timeout: Duration,
    probe_interval_ms: u64,
    epoch: Instant,
    /// 0 while Redis answers; otherwise the time (ms since `epoch`) from which one call may try
    /// it again.
    retry_at_ms: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Check,
    Charge,
}

/// One cell of a script call.
#[derive(Debug)]
struct Cell {
    key: String,
    limit: u32,
    cost: u32,
}

/// Whether a call may go to Redis.
enum Gate {
    Open,
    /// Redis is unreachable, and this call is the one that tries it again.
    Probe,
    Shut,
}

impl RedisLimiter {
    /// Parses the URL; connects on first use.
    pub fn new(config: &RedisLimits) -> Result<Self, RedisError> {
        let client = Client::open(config.url.as_str())?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                connection: OnceLock::new(),
                sha: Script::new(GCRA_LUA).get_hash().to_owned(),
                prefix: config.key_prefix.clone(),
                timeout: config.timeout,
                probe_interval_ms: u64::try_from(config.probe_interval.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
                epoch: Instant::now(),
                retry_at_ms: AtomicU64::new(0),
            }),
        })
    }

    /// Evaluates (and, if all allow it, counts) one request's limits, as
    /// [`Limiter::check`](super::Limiter::check) does in process.
    pub async fn check(&self, s: &Subject<'_>) -> Result<Verdicts, Unreachable> {
        let key_id = s.key.to_string();
        let slots = [
            (s.key_rpm, "key-rpm", key_id.as_str(), 1),
            (s.route_rpm, "route-rpm", s.route, 1),
            (s.key_tpm, "key-tpm", key_id.as_str(), 0),
            (s.route_tpm, "route-tpm", s.route, 0),
        ];
        let cells: Vec<Cell> = slots
            .into_iter()
            .filter_map(|(limit, kind, id, cost)| {
                limit.map(|limit| Cell { key: self.key(kind, id), limit, cost })
            })
            .collect();
        let mut found = self.run(Mode::Check, &cells, None).await?.into_iter();
        let mut next = |limit: Option<u32>| limit.and_then(|_| found.next());
        Ok(Verdicts {
            key_requests: next(s.key_rpm),
            route_requests: next(s.route_rpm),
            key_tokens: next(s.key_tpm),
            route_tokens: next(s.route_tpm),
        })
    }

    /// Charges `tokens` to the key's and route's token budgets.
    pub async fn charge(&self, s: &Subject<'_>, tokens: u32) -> Result<(), Unreachable> {
        let mut cells = Vec::with_capacity(2);
        if let Some(limit) = s.key_tpm {
            cells.push(Cell { key: self.key("key-tpm", &s.key.to_string()), limit, cost: tokens });
        }
        if let Some(limit) = s.route_tpm {
            cells.push(Cell { key: self.key("route-tpm", s.route), limit, cost: tokens });
        }
        self.run(Mode::Charge, &cells, None).await.map(drop)
    }

    /// Connects, and logs whether Redis answers.
    pub async fn warm_up(&self) {
        let ping = async {
            let mut connection = self.connection()?;
            ::redis::cmd("PING").query_async::<String>(&mut connection).await
        };
        match tokio::time::timeout(self.inner.timeout * 20, ping).await {
            Ok(Ok(_)) => tracing::info!("rate limits are shared through redis"),
            Ok(Err(e)) => drop(self.unreachable(&e)),
            Err(_) => drop(self.unreachable(&"no answer to PING")),
        }
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:gcra:{kind}:{id}", self.inner.prefix)
    }

    /// Runs the script on `cells` at Redis's time (or `now_us`, in tests).
    async fn run(
        &self,
        mode: Mode,
        cells: &[Cell],
        now_us: Option<u64>,
    ) -> Result<Vec<Verdict>, Unreachable> {
        if cells.is_empty() {
            return Ok(Vec::new());
        }
        if let Gate::Shut = self.gate() {
            return Err(Unreachable);
        }
        let answer = tokio::time::timeout(self.inner.timeout, self.eval(mode, cells, now_us)).await;
        let raw = match answer {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => return Err(self.unreachable(&e)),
            Err(_) => return Err(self.unreachable(&"no answer within the timeout")),
        };
        let Some(verdicts) = parse(&raw, cells.len()) else {
            return Err(self.unreachable(&format!("unexpected script answer {raw:?}")));
        };
        if self.inner.retry_at_ms.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!("redis answers again: rate limits are shared");
        }
        Ok(verdicts)
    }

    /// One `EVALSHA`; `EVAL` when Redis does not have the script (a restart, `SCRIPT FLUSH`).
    async fn eval(
        &self,
        mode: Mode,
        cells: &[Cell],
        now_us: Option<u64>,
    ) -> Result<Vec<i64>, RedisError> {
        let mut connection = self.connection()?;
        let evalsha = command("EVALSHA", &self.inner.sha, mode, cells, now_us);
        match evalsha.query_async(&mut connection).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                command("EVAL", GCRA_LUA, mode, cells, now_us).query_async(&mut connection).await
            }
            // Nothing was sent: the manager is reconnecting (Redis may be back), so try that.
            Err(e) if e.is_connection_refusal() => evalsha.query_async(&mut connection).await,
            answer => answer,
        }
    }

    fn connection(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(connection) = self.inner.connection.get() {
            return Ok(connection.clone());
        }
        // No retries inside the manager: a caller waits at most `timeout`, and the probes are
        // the retries. Each failed call has the manager start a new connection.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.inner.timeout))
            .set_response_timeout(Some(self.inner.timeout))
            .set_number_of_retries(0);
        let made = ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)?;
        Ok(self.inner.connection.get_or_init(|| made).clone())
    }

    fn gate(&self) -> Gate {
        let retry_at = self.inner.retry_at_ms.load(Ordering::Relaxed);
        if retry_at == 0 {
            return Gate::Open;
        }
        let now = self.now_ms();
        let next = now.saturating_add(self.inner.probe_interval_ms);
        let won = now >= retry_at
            && self
                .inner
                .retry_at_ms
                .compare_exchange(retry_at, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if won { Gate::Probe } else { Gate::Shut }
    }

    /// Records that Redis did not answer; logged once per outage.
    fn unreachable(&self, why: &dyn Display) -> Unreachable {
        let next = self.now_ms().saturating_add(self.inner.probe_interval_ms);
        if self.inner.retry_at_ms.swap(next, Ordering::Relaxed) == 0 {
            tracing::warn!(error = %why, "redis unreachable: rate limits fall back");
        }
        Unreachable
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

fn command(name: &str, script: &str, mode: Mode, cells: &[Cell], now_us: Option<u64>) -> Cmd {
    let mut cmd = ::redis::cmd(name);
    cmd.arg(script).arg(cells.len());
    for cell in cells {
        cmd.arg(&cell.key);
    }
    cmd.arg(match mode {
        Mode::Check => "check",
        Mode::Charge => "charge",
    });
    cmd.arg(now_us.map(|n| n.to_string()).unwrap_or_default());
    for cell in cells {
        cmd.arg(cell.limit).arg(cell.cost);
    }
    cmd
}

/// The script's four integers per cell, in nanoseconds as [`Verdict`] counts.
fn parse(raw: &[i64], cells: usize) -> Option<Vec<Verdict>> {
    if raw.len() != cells * 4 {
        return None;
    }
    let ns = |us: i64| u64::try_from(us).unwrap_or(0).saturating_mul(1000);
    Some(
        raw.chunks_exact(4)
            .map(|v| Verdict {
                allowed: v[0] == 1,
                remaining: u32::try_from(v[1].max(0)).unwrap_or(u32::MAX),
                reset: ns(v[2]),
                retry_after: ns(v[3]),
                // Kept in Redis, not here.
                tat: 0,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use proptest::test_runner::TestRunner;

    use super::*;
    use crate::config::OnUnreachable;
    use crate::limits::Gcra;

    /// A [`crate::limits::PERIOD`] in the script's ticks.
    const PERIOD_US: u64 = 60_000_000;

    /// The Redis of the tests, from `BUD_TEST_REDIS_URL`; `None` (and a line saying the test is
    /// skipped) when unset.
    fn redis_url(test: &str) -> Option<String> {
        let url = std::env::var("BUD_TEST_REDIS_URL").ok().filter(|u| !u.is_empty());
        if url.is_none() {
            eprintln!("{test}: skipped, BUD_TEST_REDIS_URL is not set");
        }
        url
    }

    fn limiter(url: &str) -> RedisLimiter {
        let mut config = RedisLimits::new(url, OnUnreachable::FailClosed);
        config.key_prefix = format!("bud-test-{}", uuid::Uuid::new_v4());
        // Generous: a loaded test machine is not an outage.
        config.timeout = Duration::from_secs(5);
        RedisLimiter::new(&config).unwrap()
    }

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
        RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Wait(u64),
        /// A request: both cells admit `cost` or neither does.
        Admit(u32),
        /// Tokens used: both cells are charged, overdrawing.
        Charge(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3_000_000u64).prop_map(Op::Wait),
            (0..50u64).prop_map(Op::Wait),
            (0..5u32).prop_map(Op::Admit),
            (0..200u32).prop_map(Op::Charge),
        ]
    }

    /// The Lua script and the in-process GCRA (in microseconds) give the same verdicts for the
    /// same arrivals, with two cells (a key's and a route's) admitted all or nothing.
    #[test]
    fn the_lua_gcra_matches_the_in_process_one() {
        let Some(url) = redis_url("the_lua_gcra_matches_the_in_process_one") else { return };
        let mut runner = TestRunner::new(ProptestConfig::with_cases(48));
        let cases = ((0..120u32, 1..120u32), proptest::collection::vec(op(), 1..80));
        let result = runner.run(&cases, |((a, b), ops)| {
            let redis = limiter(&url);
            let cells = |cost| {
                [
                    Cell { key: redis.key("key-rpm", "k"), limit: a, cost },
                    Cell { key: redis.key("route-rpm", "r"), limit: b, cost },
                ]
            };
            let mut model = [Gcra::default(), Gcra::default()];
            let mut now = 1_000 * PERIOD_US;
            for op in ops {
                match op {
                    Op::Wait(d) => now += d,
                    Op::Admit(cost) => {
                        let got = runtime()
                            .block_on(redis.run(Mode::Check, &cells(cost), Some(now)))
                            .unwrap();
                        let want = [
                            model[0].evaluate_over(PERIOD_US, now, a, cost),
                            model[1].evaluate_over(PERIOD_US, now, b, cost),
                        ];
                        if want.iter().all(|v| v.allowed) {
                            model[0].tat = want[0].tat;
                            model[1].tat = want[1].tat;
                        }
                        for (got, want) in got.iter().zip(want) {
                            // The script answers in microseconds, the model counted them as ticks.
                            prop_assert_eq!(got.allowed, want.allowed);
                            prop_assert_eq!(got.remaining, want.remaining);
                            prop_assert_eq!(got.reset, want.reset * 1000);
                            prop_assert_eq!(got.retry_after, want.retry_after * 1000);
                        }
                    }
                    Op::Charge(cost) => {
                        runtime()
                            .block_on(redis.run(Mode::Charge, &cells(cost), Some(now)))
                            .unwrap();
                        model[0].charge_over(PERIOD_US, now, a, cost);
                        model[1].charge_over(PERIOD_US, now, b, cost);
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    #[tokio::test]
    async fn a_flushed_script_is_sent_again() {
        let Some(url) = redis_url("a_flushed_script_is_sent_again") else { return };
        let redis = limiter(&url);
        let cell = || vec![Cell { key: redis.key("key-rpm", "k"), limit: 2, cost: 1 }];
        assert!(redis.run(Mode::Check, &cell(), None).await.unwrap()[0].allowed);
        let mut connection = redis.connection().unwrap();
        let () = ::redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut connection).await.unwrap();
        let v = redis.run(Mode::Check, &cell(), None).await.unwrap();
        assert!(v[0].allowed);
        assert_eq!(v[0].remaining, 0);
        assert!(!redis.run(Mode::Check, &cell(), None).await.unwrap()[0].allowed);
        // The cell expires a period after it is full again, not never.
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(redis.key("key-rpm", "k"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(ttl > 60_000 && ttl <= 120_000, "{ttl}");
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_tried_once_per_probe_interval() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut config =
            RedisLimits::new(format!("redis://127.0.0.1:{port}"), OnUnreachable::FailClosed);
        config.probe_interval = Duration::from_secs(3600);
        let redis = RedisLimiter::new(&config).unwrap();
        let cell = || vec![Cell { key: redis.key("key-rpm", "k"), limit: 2, cost: 1 }];
        assert_eq!(redis.run(Mode::Check, &cell(), None).await, Err(Unreachable));
        assert!(matches!(redis.gate(), Gate::Shut), "no second try before the interval");
        // Once the interval has passed, exactly one call probes.
        tokio::time::sleep(Duration::from_millis(5)).await;
        redis.inner.retry_at_ms.store(redis.now_ms(), Ordering::Relaxed);
        assert!(matches!(redis.gate(), Gate::Probe));
        assert!(matches!(redis.gate(), Gate::Shut));
    }
}
